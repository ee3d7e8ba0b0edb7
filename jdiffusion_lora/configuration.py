"""Config files: the one `ConfigError`, reading a config JSON of a diffusers-layout folder, and the allowed
ranges of numeric options (`Range`, `check_ranges`: the train config and the txt2img / generate commands).

`ConfigError` is raised for a model's or scheduler's config.json that asks for something this
implementation does not support, and for a training option that is unknown, of the wrong type or out
of range (`train/config.py`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional


class ConfigError(ValueError):
    """A configuration asks for something unknown, unsupported, of the wrong type or out of range."""


def read_config_json(folder: str, name: str = "config.json", what: str = "model") -> Dict[str, Any]:
    """The JSON object in `<folder>/<name>` (a model's config.json, a scheduler_config.json).

    A missing folder or file is a FileNotFoundError naming it; bad JSON or a non-object a ConfigError.
    """
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {name}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: finite, within [lo, hi] (either end open), a multiple of `step`."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    multiple_of: int = 0

    def allows(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        if self.hi is not None and not (v < self.hi if self.hi_open else v <= self.hi):
            return False
        return not self.multiple_of or v % self.multiple_of == 0

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi}"
        else:
            text = "a finite number"
        return f"a multiple of {self.multiple_of} {text}" if self.multiple_of else text


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
PROBABILITY, BELOW_1 = Range(0, 1), Range(0, 1, hi_open=True)
SEED_RANGE = Range(0, 2 ** 32 - 1)
PIXELS = Range(8, multiple_of=8)   # the VAE halves the size three times
GUIDANCE = Range(0)


def check_ranges(values: Dict[str, Any], ranges: Dict[str, Range]) -> None:
    """Raise ConfigError for the first value outside its range, naming the option, its flag and the range."""
    for name, rule in ranges.items():
        value = values.get(name)
        if value is not None and not rule.allows(value):
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be {rule.describe()}, got {value!r}")
