"""Shared model plumbing: configs as dataclasses, diffusers-layout loading and saving.

Every model class here subclasses `ModelMixin` and declares `config_class`, a dataclass
whose field names are the diffusers / transformers `config.json` keys. Parameter names
are identical to diffusers, so a diffusers state dict loads with no renaming.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np

from .._runtime import jt
from ..configuration import ConfigError, read_config_json  # noqa: F401  (ConfigError: models raise it from here)
from ..weights import WeightsError, atomic_write_bytes, load_weights, release_pages, save_safetensors

nn = jt.nn

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def config_from_dict(config_class, data: Dict[str, Any], *, ignore: Iterable[str] = (), source: str = "config"):
    """Build `config_class` (a dataclass) from a config.json dict.

    Keys starting with "_" and keys in `ignore` are dropped. Any other key the dataclass
    does not have is an error unless its value is None/False/empty, so a model that needs a
    feature we lack (say `class_embed_type="timestep"`) fails loudly instead of running wrong.
    Lists become tuples.
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    kwargs, unsupported = {}, []
    for key, value in data.items():
        if key.startswith("_") or key in ignore:
            continue
        if key not in names:
            if value not in (None, False, [], {}, ""):
                unsupported.append(f"{key}={value!r}")
            continue
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if unsupported:
        raise ConfigError(f"{source}: {config_class.__name__} does not support " + ", ".join(unsupported))
    return config_class(**kwargs)


def _weights_file(folder: str, names: Tuple[str, ...], variant: Optional[str]) -> str:
    """Find the weights file of a model folder, preferring safetensors and the variant."""
    candidates = []
    for base in names:
        for ext in ("safetensors", "bin"):
            if variant:
                candidates.append(f"{base}.{variant}.{ext}")
            candidates.append(f"{base}.{ext}")
            candidates.append(f"{base}.{ext}.index.json")
    for c in candidates:
        if os.path.isfile(os.path.join(folder, c)):
            return os.path.join(folder, c)
    present = sorted(os.listdir(folder))
    raise FileNotFoundError(f"no weights in {folder}: looked for {', '.join(candidates[:4])} ...; "
                            f"the folder has {present}")


def read_model_weights(path: str, mmap: bool = False) -> Dict[str, np.ndarray]:
    """Load one weights file or a sharded `*.index.json` set (safetensors memory-mapped with mmap=True)."""
    if path.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        state = {}
        folder = os.path.dirname(path)
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_weights(os.path.join(folder, shard), mmap=mmap))
        return state
    return load_weights(path, mmap=mmap)


def to_model_dtype(x: "jt.Var", model) -> "jt.Var":
    """A float input cast to the dtype of `model`'s weights (a half model's first conv / matmul needs
    half inputs: Jittor's CPU conv fails on a float32 input with bfloat16 weights)."""
    dtype = model.dtype
    return x.cast(dtype) if x.dtype != dtype and x.dtype.is_float() else x


class ModelMixin(nn.Module):
    """Base for models loaded from a diffusers / transformers folder."""

    config_class: type = None
    config_ignore: Tuple[str, ...] = ()  # config.json keys that do not change the computation
    weights_names: Tuple[str, ...] = ("diffusion_pytorch_model", "model", "pytorch_model")
    save_weights_name: str = "diffusion_pytorch_model.safetensors"

    @classmethod
    def from_config(cls, config: Union[Dict[str, Any], Any], **overrides):
        if isinstance(config, dict):
            config = config_from_dict(cls.config_class, {**config, **overrides}, ignore=cls.config_ignore)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        return cls(config)

    @classmethod
    def load_config(cls, folder: str) -> Dict[str, Any]:
        return read_config_json(folder, "config.json", "model")

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = None, dtype: Optional[str] = None,
                        variant: Optional[str] = None, revision: Optional[str] = None, low_memory: bool = False):
        """Load a model saved by diffusers/transformers `save_pretrained` (or by `save_pretrained` here).

        `folder` may be a HuggingFace repository id (`org/name`), found in the local HF cache (no network).
        low_memory: keep Linear/Conv2d weights in bfloat16 and compute in float32 (see `low_memory.py`).
        """
        from ..hub import resolve_model
        folder = resolve_model(folder, revision)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        raw = cls.load_config(folder)
        model = cls(config_from_dict(cls.config_class, raw, ignore=cls.config_ignore,
                                     source=os.path.join(folder, "config.json")))
        path = _weights_file(folder, cls.weights_names, variant)
        try:
            state = read_model_weights(path, mmap=True)   # views of the file: no copy of the weights
        except WeightsError:
            raise
        except Exception as e:  # a library error on a damaged file: name the file
            raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
        if dtype is not None:   # cast each tensor as it is copied in: never a float32 copy of the whole model
            model.to_dtype(dtype)
        if low_memory:
            from .low_memory import store_weights_low_memory
            store_weights_low_memory(model)
        model.load_numpy_state_dict(state, source=path)
        del state
        model.eval()
        return model

    # ----------------------------------------------------------------- state dicts

    def numpy_state_dict(self) -> Dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.state_dict().items()}

    def load_numpy_state_dict(self, state: Dict[str, np.ndarray], source: str = "state dict",
                              strict: bool = True) -> None:
        """Copy arrays into the parameters, checking names and shapes.

        Values keep the parameter's dtype (Jittor's own loader would turn fp32 parameters into fp16).
        Each tensor is copied (and cast) on its own, and the pages of a memory-mapped file are released right
        after, so loading needs the model's size plus one tensor, not twice the model.
        """
        state = self.convert_state_dict(dict(state))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shapes = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
                      for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if bad_shapes:
            raise WeightsError(f"{source}: shape mismatch for {len(bad_shapes)} tensor(s): " + "; ".join(bad_shapes[:10]))
        if missing or unexpected:
            msg = (f"{source}: {len(missing)} missing key(s) {missing[:10]}, "
                   f"{len(unexpected)} unexpected key(s) {unexpected[:10]}")
            if strict:
                raise WeightsError(msg)
            warnings.warn(msg)
        for k, var in own.items():
            if k in state:
                arr = np.asarray(state[k])
                bf16 = str(var.dtype) == "bfloat16"
                if bf16:   # numpy has no bfloat16: Jittor casts from float32
                    value = jt.array(arr.astype(np.float32, copy=False)).cast("bfloat16")
                else:
                    value = jt.array(arr.astype(str(var.dtype), copy=False))
                var.assign(value)
                var.sync()
                release_pages(arr)
                if bf16 and arr.size >= 2 ** 20:
                    jt.gc()   # Jittor's allocator would keep every float32 temporary (a float32 model's worth)

    def convert_state_dict(self, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Hook for renames that older checkpoints need; default: none."""
        return state

    def to_dtype(self, dtype: str):
        """Cast every floating parameter to `dtype` ("float32", "float16", "bfloat16")."""
        target = DTYPES[dtype]
        for var in self.parameters():
            if var.dtype != target and "float" in str(var.dtype):
                var.assign(var.cast(target))
        return self

    # ----------------------------------------------------------------- gradient checkpointing

    def enable_gradient_checkpointing(self):
        """Recompute each ResNet / transformer block in the backward pass instead of keeping its
        activations (diffusers' name; see models/checkpointing.py)."""
        from .checkpointing import set_gradient_checkpointing
        set_gradient_checkpointing(self, True)
        return self

    def disable_gradient_checkpointing(self):
        from .checkpointing import set_gradient_checkpointing
        set_gradient_checkpointing(self, False)
        return self

    @property
    def is_gradient_checkpointing(self) -> bool:
        from .checkpointing import Checkpointable
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, Checkpointable))

    @property
    def dtype(self) -> str:
        if getattr(self, "_low_memory_storage", None):   # bf16 weights computed in float32 (low_memory.py)
            return "float32"
        for var in self.parameters():
            return str(var.dtype)
        return "float32"

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    def save_pretrained(self, folder: str, dtype: Optional[str] = None) -> None:
        """Write config.json and safetensors weights in diffusers layout (atomically)."""
        cfg = {"_class_name": self.__class__.__name__, **dataclasses.asdict(self.config)}
        atomic_write_bytes(os.path.join(folder, "config.json"),
                           [json.dumps(cfg, indent=2, sort_keys=True).encode("utf-8")])
        save_safetensors(self.numpy_state_dict(), os.path.join(folder, self.save_weights_name),
                         dtype={None: None, "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[
                             DTYPES.get(dtype) if dtype else None])
