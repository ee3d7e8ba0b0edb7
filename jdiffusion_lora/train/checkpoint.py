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

With `output_name` (kohya's option) the kohya file is `<output_name>.safetensors`, and so is the diffusers
file when it is the only format (with both, the diffusers file is `<output_name>_diffusers.safetensors`).

A checkpoint folder is written under a temporary name and renamed when every file in it is on
disk; only then does `latest` (itself written atomically) point at it. A crash, a full disk or a
kill at any moment leaves the previous checkpoint as the latest, never a half-written one.

The second half writes and reads a `Trainer`'s state: `write_lora_files` (the LoRA in every
`save_formats`), `save_checkpoint`, `restore` (resume) and `clear_old_checkpoints` (a fresh run).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np

from .._runtime import jt
from ..weights import WeightsError, apply_umask, atomic_write_bytes, read_safetensors, save_safetensors
from . import adapters as ad
from . import distributed as dist
from .config import as_dict

if TYPE_CHECKING:
    from .trainer import Trainer

LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}
STATE_DIR = "training_state"
POINTER = "latest"
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    pass


def lora_file_name(fmt: str, output_name: str, formats: Sequence[str]) -> str:
    """The file name of the LoRA in format `fmt` (see the module docstring)."""
    if not output_name:
        return LORA_FILES[fmt]
    if fmt == "kohya" or len(formats) == 1:
        return f"{output_name}.safetensors"
    return f"{output_name}_diffusers.safetensors"


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
        apply_umask(tmp, 0o777)   # mkdtemp makes it 0700; a checkpoint folder is like any other folder
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


def _read_training_state(checkpoint: str):
    d = os.path.join(checkpoint, STATE_DIR)
    path = os.path.join(d, "state.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint} is not a complete training checkpoint (no {STATE_DIR}/state.json)")
    try:
        with open(path) as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} has no step number")
    arrays = []
    for name in ("adapter", "optimizer", "extra"):
        p = os.path.join(d, f"{name}.safetensors")
        if not os.path.isfile(p):
            raise CheckpointError(f"{checkpoint}: {STATE_DIR}/{name}.safetensors is missing")
        try:
            arrays.append(read_safetensors(p)[0])
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
    return (state, *arrays)


def previous_good_checkpoint(checkpoint: str) -> Optional[str]:
    """The newest checkpoint older than `checkpoint` (same folder) whose training state reads back whole."""
    root, name = os.path.split(os.path.abspath(checkpoint))
    step = _step_of(name)
    for older in reversed(list_checkpoints(root)):
        if step is None or _step_of(older) < step:
            try:
                _read_training_state(os.path.join(root, older))
            except CheckpointError:
                continue
            return os.path.join(root, older)
    return None


def _step_of(name: str) -> Optional[int]:
    digits = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def load_training_state(checkpoint: str):
    """(state dict, adapter arrays, optimizer arrays, extra arrays) of a checkpoint folder.

    A damaged checkpoint is a CheckpointError that names the previous complete one and how to resume from it.
    """
    try:
        return _read_training_state(checkpoint)
    except CheckpointError as e:
        previous = previous_good_checkpoint(checkpoint)
        hint = (f"the previous checkpoint {previous} is complete: resume from it with --resume {previous}"
                if previous else "there is no earlier complete checkpoint: start again with --overwrite")
        raise CheckpointError(f"cannot resume from {checkpoint}: it is damaged ({e}); {hint}") from None


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


# ---------------------------------------------------------------------------- a trainer's files

def lora_state(t: "Trainer", arrays: Optional[Dict[str, np.ndarray]] = None):
    """The trained LoRA (or `arrays`, e.g. the EMA weights) as a `LoraState` with the run's metadata."""
    c = t.c
    meta = {"jdiffusion_lora.trainer": "style-lora",
            "jdiffusion_lora.styles": ",".join(s.name for s in t.data.styles),
            "jdiffusion_lora.triggers": ",".join(s.trigger for s in t.data.styles),
            "jdiffusion_lora.base_model": c.base_model or "tiny",
            "jdiffusion_lora.prediction_type": t.prediction_type}
    state = ad.lora_state(t.pairs, t.alpha, arrays, t.ga_offsets, meta)
    if getattr(t, "ti", None) is not None:   # the styles' tokens travel in the LoRA file (bundle_emb)
        state.embeddings = t.ti.embeddings()
    return state


def write_lora_files(t: "Trainer", folder: str, arrays: Optional[Dict[str, np.ndarray]] = None,
                     step: Optional[int] = None) -> List[str]:
    """Write the LoRA into `folder` in every format of `save_formats`, each with the ss_* / modelspec.*
    metadata A1111 and ComfyUI show (lora_metadata.py); returns the paths."""
    from ..lora.writing import save_lora_state
    from .lora_metadata import training_metadata
    c = t.c
    state = lora_state(t, arrays)
    buckets = t.batches.buckets
    extra = training_metadata(
        c, t.data, prediction_type=t.prediction_type, network_dim=ad.total_rank(c, t.n_styles),
        network_alpha=t.alpha, base_model_version="sd_v2" if t.text_encoder.config.hidden_size == 1024 else "sd_v1",
        started_at=t.started_at, finished_at=time.time(), step=c.max_train_steps if step is None else step,
        bucket_info=buckets.info() if buckets is not None else None)
    paths = []
    for fmt in c.save_formats:
        path = os.path.join(folder, lora_file_name(fmt, c.output_name, c.save_formats))
        with writing(path):
            paths.append(save_lora_state(state, path, format=fmt, dtype=c.save_dtype, metadata=extra))
    return paths


def ema_arrays(t: "Trainer") -> Dict[str, np.ndarray]:
    """The EMA weights keyed like `adapters.adapter_arrays` ("<pair>.down" / "<pair>.up")."""
    out = {}
    values = {n: e.numpy() for n, e in zip(t.param_names, t.ema)}
    for p in t.pairs:
        out[p.name + ".down"] = values[p.name + ".lora_A.weight"]
        out[p.name + ".up"] = values[p.name + ".lora_B.weight"]
    return out


def write_final_lora(t: "Trainer") -> List[str]:
    """The finished run's LoRA files in output_dir (and output_dir/ema with EMA)."""
    paths = write_lora_files(t, t.c.output_dir)
    if getattr(t, "ti", None) is not None:   # also one diffusers learned_embeds file per token, and the pipeline
        from ..pipelines.textual_inversion import save_textual_inversion
        t.ti.write_back()
        for token, vec in t.ti.embeddings().items():
            path = os.path.join(t.c.output_dir, "embeddings", f"{token}.safetensors")
            with writing(path):
                paths.append(save_textual_inversion({token: vec}, path))
    if t.ema is not None:
        paths += write_lora_files(t, os.path.join(t.c.output_dir, "ema"), ema_arrays(t))
    return paths


def save_checkpoint(t: "Trainer", step: int) -> str:
    """Checkpoint `step`: LoRA files (and EMA's) + the training state; atomic (see `write_checkpoint`)."""
    c = t.c

    def write(folder):
        write_lora_files(t, folder, step=step)
        extra = {}
        if t.ema is not None:
            write_lora_files(t, os.path.join(folder, "ema"), ema_arrays(t), step=step)
            extra.update({f"ema.{n}": e.numpy() for n, e in zip(t.param_names, t.ema)})
        if getattr(t, "ti", None) is not None:
            extra["ti.vectors"] = t.ti.vectors.numpy()
        for name, (b0, a0) in t.ga_offsets.items():
            extra[f"ga.{name}.up"] = b0
            extra[f"ga.{name}.down"] = a0
        state = {"format": 1, "step": step, "optimizer_steps": t.optimizer.step_count,
                 "samples_seen": step * t.global_batch, "global_batch_size": t.global_batch, "world_size": t.world,
                 "rng": {"scheme": "per-sample numpy streams from (seed, sample index); jittor reseeded per step",
                         "seed": c.seed},
                 "prediction_type": t.prediction_type, "config": as_dict(c), "grad_scaler": t.scaler.state_dict()}
        save_training_state(folder, state, ad.adapter_arrays(t.pairs), t.optimizer.state_arrays(), extra)

    try:
        return write_checkpoint(c.output_dir, step, write, c.keep_last)
    except OSError as e:
        last = latest_checkpoint(c.output_dir)
        raise OSError(e.errno, f"could not save the checkpoint of step {step}: {e.strerror or e}; nothing "
                      f"half-written was kept, the latest checkpoint is {last or 'none'}") from None


# The batch split may change (train_batch_size, accumulation, world size): the global batch is kept instead.
RESUME_MUST_MATCH = ("seed", "rank", "pack_rank", "unet_targets", "text_encoder_targets", "optimizer", "lora_init",
                     "textual_inversion", "ti_num_vectors", "enable_bucket", "bucket_no_upscale",
                     "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")


def restore(t: "Trainer", checkpoint: str) -> None:
    """Load a checkpoint into a set-up trainer: adapters, optimizer, LoRA-GA offsets, EMA, step."""
    state, adapter, optimizer, extra = load_training_state(checkpoint)
    old = state.get("config", {})
    changed = [f"{k}: {old.get(k)!r} -> {getattr(t.c, k)!r}" for k in RESUME_MUST_MATCH
               if k in old and old[k] != getattr(t.c, k)]
    if changed:
        raise ValueError(f"cannot resume from {checkpoint}: these options differ from the checkpoint's: "
                         + "; ".join(changed))
    adopt_global_batch(t, checkpoint, state)
    if state.get("prediction_type", t.prediction_type) != t.prediction_type:
        raise ValueError(f"cannot resume: the checkpoint trained {state['prediction_type']}, "
                         f"this run {t.prediction_type}")
    ad.load_adapter_arrays(t.pairs, adapter)
    if getattr(t, "ti", None) is not None:
        if "ti.vectors" not in extra or extra["ti.vectors"].shape != tuple(t.ti.vectors.shape):
            raise ValueError(f"cannot resume from {checkpoint}: it has no Textual Inversion vectors of shape "
                             f"{tuple(t.ti.vectors.shape)}")
        t.ti.vectors.assign(jt.array(extra["ti.vectors"]))
    t.optimizer.load_state_arrays(optimizer, state["optimizer_steps"])
    t.scaler.load_state_dict(state.get("grad_scaler"))
    ga = {}
    for key, arr in extra.items():
        if key.startswith("ga."):
            name, side = key[3:].rsplit(".", 1)
            ga.setdefault(name, [None, None])[0 if side == "up" else 1] = arr
    t.ga_offsets = {k: (v[0], v[1]) for k, v in ga.items()}
    if t.ga_offsets:
        ad.reapply_ga_offsets(t.pairs, t.layers, t.ga_offsets, t.alpha)
    if t.c.ema_decay > 0:
        if any(k.startswith("ema.") for k in extra):
            t.ema = [jt.array(extra[f"ema.{n}"]) for n in t.param_names]
        else:
            t.ema = [jt.array(p.numpy()) for p in t.params]
    t.start_step = int(state["step"])
    t.print(f"resumed from {checkpoint} at step {t.start_step}")


def adopt_global_batch(t: "Trainer", checkpoint: str, state: dict) -> None:
    """A checkpoint resumes under any world size with the same data order: the same global batch (its
    samples are numbered step * global batch + ...), whatever its split into ranks x accumulation."""
    c, old = t.c, state.get("config", {})
    saved = int(state.get("global_batch_size") or
                old.get("train_batch_size", 1) * old.get("gradient_accumulation_steps", 1))
    if saved == t.global_batch:
        return
    if c.global_batch_size:
        raise ValueError(f"cannot resume from {checkpoint}: it trained with a global batch of {saved}, this run "
                         f"asks for global_batch_size {c.global_batch_size}")
    t.global_batch = t.batches.split(t.world, dist.rank(), saved)
    t.print(f"resume: keeping the checkpoint's global batch of {saved} = {t.world} rank(s) x "
            f"train_batch_size {c.train_batch_size} x {t.batches.accum} accumulation step(s)")


def clear_old_checkpoints(c, printer: Callable[[str], None] = print) -> None:
    """A fresh run never mixes its checkpoints with an earlier run's: refuse, or delete them (`overwrite`)."""
    old = latest_checkpoint(c.output_dir)
    if old is None:
        return
    if not c.overwrite:
        raise ValueError(f"{c.output_dir} already holds checkpoints of an earlier run (latest: {old}); "
                         f"continue it with --resume latest, or pass --overwrite to start again, "
                         f"or choose another --output-dir")
    if dist.is_writer():   # under mpirun only rank 0 deletes
        shutil.rmtree(checkpoint_root(c.output_dir))
    printer(f"overwrite: deleted the earlier run's checkpoints in {c.output_dir}")
