"""Read the tensors of a TorchScript archive (`torch.jit.save`) without torch.

OpenAI distributes CLIP (`RN50.pt`, ...) as TorchScript, and piq / CLIP-IQA download that file.
An archive is a zip whose `data.pkl` pickles the module tree: one `__torch__.<Class>` object per
module whose attributes are tensors, sub-modules and plain values. Here every `__torch__` class
becomes an inert attribute holder (no code from the archive runs), tensors are rebuilt by the
same restricted loader as `weights.read_torch_pickle`, and the tree is flattened into
`torch.jit.load(path).state_dict()`-style names (`visual.layer1.0.conv1.weight`, ...), plus tensor
attributes that are not parameters (callers drop what they do not know).
"""
from __future__ import annotations

import zipfile
from typing import Dict

import numpy as np

from ...weights import TorchUnpickler, WeightsError, is_zip, unpickle_torch_zip


class _ScriptObject:
    """Stand-in for a TorchScript module object: keeps its attribute dict, nothing else."""

    def __init__(self, *args):
        self.attrs = {}

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


class _ScriptUnpickler(TorchUnpickler):
    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch.jit._pickle" and name in ("restore_type_tag",):
            return lambda value, _type: value
        if module == "torch.jit._pickle" and name.startswith("build_"):   # build_intlist, build_tensorlist, ...
            return lambda value: value
        if module == "builtins" and name in ("set", "frozenset", "list", "tuple", "dict"):
            return {"set": set, "frozenset": frozenset, "list": list, "tuple": tuple, "dict": dict}[name]
        return super().find_class(module, name)


def is_torchscript_archive(path: str) -> bool:
    """True for a zip with `code/` entries next to `data.pkl` (what torch.jit.save writes)."""
    if not is_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("data.pkl") for n in names)


def _flatten(obj, prefix: str, out: Dict[str, np.ndarray], seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for key, value in obj.attrs.items():
        if isinstance(value, np.ndarray):
            out[prefix + key] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, f"{prefix}{key}.", out, seen)


def read_torchscript_tensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a TorchScript archive's module tree, by dotted attribute path."""
    root = unpickle_torch_zip(path, _ScriptUnpickler, what="TorchScript archive")
    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"{path}: TorchScript archive does not hold a module")
    out: Dict[str, np.ndarray] = {}
    _flatten(root, "", out, set())
    return out
