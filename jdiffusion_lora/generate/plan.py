"""What to generate: one `Item` per (style, prompt), with its text, seed and file name.

Inputs (REFERENCE §1 layout): a dataset root with `<NN>/prompt.json` ({"0": "Cat", ...}), optional
`<NN>/tag.json` ({"style": "a, b"}) and `<root>/llm_prompt.json` ({"Cat": {"hypernyms": [...]}}),
or a prompt file: JSON `{"NN": ["Cat", ...]}` or `{"NN": {"0": "Cat", ...}}`.

Output file: `<out>/<NN>/<stem>.png` where the stem is the prompt exactly, unless the prompt holds
characters a file name cannot (`/`, `\\`, control characters, ...): those are %-escaped
(`escape_stem`), reversibly (`unescape_stem`), with a warning.

Seeds: by default each image's seed is a stable hash of (base seed, style, prompt), so an image
never depends on the batch, the order or the worker that made it. `seed_mode="fixed"` gives
every image the base seed itself (the seed system's 114514 for all).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .prompts import check_template, field_values, render, resolve_template

# Characters escaped in file stems: path separators, Windows-reserved ones, and '%' (the escape itself).
_ILLEGAL = set('/\\:*?"<>|%')
MAX_STEM_BYTES = 200  # well under the usual 255-byte name limit, leaving room for ".png" and temp names


class PlanError(ValueError):
    """Bad generation input (missing prompt.json, unknown style, duplicate prompts, ...)."""


@dataclass(frozen=True)
class Item:
    style: str       # "00"
    key: str         # the prompt's key in prompt.json ("0") or its list position
    prompt: str      # the object name, exactly as given
    stem: str        # file stem: the prompt, escaped if needed
    text: str        # the rendered prompt sent to the text encoder
    negative: str    # the rendered negative prompt ("" = none)
    seed: int

    @property
    def relpath(self) -> str:
        return f"{self.style}/{self.stem}.png"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- names and seeds

def escape_stem(prompt: str) -> str:
    """Prompt -> file stem. Unsafe characters become %XX (UTF-8 bytes, upper-case hex).

    Also escaped: a leading '.', a trailing '.' or space (hidden / stripped on Windows)."""
    out = []
    for i, ch in enumerate(prompt):
        bad = (ch in _ILLEGAL or ord(ch) < 32 or ord(ch) == 127
               or (i == 0 and ch == ".") or (i == len(prompt) - 1 and ch in ". "))
        out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if bad else ch)
    return "".join(out)


def unescape_stem(stem: str) -> str:
    """Inverse of `escape_stem`."""
    from urllib.parse import unquote
    return unquote(stem, errors="strict")


def item_seed(base_seed: int, style: str, prompt: str, mode: str = "hash") -> int:
    """The seed of one image: a stable hash of (base seed, style, prompt), or the base seed ("fixed")."""
    if mode == "fixed":
        return int(base_seed)
    if mode != "hash":
        raise ValueError(f"seed mode must be 'hash' or 'fixed', got {mode!r}")
    digest = hashlib.sha256(f"{int(base_seed)}\x00{style}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- reading inputs

def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PlanError(f"{what} is not valid JSON: {path}: {e}") from None


def _prompt_list(raw, where: str) -> List[Tuple[str, str]]:
    """prompt.json content -> [(key, prompt)] in key order (numeric keys sorted as numbers)."""
    if isinstance(raw, list):
        pairs = [(str(i), p) for i, p in enumerate(raw)]
    elif isinstance(raw, dict):
        keys = sorted(raw, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))
        pairs = [(str(k), raw[k]) for k in keys]
    else:
        raise PlanError(f"{where}: expected a JSON object {{\"0\": \"Cat\", ...}} or a list, got {type(raw).__name__}")
    bad = [k for k, p in pairs if not isinstance(p, str) or not p.strip()]
    if bad:
        raise PlanError(f"{where}: empty or non-text prompt(s) at key(s) {bad}")
    return pairs


def style_folders(root: str) -> List[str]:
    """Style ids under a dataset root: sub-folders whose names are digits, sorted."""
    if not os.path.isdir(root):
        raise PlanError(f"dataset root not found: {root}")
    return sorted(d for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d)))


def normalise_style(style: str, width: int = 2) -> str:
    s = str(style).strip()
    if not s.isdigit():
        raise PlanError(f"style ids are numbers like 00 or 7, got {style!r}")
    return s.zfill(width)


@dataclass
class StyleInput:
    style: str
    prompts: List[Tuple[str, str]]   # [(key, prompt)]
    style_tags: str = ""


def read_inputs(dataset_root: Optional[str] = None, prompt_file: Optional[str] = None,
                styles: Optional[Sequence[str]] = None) -> Tuple[List[StyleInput], Dict[str, dict]]:
    """Read prompts (and tags, LLM hypernyms) -> ([StyleInput], llm table keyed by lower-case prompt)."""
    if not dataset_root and not prompt_file:
        raise PlanError("give a dataset root (with <NN>/prompt.json) or a prompt file")
    llm: Dict[str, dict] = {}
    tags: Dict[str, str] = {}
    found: Dict[str, List[Tuple[str, str]]] = {}
    if dataset_root:
        ids = style_folders(dataset_root)
        for sid in ids:
            tag_path = os.path.join(dataset_root, sid, "tag.json")
            if os.path.isfile(tag_path):
                tag = _read_json(tag_path, "tag.json")
                tags[sid] = tag.get("style", "") if isinstance(tag, dict) else ""
        llm_path = os.path.join(dataset_root, "llm_prompt.json")
        if os.path.isfile(llm_path):
            llm = {str(k).lower(): v for k, v in _read_json(llm_path, "llm_prompt.json").items()}
    if prompt_file:
        if not os.path.isfile(prompt_file):
            raise PlanError(f"prompt file not found: {prompt_file}")
        raw = _read_json(prompt_file, "prompt file")
        if not isinstance(raw, dict):
            raise PlanError(f"{prompt_file}: expected {{\"NN\": [prompts] or {{key: prompt}}}}")
        for sid, entries in raw.items():
            found[normalise_style(sid)] = _prompt_list(entries, f"{prompt_file}[{sid!r}]")
        available = sorted(found)
    else:
        available = ids
    wanted = [normalise_style(s) for s in styles] if styles else available
    if len(set(wanted)) != len(wanted):
        raise PlanError(f"a style is named twice: {wanted}")
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise PlanError(f"unknown style id(s) {', '.join(unknown)}; available: {', '.join(available) or 'none'}")
    if not wanted:
        raise PlanError(f"no style folders (<NN>/prompt.json) under {dataset_root}")
    out = []
    for sid in wanted:
        if sid not in found:
            path = os.path.join(dataset_root, sid, "prompt.json")
            if not os.path.isfile(path):
                raise PlanError(f"style {sid} has no prompt.json ({path} is missing)")
            found[sid] = _prompt_list(_read_json(path, "prompt.json"), path)
        out.append(StyleInput(sid, found[sid], tags.get(sid, "")))
    return out, llm


# ----------------------------------------------------------------------------- the plan

def build_items(inputs: List[StyleInput], llm: Dict[str, dict], template: str = "challenge",
                negative_template: Optional[str] = None, base_seed: int = 114514, seed_mode: str = "hash",
                trigger_format: str = "style_{style}", dedupe: bool = False,
                pez: Optional[Dict[str, str]] = None) -> List[Item]:
    """One Item per (style, prompt), in style then key order. Checks names before anything is written.

    pez: style id -> its PEZ hard prompt (the `{pez}` field); a template using {pez} needs one per style."""
    template = resolve_template(template)
    negative_template = resolve_template(negative_template)
    check_template(template)
    if negative_template:
        check_template(negative_template)
    items: List[Item] = []
    problems: List[str] = []
    if "{pez}" in template + (negative_template or ""):
        missing = [s.style for s in inputs if not (pez or {}).get(s.style)]
        if missing:
            raise PlanError(f"the template uses {{pez}} but styles {missing} have no PEZ prompt "
                            "(run `python -m jdiffusion_lora.cli pez` and pass its file with --pez)")
    for s in inputs:
        seen: Dict[str, str] = {}  # lower-cased stem -> key (the scorer lower-cases stems; so may the file system)
        for key, prompt in s.prompts:
            stem = escape_stem(prompt)
            if stem != prompt:
                warnings.warn(f"style {s.style} prompt {prompt!r}: characters not allowed in file names; "
                              f"the file is {s.style}/{stem}.png (unescape_stem gives the prompt back)")
            if len(stem.encode("utf-8")) > MAX_STEM_BYTES:
                problems.append(f"style {s.style} key {key}: prompt {prompt[:40]!r}... is too long to be a file "
                                f"name: {len(stem.encode())} bytes, at most {MAX_STEM_BYTES} bytes (UTF-8, after "
                                f"escaping) are allowed -- shorten it in prompt.json, or map it to a short name in a "
                                f'--prompts file ({{"{s.style}": {{"{key}": "short name"}}}}); the file stem is the '
                                f"prompt, which the scorer reads as the image's text")
                continue
            if stem.lower() in seen:
                msg = f"style {s.style}: duplicate prompt {prompt!r} (keys {seen[stem.lower()]} and {key})"
                if dedupe:
                    warnings.warn(msg + "; keeping the first")
                    continue
                problems.append(msg + ("" if dedupe else " -- fix the prompts or pass --dedupe to keep the first"))
                continue
            seen[stem.lower()] = key
            hyper = (llm.get(prompt.lower(), {}) or {}).get("hypernyms", [])
            values = field_values(s.style, prompt, s.style_tags, hyper, trigger_format, (pez or {}).get(s.style, ""))
            items.append(Item(style=s.style, key=key, prompt=prompt, stem=stem, text=render(template, values),
                              negative=render(negative_template, values) if negative_template else "",
                              seed=item_seed(base_seed, s.style, prompt, seed_mode)))
    if problems:
        raise PlanError("bad prompts (nothing was generated): " + "; ".join(problems))
    return items
