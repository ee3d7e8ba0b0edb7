"""Reading and writing weight files without torch.

Supported:
- `.safetensors` (read and write; float32/float16/bfloat16/int and bool tensors);
- PyTorch pickles (`.bin`, `.pt`, `.pth`, `.ckpt`) in torch's zip format, read with a
  restricted unpickler that only rebuilds tensors and plain containers.

Arrays are returned as numpy. numpy has no bfloat16: bfloat16 tensors are widened to
float32 (exactly) and `load_weights(..., return_dtypes=True)` reports their file dtype.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np


class WeightsError(ValueError):
    """A weights file is missing, corrupt, truncated or of an unknown kind."""


# safetensors dtype names <-> numpy dtypes ("BF16" is handled separately).
_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) and return its bits as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


# --------------------------------------------------------------------------- safetensors

def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, str]]:
    """Returns (tensors, file dtypes by name, header metadata)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
        data = f.read()
    metadata = header.pop("__metadata__", None) or {}
    tensors, dtypes = {}, {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > len(data):
            raise WeightsError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                               f"{end} of the data section, which has {len(data)})")
        raw = data[start:end]
        dt, shape = info["dtype"], tuple(info["shape"])
        if dt == "BF16":
            arr = bf16_bits_to_float32(np.frombuffer(raw, dtype="<u2"))
        elif dt in _ST_TO_NP:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_TO_NP[dt]).newbyteorder("<")).astype(_ST_TO_NP[dt])
        else:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        if arr.size != int(np.prod(shape)):
            raise WeightsError(f"{path}: tensor {name!r} has {arr.size} values for shape {shape}")
        tensors[name] = arr.reshape(shape)
        dtypes[name] = dt
    return tensors, dtypes, metadata


def atomic_write_bytes(path: str, chunks) -> None:
    """Write byte chunks to `path` through a temp file in the same folder and a rename.

    A crash or a full disk never leaves a half-written file under `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(tensors: Dict[str, np.ndarray], path: str, metadata: Optional[Dict[str, str]] = None,
                     dtype: Optional[str] = None) -> None:
    """Write `tensors` to `path` atomically. `dtype` in {None, "fp32", "fp16", "bf16"} casts floats."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            if dtype == "bf16":
                st, raw = "BF16", float32_to_bf16_bits(arr).astype("<u2").tobytes()
            else:
                np_dt = {"fp32": np.float32, "fp16": np.float16}[dtype]
                arr = arr.astype(np_dt)
                st, raw = _NP_TO_ST[arr.dtype], arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        else:
            if arr.dtype not in _NP_TO_ST:
                raise WeightsError(f"cannot save tensor {name!r} of dtype {arr.dtype}")
            st, raw = _NP_TO_ST[arr.dtype], np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    atomic_write_bytes(path, [struct.pack("<Q", len(head)), head, *blobs])


# --------------------------------------------------------------------------- torch pickles

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bf16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds tensors as numpy arrays; refuses every other global (no code runs)."""

    def __init__(self, fh, read_storage):
        super().__init__(fh)
        self._read_storage = read_storage
        self.dtypes: Dict[int, str] = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks, *a: data
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        raise WeightsError(f"torch pickle refers to {module}.{name}, which is not a tensor; refusing to load it")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise WeightsError(f"unknown persistent id {kind!r} in torch pickle")
        return self._read_storage(key, storage_type.name, numel)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *unused):
        flat, bf16 = storage
        itemsize = flat.dtype.itemsize
        if len(size) == 0:
            arr = flat[offset:offset + 1].reshape(())
        else:
            arr = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                                  strides=tuple(s * itemsize for s in stride))
        arr = np.array(arr)  # own the memory, contiguous
        return bf16_bits_to_float32(arr) if bf16 else arr


TorchUnpickler = _TorchUnpickler  # public name for readers of other torch zip archives (TorchScript)


def unpickle_torch_zip(path: str, unpickler_class=_TorchUnpickler, what: str = "torch checkpoint"):
    """Unpickle `data.pkl` of a torch zip archive, tensors rebuilt from its `data/` entries as numpy.

    `unpickler_class` (a `TorchUnpickler` subclass) decides which globals are allowed.
    Damaged archives raise WeightsError naming the file.
    """
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise WeightsError(f"{path}: zip file has no data.pkl, not a {what}")
        prefix = pkl[0][: -len("data.pkl")]

        def read_storage(key, type_name, numel):
            raw = zf.read(f"{prefix}data/{key}")
            dt = _TORCH_STORAGE_DTYPES[type_name]
            if dt == "bf16":
                return np.frombuffer(raw, dtype="<u2"), True
            return np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt), False

        with zf.open(pkl[0]) as fh:
            return unpickler_class(fh, read_storage).load()
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, struct.error) as e:
        raise WeightsError(f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from None


def read_torch_pickle(path: str) -> Dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x80\x02":
            raise WeightsError(f"{path}: legacy (pre-1.6) torch format; re-save it as .safetensors")
        raise WeightsError(f"{path}: not a torch zip checkpoint or it is truncated")
    obj = unpickle_torch_zip(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def load_weights(path: str) -> Dict[str, np.ndarray]:
    """Load a `.safetensors` or torch pickle file into a dict of numpy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)[0]
    return read_torch_pickle(path)
