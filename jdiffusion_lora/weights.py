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
import math
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

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

def read_safetensors_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """(tensor entries by name, metadata, byte offset of the data section); the header's shape is checked."""
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
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    return header, metadata, 8 + n


def read_safetensors(path: str, mmap: bool = False) -> Tuple[Dict[str, np.ndarray], Dict[str, str], Dict[str, str]]:
    """Returns (tensors, file dtypes by name, header metadata).

    The header is untrusted: every entry's dtype, shape and byte range is checked against the
    data section before an array is made, and anything malformed is a WeightsError naming the file.
    mmap=True memory-maps the file: float32/float16/int tensors are read-only views of the mapping (no copy;
    pages are read when touched, and `release_pages(array)` gives them back once copied elsewhere).
    bfloat16 tensors are widened to float32 copies either way.
    """
    import mmap as mmap_module

    header, metadata, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        if mmap and os.path.getsize(path) > data_start:
            data = memoryview(mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ))[data_start:]
        else:
            f.seek(data_start)
            data = f.read()
    tensors, dtypes = {}, {}
    for name, info in header.items():
        dt, shape, start, end = _check_safetensors_entry(path, name, info, len(data))
        raw = data[start:end]
        if dt == "BF16":
            arr = bf16_bits_to_float32(np.frombuffer(raw, dtype="<u2"))
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_TO_NP[dt]).newbyteorder("<"))
            arr = arr.astype(_ST_TO_NP[dt], copy=not mmap)   # a view on little-endian machines when mapped
        tensors[name] = arr.reshape(shape)
        dtypes[name] = dt
    return tensors, dtypes, metadata


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array (see `read_safetensors(mmap=True)`) from this
    process: they count towards its resident memory until unmapped, and the data has been copied by now.
    A no-op for ordinary arrays."""
    import mmap as mmap_module

    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, memoryview) or not isinstance(base.obj, mmap_module.mmap) or base.obj.closed:
        return
    mapping = base.obj
    origin = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data   # address of the mapping
    start = arr.__array_interface__["data"][0] - origin
    page = mmap_module.PAGESIZE
    lo = start // page * page
    hi = min(len(mapping), start + arr.nbytes)
    if hi > lo and hasattr(mapping, "madvise"):
        mapping.madvise(mmap_module.MADV_DONTNEED, lo, hi - lo)


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_safetensors_entry(path: str, name: str, info, data_size: int):
    """(dtype, shape, start, end) of one header entry, after checking it against the data section."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: header entry is not an object")
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dt != "BF16" and dt not in _ST_TO_NP:
        raise WeightsError(f"{where} has unsupported dtype {dt!r}")
    if not isinstance(shape, list) or not all(_is_index(d) and d >= 0 for d in shape):
        raise WeightsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise WeightsError(f"{where}: data_offsets {offsets!r} is not a [start, end] byte range")
    start, end = offsets
    if end > data_size:
        raise WeightsError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                           f"{end} of the data section, which has {data_size})")
    itemsize = 2 if dt == "BF16" else np.dtype(_ST_TO_NP[dt]).itemsize
    numel = math.prod(shape)
    if numel * itemsize != end - start:
        raise WeightsError(f"{where}: shape {tuple(shape)} of {dt} needs {numel * itemsize} bytes, "
                           f"its data_offsets span {end - start}")
    return dt, tuple(shape), start, end


TEMP_PREFIX = ".tmp-"   # atomic_write_bytes' temp files: .tmp-<pid>-<random>


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str, mode: int = 0o666) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode a plain open()/mkdir() would (mode & ~umask)."""
    os.chmod(path, mode & ~_umask())


def atomic_write_bytes(path: str, chunks) -> None:
    """Write byte chunks to `path` through a temp file in the same folder and a rename.

    A crash or a full disk never leaves a half-written file under `path`; a killed process leaves
    at most a temp file named `.tmp-<pid>-...`, which `remove_stale_temp_files` deletes later. The
    file gets the usual permissions (0666 & ~umask), as if written directly.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete the temp files `atomic_write_bytes` left under `folder` (recursively) when a process was killed.

    Only files named `.tmp-<pid>-...` whose process is gone are removed (a live writer's file is
    kept, so two jobs sharing a folder never break each other). Returns the paths removed.
    """
    removed = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
                continue
            path = os.path.join(root, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


# The safetensors library writes tensors by dtype, widest first (its dtype enum, descending), then by name.
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64")


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None,
                      dtype: Optional[str] = None) -> list:
    """The bytes of a safetensors file as chunks [length, header, tensor data...], laid out as the
    safetensors library lays them out (so hashes of the data match files written by PyTorch tools).
    `dtype` in {None, "fp32", "fp16", "bf16"} casts floats."""
    entries = []
    for name in tensors:
        arr = np.asarray(tensors[name])
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            if dtype == "bf16":
                st, raw = "BF16", float32_to_bf16_bits(arr).astype("<u2").tobytes()
            else:
                arr = arr.astype({"fp32": np.float32, "fp16": np.float16}[dtype])
                st, raw = _NP_TO_ST[arr.dtype], arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        else:
            if arr.dtype not in _NP_TO_ST:
                raise WeightsError(f"cannot save tensor {name!r} of dtype {arr.dtype}")
            st, raw = _NP_TO_ST[arr.dtype], np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        entries.append((name, st, list(arr.shape), raw))
    entries.sort(key=lambda e: (-_ST_ORDER.index(e[1]), e[0]))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, st, shape, raw in entries:
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)), head, *(e[3] for e in entries)]


def save_safetensors(tensors: Dict[str, np.ndarray], path: str, metadata: Optional[Dict[str, str]] = None,
                     dtype: Optional[str] = None) -> None:
    """Write `tensors` to `path` atomically. `dtype` in {None, "fp32", "fp16", "bf16"} casts floats."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata, dtype))


# --------------------------------------------------------------------------- torch pickles

_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bf16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Storage:
    """One `data/<key>` entry of the archive as a flat numpy array (bfloat16 kept as raw uint16 bits)."""

    def __init__(self, key: str, type_name: str, flat: np.ndarray, bf16: bool):
        self.key, self.type_name, self.flat, self.bf16 = key, type_name, flat, bf16


class _TensorRef:
    """A tensor as the pickle describes it: storage, offset, size, stride, none of it checked yet.

    It becomes an array in `_materialize`, once its key is known, so a bad geometry can be
    reported as "file, key, what is wrong" and no view is ever made of unchecked numbers.
    """

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def to_numpy(self, path: str, key: str) -> np.ndarray:
        where = f"{path}: tensor {key!r}"
        st = self.storage
        if not isinstance(st, _Storage):
            raise WeightsError(f"{where} is not backed by a storage record")
        size, stride, offset = self.size, self.stride, self.offset
        if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(_is_index(v) for v in (*size, *stride)) and _is_index(offset)):
            raise WeightsError(f"{where}: malformed geometry (size {size!r}, stride {stride!r}, offset {offset!r})")
        if offset < 0 or any(v < 0 for v in (*size, *stride)):
            raise WeightsError(f"{where}: negative size, stride or offset (size {size}, stride {stride}, "
                               f"offset {offset})")
        n_storage = st.flat.size
        numel = math.prod(size)
        if numel == 0:
            arr = np.zeros(size, dtype=st.flat.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))  # the highest element read
            if last >= n_storage:
                raise WeightsError(f"{where}: size {size}, stride {stride} and offset {offset} reach element "
                                   f"{last} of storage data/{st.key}, which holds {n_storage} "
                                   f"{st.type_name} element(s)")
            if numel > n_storage:
                raise WeightsError(f"{where}: shape {size} has {numel} values, more than its storage "
                                   f"data/{st.key} holds ({n_storage})")
            itemsize = st.flat.dtype.itemsize
            # Every element read lies in [offset, last] of the storage: checked above.
            arr = np.array(np.lib.stride_tricks.as_strided(st.flat[offset:], shape=size,
                                                           strides=tuple(s * itemsize for s in stride)))
        return bf16_bits_to_float32(arr) if st.bf16 else arr


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds tensors (as unchecked `_TensorRef`s) and plain containers; refuses every other global."""

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
        raise WeightsError(f"torch pickle refers to {module}.{name}, which is not a tensor; refusing to load it "
                           f"(no code from a weights file is ever run)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_index(pid[4])):
            raise WeightsError(f"unknown persistent id {pid!r:.80} in torch pickle")
        _kind, storage_type, key, _location, numel = pid
        return self._read_storage(key, storage_type.name, numel)

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, *unused):
        return _TensorRef(storage, offset, size, stride)


TorchUnpickler = _TorchUnpickler  # public name for readers of other torch zip archives (TorchScript)


def _materialize(obj, path: str, key: str, seen: set):
    """Replace every `_TensorRef` in an unpickled tree by its checked numpy array (key = where it sits)."""
    if isinstance(obj, _TensorRef):
        return obj.to_numpy(path, key or "<root>")
    if id(obj) in seen:          # a pickle can build cycles
        return obj
    seen.add(id(obj))
    join = (lambda k: f"{key}.{k}") if key else str
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _materialize(obj[k], path, join(k), seen)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, path, join(i), seen) for i, v in enumerate(obj)]
    elif isinstance(obj, tuple):
        return tuple(_materialize(v, path, join(i), seen) for i, v in enumerate(obj))
    elif isinstance(getattr(obj, "attrs", None), dict):   # TorchScript module objects
        _materialize(obj.attrs, path, key, seen)
    return obj


def unpickle_torch_zip(path: str, unpickler_class=_TorchUnpickler, what: str = "torch checkpoint"):
    """Unpickle `data.pkl` of a torch zip archive, tensors rebuilt from its `data/` entries as numpy.

    `unpickler_class` (a `TorchUnpickler` subclass) decides which globals are allowed. Every
    tensor's storage, dtype size, offset, shape and strides are checked before an array is made.
    Anything damaged or hostile raises WeightsError naming the file (and the tensor).
    """
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise WeightsError(f"{path}: zip file has no data.pkl, not a {what}")
        prefix = pkl[0][: -len("data.pkl")]
        storages: Dict[str, _Storage] = {}

        def read_storage(key, type_name, numel):
            if key in storages:
                return storages[key]
            name = f"{prefix}data/{key}"
            dt = _TORCH_STORAGE_DTYPES[type_name]
            itemsize = 2 if dt == "bf16" else np.dtype(dt).itemsize
            info = zf.getinfo(name)
            if info.file_size != numel * itemsize:
                raise WeightsError(f"{path}: storage data/{key} holds {info.file_size} bytes, but the pickle "
                                   f"declares {numel} {type_name} element(s) of {itemsize} bytes")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1000 * info.compress_size + (1 << 20):
                raise WeightsError(f"{path}: storage data/{key} expands {info.compress_size} -> "
                                   f"{info.file_size} bytes; refusing it")
            raw = zf.read(name)
            if dt == "bf16":
                flat, bf16 = np.frombuffer(raw, dtype="<u2"), True
            else:
                flat, bf16 = np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<")).astype(dt), False
            storages[key] = _Storage(key, type_name, flat, bf16)
            return storages[key]

        with zf.open(pkl[0]) as fh:
            obj = unpickler_class(fh, read_storage).load()
        return _materialize(obj, path, "", set())
    except WeightsError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise WeightsError(f"{path}: {e}") from None
    except RecursionError:
        raise WeightsError(f"{path}: corrupt {what} (nested too deeply)") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, KeyError, pickle.UnpicklingError, struct.error,
            ValueError, TypeError, AttributeError, IndexError, OverflowError, UnicodeDecodeError,
            MemoryError, OSError, NotImplementedError, RuntimeError, ImportError) as e:
        # The pickle machine and the zip reader report damage as any of these.
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise WeightsError(f"{path}: corrupt or truncated {what} ({type(e).__name__}: {e})") from None


def is_zip(path: str) -> bool:
    """zipfile.is_zipfile, except that a damaged end record means "no" instead of an exception."""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, struct.error):
        return False


def read_torch_pickle(path: str) -> Dict[str, np.ndarray]:
    if not is_zip(path):
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
    bad = [k for k, v in obj.items() if isinstance(v, np.ndarray) and not isinstance(k, str)]
    if bad:
        raise WeightsError(f"{path}: tensor names must be strings, found {bad[0]!r}")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def load_weights(path: str, mmap: bool = False) -> Dict[str, np.ndarray]:
    """Load a `.safetensors` or torch pickle file into a dict of numpy arrays (memory-mapped views of a
    safetensors file with mmap=True)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path, mmap=mmap)[0]
    return read_torch_pickle(path)
