"""Config files: the one `ConfigError`, and reading a config JSON of a diffusers-layout folder.

`ConfigError` is raised for a model's or scheduler's config.json that asks for something this
implementation does not support, and for a training option that is unknown, of the wrong type or out
of range (`train/config.py`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict


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
