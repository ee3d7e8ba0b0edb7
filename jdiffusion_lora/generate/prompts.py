"""Prompt templates for batch generation.

A template is plain text with fields in braces; `{field*N}` repeats a field N times:

    {trigger}      the style's trigger word, `style_NN` by default (see `trigger_format`)
    {style}        the style id, "NN"
    {style_tags}   tag.json "style" of the style ("purple, lineart, dark_background")
    {prompt}       the object name from prompt.json ("Cat")
    {hypernyms}    llm_prompt.json [prompt]["hypernyms"], looked up case-insensitively
    {pez}          the style's PEZ hard prompt (`python -m jdiffusion_lora.cli pez`, given with --pez FILE)

The rendered text is comma-normalised like the training captions (tags stripped, empty tags
dropped, joined with ","), so a missing optional field leaves no stray comma.

Presets: "challenge" is the inference prompt of the 2024 challenge pack (`style_NN,` + style tags +
`Prompt,` x 4 + LLM hypernyms; "seed", its old name, still works with a deprecation note); "trigger" is
trigger, style tags and the object; "plain" is the object name alone.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Optional

PRESETS = {
    "challenge": "{trigger},{style_tags},{prompt*4},{hypernyms}",
    "trigger": "{trigger},{style_tags},{prompt}",
    "plain": "{prompt}",
}
RENAMED_PRESETS = {"seed": "challenge"}   # old name -> new name
FIELDS = ("trigger", "style", "style_tags", "prompt", "hypernyms", "pez")
_FIELD = re.compile(r"\{([A-Za-z_]+)(?:\*(\d+))?\}")


def resolve_template(template: Optional[str]) -> Optional[str]:
    """A preset name -> its template; anything else is taken as a template (None stays None)."""
    if template is None:
        return None
    if template in RENAMED_PRESETS:
        print(f"note: --template {template} is now --template {RENAMED_PRESETS[template]} (the old name is "
              f"deprecated)", file=sys.stderr)
        template = RENAMED_PRESETS[template]
    return PRESETS.get(template, template)


def check_template(template: str) -> None:
    """Raise ValueError for unknown fields or unbalanced braces."""
    for name, _ in _FIELD.findall(template):
        if name not in FIELDS:
            raise ValueError(f"unknown field {{{name}}} in prompt template {template!r}; fields: "
                             + ", ".join("{%s}" % f for f in FIELDS))
    rest = _FIELD.sub("", template)
    if "{" in rest or "}" in rest:
        raise ValueError(f"unbalanced or malformed braces in prompt template {template!r} "
                         "(fields look like {prompt} or {prompt*4})")


def split_tags(text: str) -> List[str]:
    """'a,  b c , ,d' -> ['a', 'b c', 'd']."""
    return [t for t in (re.sub(r"\s+", " ", p).strip() for p in (text or "").split(",")) if t]


def render(template: str, values: Dict[str, str]) -> str:
    """Fill the fields of `template` from `values` and comma-normalise the result."""
    check_template(template)

    def fill(m: "re.Match") -> str:
        value = values.get(m.group(1), "") or ""
        return ",".join([value] * int(m.group(2) or 1))

    return ",".join(split_tags(_FIELD.sub(fill, template)))


def field_values(style: str, prompt: str, style_tags: str = "", hypernyms: Optional[List[str]] = None,
                 trigger_format: str = "style_{style}", pez: str = "") -> Dict[str, str]:
    return {
        "pez": pez or "",
        "trigger": trigger_format.format(style=style),
        "style": style,
        "style_tags": style_tags or "",
        "prompt": prompt,
        "hypernyms": ",".join(hypernyms or []),
    }
