"""Writing a `LoraState` as a LoRA file: "diffusers" (PEFT names + `lora_adapter_metadata`) or "kohya"
(kohya/LyCORIS names, `.alpha`, `ss_*` metadata), as safetensors in fp32/fp16/bf16; converting files;
guessing the base model a LoRA was made for. The names and keys are those `formats.py` reads.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..weights import save_safetensors
from .adapter_math import LoraError
from .formats import (LORA_WEIGHT_NAMES, LYCORIS_ROLE_TO_SUFFIX, METADATA_KEY, bundle_embedding_tensors,
                      canonical_text_path, kohya_name, load_lora_state)
from .state import LoraState, ModuleLora


def _most_common(values):
    """The most frequent value; ties go to the smallest, so the result does not depend on order."""
    counts = collections.Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _alpha_or_rank(entry: ModuleLora):
    a = entry.alpha if entry.alpha is not None else entry.rank
    return int(a) if a is not None and float(a).is_integer() else a


def to_diffusers(state: LoraState) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, header metadata) in diffusers/PEFT layout, loadable by diffusers' `load_lora_weights`."""
    tensors, problems = {}, []
    config = {}
    for component in state.components():
        entries = state.component(component)
        text = component.startswith("text_encoder")
        ranks, alphas, targets, dora = {}, {}, [], set()
        for path, entry in entries.items():
            if entry.kind != "lora" or "mid" in entry.tensors:
                what = "LoCon Tucker (lora_mid)" if entry.kind == "lora" else entry.kind
                problems.append(f"{component}.{path}: {what} adapters cannot be loaded by diffusers' Stable "
                                "Diffusion LoRA loader; save with format='kohya' (LyCORIS names)")
                continue
            file_path = canonical_text_path(path) if text else path
            key = f"{component}.{file_path}"
            tensors[f"{key}.lora_A.weight"] = entry.tensors["down"]
            tensors[f"{key}.lora_B.weight"] = entry.tensors["up"]
            if entry.uses_dora:
                m = entry.tensors["magnitude"]
                if m.ndim > 1 and m.shape[0] == 1 and m.size > 1:   # (1, in, ...): per input column
                    problems.append(f"{component}.{path}: DoRA normalised per input column (old LyCORIS) has no "
                                    "PEFT form; save with format='kohya'")
                    continue
                conv = entry.tensors["up"].ndim == 4
                tensors[f"{key}.lora_magnitude_vector"] = m.reshape(1, -1, 1, 1) if conv else m.reshape(-1)
                dora.add(True)
            else:
                dora.add(False)
            # PEFT matches target/pattern keys as name suffixes: text paths without `text_model.`
            # match both transformers 4 (text_model.encoder...) and 5 (encoder...) CLIP models.
            meta_path = path[len("text_model."):] if text and path.startswith("text_model.") else path
            targets.append(meta_path)
            ranks[meta_path] = entry.rank
            alphas[meta_path] = _alpha_or_rank(entry)
        if len(dora) > 1:
            problems.append(f"{component}: DoRA on some modules only; PEFT's use_dora applies to all")
        if not ranks:
            continue
        r = _most_common(ranks.values())
        lora_alpha = _most_common(alphas.values())
        config.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": lora_alpha,
            f"{component}.rank_pattern": {p: v for p, v in ranks.items() if v != r},
            f"{component}.alpha_pattern": {p: v for p, v in alphas.items() if v != lora_alpha},
            f"{component}.target_modules": sorted(targets),
            f"{component}.use_dora": dora == {True},
            f"{component}.init_lora_weights": True,
            f"{component}.lora_dropout": 0.0,
            f"{component}.bias": "none",
        })
    if problems:
        raise LoraError("cannot write diffusers format: " + "; ".join(problems))
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata


def guess_base_model(state: LoraState) -> Optional[str]:
    """kohya's ss_base_model_version from tensor widths: "sd_v1", "sd_v2", "sdxl_base_v1-0" or None."""
    comps = state.components()
    if "text_encoder_2" in comps:
        return "sdxl_base_v1-0"
    for key, entry in state.modules.items():
        if entry.kind != "lora":
            continue
        if key.startswith("text_encoder.") and key.endswith(("q_proj", "k_proj", "v_proj")):
            width = entry.tensors["down"].shape[1]
            return {768: "sd_v1", 1024: "sd_v2", 1280: "sdxl_base_v1-0"}.get(width)
        if key.startswith("unet.") and ".attn2.to_k" in key:
            width = entry.tensors["down"].shape[1]
            return {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}.get(width)
    return None


def to_kohya(state: LoraState, base_model: Optional[str] = None,
             extra_metadata: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, header metadata) with kohya / LyCORIS names and `ss_*` metadata."""
    sdxl = "text_encoder_2" in state.components()
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors: Dict[str, np.ndarray] = {}
    seen: Dict[str, str] = {}
    kinds, ranks, alphas, conv_ranks, conv_alphas = set(), [], [], [], []
    for key, entry in state.modules.items():
        component, path = key.split(".", 1)
        if component.startswith("text_encoder"):
            path = canonical_text_path(path)
        name = prefix[component] + kohya_name(path)
        if name in seen:
            raise LoraError(f"{key} and {seen[name]} have the same kohya name {name}")
        seen[name] = key
        t = entry.tensors
        kinds.add(entry.kind)
        if entry.kind == "lora":
            tensors[f"{name}.lora_down.weight"] = t["down"]
            tensors[f"{name}.lora_up.weight"] = t["up"]
            if "mid" in t:
                tensors[f"{name}.lora_mid.weight"] = t["mid"]
        else:
            for role, value in t.items():
                if role != "magnitude":
                    tensors[f"{name}.{LYCORIS_ROLE_TO_SUFFIX[(entry.kind, role)]}"] = value
        if entry.uses_dora:
            m = t["magnitude"]
            if m.ndim == 1:   # PEFT (out,) -> LyCORIS (out, 1[, 1, 1])
                ndim = t["up"].ndim if entry.kind == "lora" else 2
                m = m.reshape(-1, *([1] * (ndim - 1)))
            tensors[f"{name}.dora_scale"] = m
        alpha = entry.alpha if entry.alpha is not None else (entry.rank if entry.kind != "lokr" else None)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.asarray(alpha, dtype=np.float32)
        spatial = entry.kind == "lora" and t["down"].ndim == 4 and (t["down"].shape[2:] != (1, 1) or "mid" in t)
        if entry.rank is not None:
            (conv_ranks if spatial else ranks).append(entry.rank)
            (conv_alphas if spatial else alphas).append(_alpha_or_rank(entry))
    version = base_model or guess_base_model(state)
    lycoris = kinds != {"lora"} or any(e.uses_dora or "mid" in e.tensors for e in state.modules.values())
    args = {}
    if conv_ranks:
        args.update(conv_dim=str(_most_common(conv_ranks)), conv_alpha=str(_most_common(conv_alphas)))
    if lycoris:
        algo = (kinds - {"lora"}).pop() if len(kinds - {"lora"}) == 1 else "locon"
        args["algo"] = algo
        if any(e.uses_dora for e in state.modules.values()):
            args["dora_wd"] = "True"
    metadata = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(_most_common(ranks or conv_ranks or [1])),
        "ss_network_alpha": str(_most_common(alphas or conv_alphas or [1])),
        "ss_base_model_version": version or "sd_v1",
        "ss_v2": str(version == "sd_v2"),
    }
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    return tensors, metadata


def save_lora_state(state: LoraState, path: str, format: str = "diffusers", dtype: Optional[str] = "fp32",
                    metadata: Optional[Dict[str, str]] = None, base_model: Optional[str] = None) -> str:
    """Write `state` as a safetensors file (atomically). `path` may be a folder (diffusers' file name).

    format: "diffusers" or "kohya"; dtype: "fp32", "fp16", "bf16" or None (keep array dtypes).
    metadata: extra header entries (kohya: `ss_*` training settings). Both formats get the
    sshs_model_hash / sshs_legacy_hash that A1111 indexes LoRA files by (lora/metadata.py).
    Returns the file path.
    """
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        path = os.path.join(path, LORA_WEIGHT_NAMES[0])
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA files are written as .safetensors, got {path}")
    if dtype not in (None, "fp32", "fp16", "bf16"):
        raise ValueError(f"dtype must be fp32, fp16, bf16 or None, got {dtype!r}")
    if format == "diffusers":
        tensors, header = to_diffusers(state)
        header.update({k: str(v) for k, v in (metadata or {}).items()})
    elif format == "kohya":
        tensors, header = to_kohya(state, base_model, metadata)
    else:
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    tensors.update(bundle_embedding_tensors(state.embeddings))
    from .metadata import with_hashes
    save_safetensors(tensors, path, metadata=with_hashes(tensors, header, dtype), dtype=dtype)
    return path


def convert_lora_file(src: str, dst: str, to: str, dtype: Optional[str] = None, strict: bool = True,
                      name_tables=None) -> LoraState:
    """Read any supported LoRA file and write it in format `to` ("kohya" or "diffusers")."""
    state = load_lora_state(src, name_tables=name_tables, strict=strict)
    extra = {k: v for k, v in state.metadata.items() if k.startswith(("ss_", "sshs_", "modelspec."))} \
        if to == "kohya" else None
    save_lora_state(state, dst, format=to, dtype=dtype, metadata=extra)
    return state


def compatibility_report(state: LoraState) -> Dict[str, List[str]]:
    """Modules that diffusers' SD loader or A1111 would reject or drop, with the reason."""
    diffusers_issues, a1111_issues = [], []
    for key, entry in state.modules.items():
        if entry.kind != "lora":
            diffusers_issues.append(f"{key}: {entry.kind} (diffusers' Stable Diffusion loader reads LoRA only)")
        elif "mid" in entry.tensors:
            diffusers_issues.append(f"{key}: LoCon Tucker lora_mid (not read by diffusers)")
        if entry.uses_dora and state.source_format in ("kohya", "lycoris"):
            diffusers_issues.append(f"{key}: dora_scale (diffusers drops it from kohya files with a warning)")
    if state.source_format not in ("kohya", "lycoris"):
        a1111_issues.append(f"all {len(state.modules)} modules: A1111/ComfyUI expect kohya names "
                            "(lora_unet_..., lora_te_...); convert with `lora convert --to kohya`")
    return {"diffusers": diffusers_issues, "a1111": a1111_issues}
