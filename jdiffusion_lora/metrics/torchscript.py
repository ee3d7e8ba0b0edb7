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

import pickle
import struct
import zipfile
from typing import Dict

import numpy as np

from ..weights import WeightsError, _TORCH_STORAGE_DTYPES, _TorchUnpickler


class _ScriptObject:
    """Stand-in for a TorchScript module object: keeps its attribute dict, nothing else."""

    def __init__(self, *args):
        self.attrs = {}

    def __setstate__(self, state):
        self.attrs = state if isinstance(state, dict) else {}


class _ScriptUnpickler(_TorchUnpickler):
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
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
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
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise WeightsError(f"{path}: not a TorchScript archive (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]

        def read_storage(key, type_name, numel):
            raw = zf.read(f"{prefix}data/{key}")
            dt = _TORCH_STORAGE_DTYPES[type_name]
            if dt == "bf16":
                return np.frombuffer(raw, dtype="<u2"), True
            return np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt), False

        with zf.open(pkl[0]) as fh:
            root = _ScriptUnpickler(fh, read_storage).load()
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt TorchScript archive ({type(e).__name__}: {e})") from None
    if not isinstance(root, _ScriptObject):
        raise WeightsError(f"{path}: TorchScript archive does not hold a module")
    out: Dict[str, np.ndarray] = {}
    _flatten(root, "", out, set())
    return out
