"""Checkpoints: atomic folders, a `latest` pointer, keep-the-last-K, resumable training state.

    <output_dir>/checkpoints/
        checkpoint-000200/                   one complete checkpoint
            pytorch_lora_weights.safetensors  (diffusers format) and/or
            lora_kohya.safetensors            (kohya / A1111 format)
            ema/...                           the same files for the EMA weights (when ema_decay > 0)
            training_state/
                adapter.safetensors           trainable tensors, by our parameter names
                optimizer.safetensors         optimizer moments
                extra.safetensors             EMA tensors, LoRA-GA offsets
                state.json                    step, samples seen, config; written last
        latest                                the name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when every file in it is on
disk; only then does `latest` (itself written atomically) point at it. A crash, a full disk or a
kill at any moment leaves the previous checkpoint as the latest, never a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np

from ..weights import atomic_write_bytes, read_safetensors, save_safetensors

STATE_DIR = "training_state"
POINTER = "latest"
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoint folder names, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX)
             and os.path.isfile(os.path.join(root, n, STATE_DIR, "state.json"))]
    return sorted(names, key=lambda n: int(n[len(PREFIX):]))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint (the `latest` pointer, else the highest step)."""
    root = checkpoint_root(output_dir)
    pointer = os.path.join(root, POINTER)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if os.path.isfile(os.path.join(root, name, STATE_DIR, "state.json")):
            return os.path.join(root, name)
    names = list_checkpoints(root)
    return os.path.join(root, names[-1]) if names else None


def write_checkpoint(output_dir: str, step: int, write_files: Callable[[str], None], keep_last: int) -> str:
    """Create checkpoint `step` atomically: `write_files(tmp_folder)` fills it, then rename + pointer.

    Returns the final folder. On any error the temporary folder is removed and the previous
    checkpoint stays the latest.
    """
    root = checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        write_files(tmp)
        if not os.path.isfile(os.path.join(tmp, STATE_DIR, "state.json")):
            raise CheckpointError("internal error: a checkpoint without training_state/state.json")
        _fsync_dir(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. resumed and stopped at once)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_bytes(os.path.join(root, POINTER), [name.encode()])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last, keep=name)
    return final


def prune(root: str, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep`), and stale temp folders."""
    names = list_checkpoints(root)
    if keep_last > 0:
        for name in names[:-keep_last]:
            if name != keep:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for n in os.listdir(root):
        if n.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- training state

@contextlib.contextmanager
def writing(path: str):
    """Re-raise an OSError (a full disk, say) with the file being written in its message."""
    try:
        yield
    except OSError as e:
        if e.filename or (e.strerror and path in e.strerror):
            raise
        raise OSError(e.errno, f"{e.strerror or e} (writing {path})") from None


def save_training_state(folder: str, state: dict, adapter: Dict[str, np.ndarray],
                        optimizer: Dict[str, np.ndarray], extra: Dict[str, np.ndarray]) -> None:
    d = os.path.join(folder, STATE_DIR)
    os.makedirs(d, exist_ok=True)
    for name, arrays in (("adapter", adapter), ("optimizer", optimizer), ("extra", extra)):
        path = os.path.join(d, f"{name}.safetensors")
        with writing(path):
            save_safetensors(arrays, path)
    path = os.path.join(d, "state.json")
    with writing(path):
        atomic_write_bytes(path, [json.dumps(state, indent=2, sort_keys=True).encode()])


def load_training_state(checkpoint: str):
    """(state dict, adapter arrays, optimizer arrays, extra arrays) of a checkpoint folder."""
    d = os.path.join(checkpoint, STATE_DIR)
    path = os.path.join(d, "state.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint} is not a complete training checkpoint (no {STATE_DIR}/state.json)")
    with open(path) as f:
        state = json.load(f)
    arrays = []
    for name in ("adapter", "optimizer", "extra"):
        p = os.path.join(d, f"{name}.safetensors")
        if not os.path.isfile(p):
            raise CheckpointError(f"{checkpoint}: {STATE_DIR}/{name}.safetensors is missing")
        arrays.append(read_safetensors(p)[0])
    return (state, *arrays)


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """The checkpoint folder `resume` names: "" -> None, "latest" -> the newest (None if none), or a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    if os.path.isfile(os.path.join(resume, STATE_DIR, "state.json")):
        return resume
    nested = latest_checkpoint(resume)  # an output_dir was given
    if nested:
        return nested
    raise CheckpointError(f"--resume {resume}: not a checkpoint folder (no {STATE_DIR}/state.json) "
                          f"and no checkpoints under it")
