"""Single-file Stable Diffusion checkpoints: read and write the original (A1111 / ComfyUI) layout.

    pipe = StableDiffusionPipeline.from_single_file("v1-5-pruned-emaonly.safetensors")
    save_single_file(pipe, "merged.safetensors")

Reading: `.safetensors` directly, `.ckpt` / `.pt` through the restricted unpickler of `weights.py`
(tensors and plain containers only; any other pickle global is refused, nothing is executed).

What a file does not say is inferred the way the original configs define it:
- SD 1.x vs 2.x: OpenAI CLIP (`cond_stage_model.transformer.*`) or OpenCLIP (`cond_stage_model.model.*`);
- sizes (channels, layers per block, attention blocks, context width, linear projections) from shapes;
- attention heads: SD 1.x has 8 heads per block, SD 2.x heads of 64 channels (`num_heads` /
  `num_head_channels` of an original YAML win);
- prediction type: SD 1.x epsilon; SD 2.x v-prediction (the 768-v models) unless the YAML has no
  `parameterization: v`, the `.ckpt` says `global_step` 875000 (the 512-base model), or the caller
  passes `prediction_type=`; a `v_pred` key (ComfyUI's marker) means v-prediction;
- the OpenCLIP tower of a Stability file has 24 blocks and a `text_projection`; SD 2.x uses the
  penultimate block, so the diffusers text encoder has 23 (the last block is ignored). Files written
  here hold only the blocks the model uses and no `text_projection`.
A diffusers folder passed as `config=` gives every config, tokenizer and scheduler instead.
"""
from __future__ import annotations

import os
import re
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

from ..models import single_file_keys as K
from ..weights import (WeightsError, read_safetensors, read_safetensors_header, read_torch_pickle, save_safetensors,
                       unpickle_torch_zip)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-sd", "tokenizer")


def is_single_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(SINGLE_FILE_SUFFIXES)


def read_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Optional[int]]:
    """(tensors, global_step or None) of a single-file checkpoint.

    Keys no model uses (`model_ema.*`, `alphas_cumprod`, CLIP's `position_ids`, ...) stay in the dict and are
    never looked at: each model picks its own tensors by name.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    step = None
    if path.lower().endswith(".safetensors"):
        tensors = read_safetensors(path)[0]
    elif not zipfile.is_zipfile(path):
        tensors = read_torch_pickle(path)  # raises the right error (legacy format, truncated)
    else:
        obj = unpickle_torch_zip(path)
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
        if isinstance(obj.get("global_step"), int):
            step = obj["global_step"]
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not any(k.startswith(K.UNET_PREFIX) for k in tensors):
        raise WeightsError(f"{path}: not a Stable Diffusion single-file checkpoint (no '{K.UNET_PREFIX}*' keys)")
    # Old CLIP dumps lack the `text_model.` level (transformers < 4.21).
    out = {}
    for k, v in tensors.items():
        if k.startswith(K.CLIP_PREFIX) and not k.startswith(K.CLIP_PREFIX + "text_model."):
            k = K.CLIP_PREFIX + "text_model." + k[len(K.CLIP_PREFIX):]
        out[k] = v
    return out, step


def read_original_yaml(path: str) -> dict:
    """The `model.params` of an original LDM config (`v2-inference-v.yaml`)."""
    try:
        import yaml
    except ImportError:
        raise ImportError("reading an original .yaml config needs PyYAML (pip install pyyaml)") from None
    with open(path) as f:
        data = yaml.safe_load(f)
    try:
        return data["model"]["params"]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not an original Stable Diffusion config (no model.params)") from None


# --------------------------------------------------------------------------- configs from the weights

def _indices(tensors, prefix: str) -> list:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in tensors for m in [pat.match(k)] if m})


def text_encoder_kind(tensors) -> str:
    if any(k.startswith(K.OPENCLIP_PREFIX) for k in tensors):
        return "openclip"
    if any(k.startswith(K.CLIP_PREFIX) for k in tensors):
        return "clip"
    raise WeightsError("the checkpoint has no text encoder (cond_stage_model.*)")


def infer_unet_config(t, openclip: bool, yaml_params: Optional[dict] = None) -> dict:
    P = K.UNET_PREFIX
    blocks = _indices(t, P + "input_blocks.")
    downsamplers = [i for i in blocks if P + f"input_blocks.{i}.0.op.weight" in t]
    n = len(downsamplers) + 1
    L = (len(blocks) - 1 - len(downsamplers)) // n
    channels = [int(t[P + f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight"].shape[0]) for i in range(n)]
    down_attn = [P + f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in t for i in range(n)]
    up_attn = [P + f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in t for i in range(n)]
    attn_key = next(k for k in t if k.startswith(P) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in t if k.startswith(P) and k.endswith("proj_in.weight"))
    first_attn = proj_in[:-len("proj_in.weight")]
    unet_yaml = ((yaml_params or {}).get("unet_config") or {}).get("params") or {}
    if unet_yaml.get("num_head_channels", -1) not in (-1, None):
        heads = [c // unet_yaml["num_head_channels"] for c in channels]
    elif unet_yaml.get("num_heads", -1) not in (-1, None):
        heads = unet_yaml["num_heads"]
    else:
        heads = [c // 64 for c in channels] if openclip else 8
    sample_size = unet_yaml.get("image_size") or (96 if openclip else 64)
    return {
        "sample_size": sample_size,
        "in_channels": int(t[P + "input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(t[P + "out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": L,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": int(t[attn_key].shape[1]),
        "attention_head_dim": heads,
        "use_linear_projection": t[proj_in].ndim == 2,
        "transformer_layers_per_block": len(_indices(t, first_attn + "transformer_blocks.")),
    }


def infer_vae_config(t, scaling_factor: float = 0.18215) -> dict:
    P = K.VAE_PREFIX
    levels = _indices(t, P + "encoder.down.")
    return {
        "in_channels": int(t[P + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(t[P + "decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(t[P + "post_quant_conv.weight"].shape[0]),
        "block_out_channels": [int(t[P + f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels],
        "layers_per_block": len(_indices(t, P + "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "scaling_factor": scaling_factor,
        "sample_size": 512,
    }


def infer_text_config(t, openclip: bool) -> dict:
    if openclip:
        P = K.OPENCLIP_PREFIX
        vocab, hidden = t[P + "token_embedding.weight"].shape
        n = len(_indices(t, P + "transformer.resblocks."))
        # Stability's full tower (with text_projection) is used up to its penultimate block.
        layers = n - 1 if P + "text_projection" in t else n
        return {"vocab_size": int(vocab), "hidden_size": int(hidden), "num_hidden_layers": layers,
                "intermediate_size": int(t[P + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                "num_attention_heads": int(hidden) // 64, "hidden_act": "gelu",
                "max_position_embeddings": int(t[P + "positional_embedding"].shape[0]),
                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 512}
    P = K.CLIP_PREFIX + "text_model."
    vocab, hidden = t[P + "embeddings.token_embedding.weight"].shape
    return {"vocab_size": int(vocab), "hidden_size": int(hidden),
            "num_hidden_layers": len(_indices(t, P + "encoder.layers.")),
            "intermediate_size": int(t[P + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_attention_heads": int(hidden) // 64, "hidden_act": "quick_gelu",
            "max_position_embeddings": int(t[P + "embeddings.position_embedding.weight"].shape[0]),
            "projection_dim": 768}


def infer_prediction_type(t, openclip: bool, yaml_params: Optional[dict], global_step: Optional[int]) -> str:
    if yaml_params is not None:
        return "v_prediction" if yaml_params.get("parameterization") == "v" else "epsilon"
    if "v_pred" in t:
        return "v_prediction"
    if not openclip or global_step == 875000:  # SD 2.x 512-base was saved at step 875000
        return "epsilon"
    return "v_prediction"


def scheduler_config(prediction_type: str, yaml_params: Optional[dict] = None) -> dict:
    y = yaml_params or {}
    return {"num_train_timesteps": int(y.get("timesteps", 1000)), "beta_start": float(y.get("linear_start", 0.00085)),
            "beta_end": float(y.get("linear_end", 0.012)), "beta_schedule": "scaled_linear", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": prediction_type,
            "timestep_spacing": "leading"}


# --------------------------------------------------------------------------- original <-> diffusers names

def original_name_map(component: str, keys, unet_config=None, vae_config=None, openclip=False) -> dict:
    """diffusers key -> (original key, q/k/v third or None) for every key of one component."""
    if component == "unet":
        L = unet_config["layers_per_block"]
        up_attn = [b.startswith("CrossAttn") for b in unet_config["up_block_types"]]
        return {k: (K.unet_key(k, L, up_attn), None) for k in keys}
    if component == "vae":
        n = len(vae_config["block_out_channels"])
        return {k: (K.vae_key(k, n), None) for k in keys}
    return {k: (K.openclip_key(k) if openclip else (K.clip_key(k), None)) for k in keys}


def component_from_original(t: Dict[str, np.ndarray], names: dict, shapes: dict, source: str) -> Dict[str, np.ndarray]:
    """Pick one component's tensors out of an original state dict, under diffusers names."""
    out, missing = {}, []
    for key, (orig, third) in names.items():
        if orig not in t:
            missing.append(orig)
            continue
        arr = t[orig]
        if third is not None:
            if arr.shape[0] % 3:
                raise WeightsError(f"{source}: {orig} has shape {arr.shape}, not three fused q/k/v parts")
            arr = np.split(arr, 3, axis=0)[third]
        want = tuple(shapes[key])
        if arr.shape != want and arr.size == int(np.prod(want)) and arr.ndim == 4:
            arr = arr.reshape(want)  # VAE attention: 1x1 conv -> linear
        out[key] = arr
    if missing:
        raise WeightsError(f"{source}: {len(missing)} tensor(s) missing for this model: {missing[:8]}")
    return out


def original_from_components(components: Dict[str, Dict[str, np.ndarray]], unet_config: dict, vae_config: dict,
                             openclip: bool) -> Dict[str, np.ndarray]:
    """Diffusers-named state dicts {"unet", "vae", "text_encoder"} -> one original-layout state dict."""
    out, fused = {}, {}
    for component, state in components.items():
        names = original_name_map(component, state, unet_config, vae_config, openclip)
        for key, arr in state.items():
            orig, third = names[key]
            if third is not None:
                fused.setdefault(orig, [None] * 3)[third] = arr
                continue
            if component == "vae" and K.is_vae_attention_weight(key) and arr.ndim == 2:
                arr = arr[:, :, None, None]
            out[orig] = arr
    for orig, parts in fused.items():
        out[orig] = np.concatenate(parts, axis=0)
    return out


# --------------------------------------------------------------------------- building the pipeline

def default_tokenizer(openclip: bool, config_folder: Optional[str]):
    """SD 1.x: CLIP's tokenizer; SD 2.x: the same vocabulary padding with "!" (id 0), as its folder says."""
    from ..models.clip_tokenizer import CLIPTokenizer
    if config_folder:
        return CLIPTokenizer.from_pretrained(os.path.join(config_folder, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(_TOKENIZER_DIR)
    if openclip:
        tok = CLIPTokenizer(tok.encoder, list(tok.bpe_ranks), pad_token="!")
    return tok


def single_file_configs(t, global_step=None, config: Optional[str] = None, original_config: Optional[str] = None,
                        prediction_type: Optional[str] = None):
    """(unet, vae, text encoder, scheduler) config dicts of an original state dict (or of its shapes)."""
    import json

    openclip = text_encoder_kind(t) == "openclip"
    yaml_params = read_original_yaml(original_config) if original_config else None
    if config:
        def cfg(sub, name="config.json"):
            with open(os.path.join(config, sub, name)) as f:
                return json.load(f)
        unet_cfg, vae_cfg, text_cfg = cfg("unet"), cfg("vae"), cfg("text_encoder")
        sched_cfg = cfg("scheduler", "scheduler_config.json")
    else:
        unet_cfg = infer_unet_config(t, openclip, yaml_params)
        vae_cfg = infer_vae_config(t, float((yaml_params or {}).get("scale_factor", 0.18215)))
        text_cfg = infer_text_config(t, openclip)
        sched_cfg = scheduler_config(infer_prediction_type(t, openclip, yaml_params, global_step), yaml_params)
    if prediction_type:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        sched_cfg = {**sched_cfg, "prediction_type": prediction_type}
    return unet_cfg, vae_cfg, text_cfg, sched_cfg


class _Shape:
    """Stands in for a tensor when only its shape is wanted (the dry run reads no weights)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def read_checkpoint_shapes(path: str) -> dict:
    """Key -> object with `.shape`; for .safetensors from the header alone (nothing else is read)."""
    if not path.lower().endswith(".safetensors"):
        return read_checkpoint(path)[0]
    entries = read_safetensors_header(path)[0]
    return {k: _Shape(v["shape"]) for k, v in entries.items()}


def load_single_file(path: str, config: Optional[str] = None, original_config: Optional[str] = None,
                     prediction_type: Optional[str] = None, dtype: Optional[str] = None) -> dict:
    """The five pipeline components of a single-file checkpoint.

    config: a diffusers folder whose configs, tokenizer and scheduler to use (e.g. the model's own
    repository in the HF cache); original_config: the original LDM `.yaml`; prediction_type:
    "epsilon" | "v_prediction" (wins over both).
    """
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.clip import CLIPTextModel
    from ..models.unet_2d_condition import UNet2DConditionModel
    from ..schedulers import SCHEDULERS, DDIMScheduler

    t, step = read_checkpoint(path)
    unet_cfg, vae_cfg, text_cfg, sched_cfg = single_file_configs(t, step, config, original_config, prediction_type)
    openclip = text_encoder_kind(t) == "openclip"
    models = {"unet": UNet2DConditionModel.from_config(unet_cfg), "vae": AutoencoderKL.from_config(vae_cfg),
              "text_encoder": CLIPTextModel.from_config(text_cfg)}
    for name, model in models.items():
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        names = original_name_map(name, shapes, unet_cfg, vae_cfg, openclip)
        model.load_numpy_state_dict(component_from_original(t, names, shapes, f"{path} ({name})"), source=path)
        if dtype is not None:
            model.to_dtype(dtype)
        model.eval()
    scheduler_cls = SCHEDULERS.get(sched_cfg.get("_class_name", "DDIMScheduler"), DDIMScheduler)
    scheduler = scheduler_cls.from_config({k: v for k, v in sched_cfg.items() if not k.startswith("_")})
    return {**models, "tokenizer": default_tokenizer(openclip, config), "scheduler": scheduler}


def build_unloaded(path: str, **kwargs) -> dict:
    """unet / vae / text_encoder built from the file's inferred configs, weights NOT loaded (for dry runs and
    kohya name tables), plus "scheduler_config"; a .safetensors file is read for its header only."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.clip import CLIPTextModel
    from ..models.unet_2d_condition import UNet2DConditionModel

    unet_cfg, vae_cfg, text_cfg, sched_cfg = single_file_configs(read_checkpoint_shapes(path), **kwargs)
    return {"unet": UNet2DConditionModel.from_config(unet_cfg), "vae": AutoencoderKL.from_config(vae_cfg),
            "text_encoder": CLIPTextModel.from_config(text_cfg), "scheduler_config": sched_cfg}


def save_single_file(pipe, path: str, dtype: Optional[str] = None) -> None:
    """Write the pipeline's UNet, VAE and text encoder as one original-layout `.safetensors` (atomically)."""
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"single files are written as .safetensors, got {path}")
    components = {name: getattr(pipe, name).numpy_state_dict() for name in ("unet", "vae", "text_encoder")}
    write_single_file(components, pipe.unet.config, pipe.vae.config, pipe.text_encoder.config, path, dtype)


def write_single_file(components, unet_config, vae_config, text_config, path: str, dtype: Optional[str] = None):
    """Diffusers-named state dicts + their configs (dataclasses or dicts) -> original-layout file."""
    import dataclasses

    def as_dict(c):
        return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(c)

    unet_config, vae_config, text_config = as_dict(unet_config), as_dict(vae_config), as_dict(text_config)
    openclip = text_config.get("hidden_act") == "gelu"  # OpenCLIP (SD 2.x); OpenAI CLIP uses quick_gelu
    tensors = original_from_components(components, unet_config, vae_config, openclip)
    if not openclip:  # real SD 1.x files carry CLIP's position_ids buffer; some loaders expect it
        n = int(text_config.get("max_position_embeddings", 77))
        tensors[K.CLIP_PREFIX + "text_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
    save_safetensors(tensors, path, dtype={None: None, "float32": "fp32", "fp32": "fp32", "float16": "fp16",
                                           "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}[dtype])
