"""The prompts of the sample grids drawn during training.

From `sample_prompts` (the config's list; on the command line `--sample-prompt`, once per prompt) and
`sample_prompts_file` in kohya's format (`--sample_prompts FILE` there): a prompt a line, `#` starts a
comment line, options after the prompt, each introduced by " --":

    a purple cat, lineart --n blurry, lowres --w 512 --h 768 --d 42 --l 7 --s 30

`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--l` guidance scale (CFG), `--s` sampler steps
(1..1000); an option not given takes the config's sample_* value. Unknown options are ignored, as kohya
ignores them (`--ss`, `--cn`, ...); a malformed value is an error naming the line. kohya's `.json`
(a list of strings or objects) and `.toml` (`[prompt]` with `[[prompt.subset]]`) prompt files are read too.
Without any prompt, each style gets one: trigger, style tags and its first prompt.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

_OPTION = re.compile(r"(n|w|h|d|l|s)\s+(.*)$", re.IGNORECASE | re.DOTALL)


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = None        # None: the config's resolution
    height: Optional[int] = None
    seed: Optional[int] = None         # None: sample_seed + the prompt's position
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    style: Optional[str] = None        # the default per-style prompts: style name and object
    object: Optional[str] = None


def parse_line(line: str, where: str = "") -> SamplePrompt:
    """One line of a kohya prompt file."""
    parts = line.split(" --")
    sp = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        m = _OPTION.match(part.strip())
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2).strip()
        try:
            if key == "n":
                sp.negative_prompt = value
            elif key == "w":
                sp.width = int(value)
            elif key == "h":
                sp.height = int(value)
            elif key == "d":
                sp.seed = int(value)
            elif key == "l":
                sp.guidance_scale = float(value)
            elif key == "s":
                sp.steps = max(1, min(1000, int(value)))
        except ValueError:
            raise ValueError(f"{where}: --{key} {value!r} is not a number") from None
    return sp


def _from_dict(d: Dict[str, Any], where: str) -> SamplePrompt:
    if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
        raise ValueError(f"{where}: each prompt needs a 'prompt' string")
    try:
        return SamplePrompt(
            prompt=d["prompt"], negative_prompt=str(d.get("negative_prompt", "") or ""),
            width=int(d["width"]) if "width" in d else None, height=int(d["height"]) if "height" in d else None,
            seed=int(d["seed"]) if d.get("seed") is not None else None,
            guidance_scale=float(d["scale"]) if "scale" in d else None,
            steps=max(1, min(1000, int(d["sample_steps"]))) if "sample_steps" in d else None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def read_prompt_file(path: str) -> List[SamplePrompt]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample prompt file not found: {path}")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of prompts")
        return [parse_line(x, f"{path} item {i + 1}") if isinstance(x, str) else _from_dict(x, f"{path} item {i + 1}")
                for i, x in enumerate(items)]
    if path.endswith(".toml"):
        from .config import tomllib
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
        base = dict(data.get("prompt", {}))
        subsets = base.pop("subset", [])
        return [_from_dict({**base, **s}, f"{path} subset {i + 1}") for i, s in enumerate(subsets)]
    with open(path, encoding="utf-8") as f:
        return [parse_line(line.strip(), f"{path} line {n}") for n, line in enumerate(f, 1)
                if line.strip() and not line.startswith("#")]


def sample_prompts(c, data) -> List[SamplePrompt]:
    """The config's prompts, then the file's; else one default prompt per style."""
    prompts = [SamplePrompt(p) for p in c.sample_prompts]
    if c.sample_prompts_file:
        prompts += read_prompt_file(c.sample_prompts_file)
    if not prompts:
        for style in data.styles:
            first = next(iter(style.prompts.values()), None) or (style.images[0].stem if style.images else "")
            text = ",".join([t for t in [style.trigger, *style.style_tags, first] if t])
            prompts.append(SamplePrompt(text, style=style.name, object=first))
    return prompts

