"""`LoraLoaderMixin` for pipelines, and merging a LoRA into a diffusers model folder.

The pipeline inheriting the mixin has attributes `unet`, `text_encoder` (and optionally
`text_encoder_2`); method names mirror diffusers' `StableDiffusionLoraLoaderMixin`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..weights import read_safetensors, read_safetensors_header, read_torch_pickle, save_safetensors
from . import inject
from .formats import COMPONENTS, kohya_name_table, load_lora_state
from .writing import save_lora_state
from .adapter_math import LoraError, strict_or_warn
from .state import LoraState, ModuleLora


class LoraLoaderMixin:
    """LoRA loading, saving, switching and fusing for a pipeline with `unet` / `text_encoder`."""

    lora_components = COMPONENTS

    # ----------------------------------------------------------------- helpers

    def _lora_models(self, components: Optional[Sequence[str]] = None) -> Dict[str, object]:
        names = self.lora_components if components is None else components
        return {c: getattr(self, c) for c in names if getattr(self, c, None) is not None}

    def get_list_adapters(self) -> Dict[str, List[str]]:
        """component -> adapter names loaded in it."""
        return {c: inject.list_adapters(m) for c, m in self._lora_models().items()
                if inject.list_adapters(m)}

    def _all_adapters(self) -> List[str]:
        names = []
        for per_model in self.get_list_adapters().values():
            names += [n for n in per_model if n not in names]
        return names

    def get_active_adapters(self) -> List[str]:
        names = []
        for m in self._lora_models().values():
            names += [n for n in inject.active_adapters(m) if n not in names]
        return names

    def lora_name_tables(self):
        """component -> kohya name table built from the live models' module names."""
        return {c: kohya_name_table([n for n, _ in m.named_modules()], c) for c, m in self._lora_models().items()}

    # ----------------------------------------------------------------- loading

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          strict: bool = True, scale: float = 1.0, weight_name: Optional[str] = None) -> str:
        """Load a LoRA file / folder / state dict (any supported format) as adapter `adapter_name`.

        Every key and module is checked before any model is changed: with strict=True any key
        that cannot be mapped or any module that does not fit raises `LoraError` naming them;
        with strict=False those are skipped and listed in a warning. The new adapter becomes
        active, alongside the already active ones, with multiplier `scale`. Returns its name.
        """
        models = self._lora_models()
        state = load_lora_state(pretrained_model_name_or_path_or_dict, self.lora_name_tables(), strict,
                                weight_name=weight_name)
        if adapter_name is None:
            adapter_name = f"default_{len(self._all_adapters())}"
        if adapter_name in self._all_adapters():
            raise LoraError(f"adapter name {adapter_name!r} is already in use; pass another adapter_name")
        plans, problems = {}, []
        for component in state.components():
            entries = state.component(component)
            if component not in models:
                problems.append(f"{component}: the pipeline has no {component} ({len(entries)} module(s))")
                continue
            plan, probs = inject.check_adapter_weights(models[component], entries, adapter_name)
            plans[component] = plan
            problems += [f"{component}.{p}" for p in probs]
        if problems:
            msg = (f"LoRA {_describe_source(pretrained_model_name_or_path_or_dict)}: "
                   f"{len(problems)} problem(s): " + "; ".join(problems))
            strict_or_warn(msg, strict)
        if not any(plans.values()) and not state.embeddings:
            raise LoraError(f"LoRA {_describe_source(pretrained_model_name_or_path_or_dict)}: nothing to load")
        self._load_bundled_embeddings(state.embeddings)
        for component, plan in plans.items():
            inject.apply_adapter_plan(models[component], plan, adapter_name, scale)
        return adapter_name

    def _load_bundled_embeddings(self, embeddings: Dict[str, np.ndarray]) -> None:
        """Textual Inversion embeddings bundled in a LoRA file (`bundle_emb.<token>.*`, as A1111 loads them).
        A token already loaded with the same vectors is kept; with other vectors it is an error."""
        if not embeddings:
            return
        if not hasattr(self, "load_textual_inversion"):
            raise LoraError(f"the LoRA file bundles embeddings {sorted(embeddings)}; this pipeline cannot load them")
        current = self.textual_inversion_embeddings()
        new = {}
        for token, vec in embeddings.items():
            if token in current and current[token].shape == vec.shape and np.allclose(current[token], vec):
                continue
            new[token] = vec
        if new:
            self.load_textual_inversion(list(new.values()), token=list(new))

    def lora_state(self, adapter_name: Optional[str] = None) -> LoraState:
        """The weights of one adapter over all components, as a format-independent `LoraState`."""
        adapter_name = self._single_adapter(adapter_name)
        modules: Dict[str, ModuleLora] = {}
        for component, m in self._lora_models().items():
            if adapter_name in inject.list_adapters(m):
                for path, entry in inject.get_adapter_weights(m, adapter_name).items():
                    modules[f"{component}.{path}"] = entry
        return LoraState(modules, {}, "jdiffusion-lora")

    def save_lora_weights(self, save_path: str, format: str = "diffusers", dtype: Optional[str] = "fp32",
                          adapter_name: Optional[str] = None, metadata: Optional[Dict[str, str]] = None,
                          base_model: Optional[str] = None,
                          embeddings: Optional[Dict[str, np.ndarray]] = None) -> str:
        """Write one adapter to `save_path` (a folder gets `pytorch_lora_weights.safetensors`).

        format "diffusers" (PEFT names, alphas in `lora_adapter_metadata`) or "kohya"
        (kohya / LyCORIS names, `.alpha`, `ss_*` metadata; `metadata` adds training settings).
        embeddings: Textual Inversion vectors {token: (N, D)} written into the same file (`bundle_emb`).
        Returns the file written.
        """
        state = self.lora_state(adapter_name)
        state.embeddings = dict(embeddings or {})
        if base_model is None and format == "kohya":
            base_model = self._guess_base_model()
        return save_lora_state(state, save_path, format=format, dtype=dtype, metadata=metadata,
                               base_model=base_model)

    def _single_adapter(self, adapter_name: Optional[str]) -> str:
        names = self._all_adapters()
        if adapter_name is None:
            if len(names) != 1:
                raise LoraError(f"pass adapter_name: the pipeline has adapters {names}")
            return names[0]
        if adapter_name not in names:
            raise LoraError(f"no adapter named {adapter_name!r}; the pipeline has {names}")
        return adapter_name

    def _guess_base_model(self) -> Optional[str]:
        if getattr(self, "text_encoder_2", None) is not None:
            return "sdxl_base_v1-0"
        unet = getattr(self, "unet", None)
        width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        return {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(width)

    # ----------------------------------------------------------------- switching

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None) -> None:
        """Make exactly these adapters active with these multipliers (default 1.0 each)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self._all_adapters()]
        if unknown:
            raise LoraError(f"unknown adapter(s) {unknown}; loaded: {self._all_adapters()}")
        for m in self._lora_models().values():
            inject.set_adapters(m, names, adapter_weights, check=False)

    def disable_lora(self) -> None:
        for m in self._lora_models().values():
            inject.enable_adapters(m, False)

    def enable_lora(self) -> None:
        for m in self._lora_models().values():
            inject.enable_adapters(m, True)

    def fuse_lora(self, lora_scale: float = 1.0, components: Optional[Sequence[str]] = None,
                  adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold the active (or named) adapters, times `lora_scale`, into the base weights.

        The original weights are kept; `unfuse_lora()` restores them exactly.
        """
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self._all_adapters()]
            if unknown:
                raise LoraError(f"unknown adapter(s) {unknown}; loaded: {self._all_adapters()}")
        for m in self._lora_models(components).values():
            inject.fuse(m, lora_scale, adapter_names, check=False)

    def unfuse_lora(self, components: Optional[Sequence[str]] = None) -> None:
        for m in self._lora_models(components).values():
            inject.unfuse(m)

    def delete_adapters(self, adapter_names: Union[str, Sequence[str]]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self._all_adapters():
                raise LoraError(f"no adapter named {name!r}; loaded: {self._all_adapters()}")
            for m in self._lora_models().values():
                if name in inject.list_adapters(m):
                    inject.delete_adapter(m, name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter and restore the original layers (fused weights stay fused)."""
        for m in self._lora_models().values():
            inject.unload(m)


def _describe_source(src) -> str:
    return "state dict" if isinstance(src, dict) else str(src)


# --------------------------------------------------------------------------- merge into a model folder

_COMPONENT_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _component_weights(folder: str):
    """(path of the weights file or index, list of files to replace) for one model folder."""
    for base in _COMPONENT_WEIGHT_NAMES:
        for ext in ("safetensors", "bin"):
            path = os.path.join(folder, f"{base}.{ext}")
            if os.path.isfile(path):
                return path, [path]
            index = path + ".index.json"
            if os.path.isfile(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return index, [index] + [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(f"no model weights in {folder}")


def _weight_keys(path: str) -> List[str]:
    """Tensor names of a weights file or index, reading only the safetensors header."""
    if path.endswith(".index.json"):
        with open(path) as f:
            return list(json.load(f)["weight_map"])
    if path.endswith(".safetensors"):
        return list(read_safetensors_header(path)[0])
    return list(read_torch_pickle(path))


def folder_module_names(model_dir: str) -> Dict[str, List[str]]:
    """component -> module names (weight keys without `.weight`) of a diffusers model folder."""
    out = {}
    for component in COMPONENTS:
        folder = os.path.join(model_dir, component)
        if os.path.isdir(folder):
            path, _ = _component_weights(folder)
            out[component] = [k[:-len(".weight")] for k in _weight_keys(path) if k.endswith(".weight")]
    if not out:
        raise FileNotFoundError(f"{model_dir} has no unet/ or text_encoder/ folder")
    return out


def _read_component(path: str):
    """(tensors, file dtype tag for writing back)."""
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors, dtypes = {}, {}
        for s in shards:
            t, d = _read_component(os.path.join(os.path.dirname(path), s))
            tensors.update(t)
            dtypes[d] = dtypes.get(d, 0) + 1
        return tensors, max(dtypes, key=dtypes.get)
    if path.endswith(".safetensors"):
        tensors, file_dtypes, _ = read_safetensors(path)
    else:
        tensors = read_torch_pickle(path)
        file_dtypes = {k: {np.dtype(np.float16): "F16"}.get(v.dtype, "F32") for k, v in tensors.items()}
    floats = [d for d in file_dtypes.values() if d in ("F32", "F16", "BF16")]
    tag = max(set(floats), key=floats.count) if floats else "F32"
    return tensors, {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[tag]


def merge_lora_into_weights(weights: Dict[str, Dict[str, np.ndarray]], lora, scale: float = 1.0, strict: bool = True,
                            weight_name: Optional[str] = None, source: str = "the model") -> Dict[str, Dict[str, np.ndarray]]:
    """component -> {weight key: merged weight} for every module the LoRA changes.

    `weights`: component -> diffusers-named state dict (numpy). W <- W + scale * delta (DoRA: its
    merged weight), kept in W's dtype. kohya names are mapped through the weights' own module names.
    """
    names = {c: [k[:-len(".weight")] for k in t if k.endswith(".weight")] for c, t in weights.items()}
    tables = {c: kohya_name_table(n, c) for c, n in names.items()}
    state = load_lora_state(lora, tables, strict, weight_name=weight_name)
    problems, updates = [], {}
    for component in state.components():
        if component not in weights:
            problems.append(f"{component}: {source} has no {component}")
            continue
        tensors = weights[component]
        known = {n: None for n in names[component]}
        for path, entry in state.component(component).items():
            name = inject.resolve_module_name(known, path)
            if name is None:
                problems.append(f"{component}.{path}: no such module")
                continue
            w = tensors[name + ".weight"]
            fitted, why = inject._fit_tensors(entry, tuple(w.shape))
            if fitted is None:
                problems.append(f"{component}.{path}: {why}")
                continue
            fitted_entry = ModuleLora(entry.kind, fitted, entry.alpha)
            updates.setdefault(component, {})[name + ".weight"] = fitted_entry.merged_weight(w, scale).astype(w.dtype)
    if problems:
        msg = f"merge of {_describe_source(lora)} into {source}: " + "; ".join(problems)
        strict_or_warn(msg, strict)
    return updates


def merge_lora_into_folder(model_dir: str, lora, out_dir: str, scale: float = 1.0, strict: bool = True,
                           weight_name: Optional[str] = None) -> Dict[str, int]:
    """Write a copy of the diffusers model folder `model_dir` to `out_dir` with the LoRA baked in.

    Works on the weight files directly (numpy): W <- W + scale * delta (DoRA: its merged
    weight), kept in each file's dtype; configs, tokenizer, scheduler and VAE are copied as
    they are. kohya names are mapped through the weight files' own module names.
    Returns component -> number of merged modules.
    """
    model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
    if model_dir == out_dir:
        raise ValueError("out_dir must differ from model_dir")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    weights, files = {}, {}
    for component in COMPONENTS:
        folder = os.path.join(model_dir, component)
        if os.path.isdir(folder):
            path, replaced = _component_weights(folder)
            files[component] = (path, replaced)
            weights[component] = _read_component(path)
    tensors_only = {c: w[0] for c, w in weights.items()}
    updates = merge_lora_into_weights(tensors_only, lora, scale, strict, weight_name, source=model_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    counts = {}
    for component, new in updates.items():
        tensors, dtype_tag = weights[component]
        tensors = {**tensors, **new}
        path, replaced = files[component]
        for f in replaced:
            os.remove(os.path.join(out_dir, os.path.relpath(f, model_dir)))
        base = os.path.basename(path).split(".")[0]
        base = "model" if base == "pytorch_model" else base
        save_safetensors(tensors, os.path.join(out_dir, component, base + ".safetensors"), dtype=dtype_tag)
        counts[component] = len(new)
    return counts
