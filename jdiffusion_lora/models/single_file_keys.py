"""Parameter names of the original Stable Diffusion checkpoint layout (CompVis / Stability `ldm`).

A single-file checkpoint (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt`, what
A1111 and ComfyUI load and save) holds the three models under one prefix each:

    model.diffusion_model.*   the UNet     (input_blocks / middle_block / output_blocks)
    first_stage_model.*       the VAE      (encoder.down.N.block.M / decoder.up.N ...)
    cond_stage_model.*        the text encoder:
        SD 1.x  cond_stage_model.transformer.text_model.*   (OpenAI CLIP, transformers names)
        SD 2.x  cond_stage_model.model.*                    (OpenCLIP: resblocks, fused in_proj q/k/v)

Each function here maps ONE diffusers parameter name to its original name (plus, for OpenCLIP's
fused attention, which third of the fused tensor it is). Reading and writing both use it: the
reader inverts it over the parameter names of the model it builds, so no name is guessed.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

OriginalName = Tuple[str, Optional[int]]  # (original key, index of the q/k/v third or None)

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict) -> str:
    """Replace the leading module name of `rest` ("conv1.weight") through `table`."""
    for ours, theirs in table.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key(key: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str:
    """diffusers UNet2DConditionModel key -> `model.diffusion_model.` key.

    Down block i has `layers_per_block` (L) ResNets, then a downsampler: input_blocks are numbered
    1 + i*(L+1) + j. Up blocks have L+1 ResNets and the upsampler sits in the last one, after the
    attention when the block has one.
    """
    L = layers_per_block
    p = key.split(".")
    rest = ".".join(p[4:])
    if p[0] == "down_blocks":
        i, j = int(p[1]), int(p[3])
        if p[2] == "resnets":
            out = f"input_blocks.{1 + i * (L + 1) + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        elif p[2] == "attentions":
            out = f"input_blocks.{1 + i * (L + 1) + j}.1.{rest}"
        else:  # downsamplers.0.conv.*
            out = f"input_blocks.{(i + 1) * (L + 1)}.0.op.{'.'.join(p[5:])}"
    elif p[0] == "up_blocks":
        i, j = int(p[1]), int(p[3])
        if p[2] == "resnets":
            out = f"output_blocks.{i * (L + 1) + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        elif p[2] == "attentions":
            out = f"output_blocks.{i * (L + 1) + j}.1.{rest}"
        else:  # upsamplers.0.conv.*
            out = f"output_blocks.{i * (L + 1) + L}.{2 if up_has_attention[i] else 1}.{'.'.join(p[4:])}"
    elif p[0] == "mid_block":
        j, rest = int(p[2]), ".".join(p[3:])
        out = (f"middle_block.{2 * j}.{_rename_head(rest, _UNET_RESNET)}" if p[1] == "resnets"
               else f"middle_block.1.{rest}")
    else:
        out = _rename_head(key, _UNET_TOP)
    return UNET_PREFIX + out


def vae_key(key: str, num_blocks: int) -> str:
    """diffusers AutoencoderKL key -> `first_stage_model.` key (decoder up blocks are numbered in reverse)."""
    p = key.split(".")
    if len(p) > 2 and p[1] in ("down_blocks", "up_blocks"):
        side, i = p[0], int(p[2])
        level, word = (i, "down") if p[1] == "down_blocks" else (num_blocks - 1 - i, "up")
        if p[3] == "resnets":
            rest = ".".join(p[5:]).replace("conv_shortcut.", "nin_shortcut.")
            out = f"{side}.{word}.{level}.block.{p[4]}.{rest}"
        else:  # downsamplers.0.conv / upsamplers.0.conv
            out = f"{side}.{word}.{level}.{'downsample' if word == 'down' else 'upsample'}.{'.'.join(p[5:])}"
    elif len(p) > 2 and p[1] == "mid_block":
        side, j, rest = p[0], int(p[3]), ".".join(p[4:])
        if p[2] == "resnets":
            out = f"{side}.mid.block_{j + 1}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        else:
            out = f"{side}.mid.attn_1.{_rename_head(rest, _VAE_ATTN)}"
    elif len(p) > 1 and p[1] == "conv_norm_out":
        out = f"{p[0]}.norm_out.{p[2]}"
    else:
        out = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    return VAE_PREFIX + out


def is_vae_attention_weight(key: str) -> bool:
    """VAE attention projections are 1x1 convolutions (out, in, 1, 1) in the original layout."""
    return ".mid_block.attentions." in key and key.endswith(".weight") and ".group_norm." not in key


def clip_key(key: str) -> str:
    """OpenAI CLIP (SD 1.x): transformers names under `cond_stage_model.transformer.`."""
    return CLIP_PREFIX + key


_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def openclip_key(key: str) -> OriginalName:
    """OpenCLIP ViT-H text tower (SD 2.x) under `cond_stage_model.model.`.

    q/k/v projections are one fused `attn.in_proj_weight` (3D, D) / `in_proj_bias` (3D,) there,
    in the order q, k, v: the second value is the third to take.
    """
    if key in _OPENCLIP_TOP:
        return OPENCLIP_PREFIX + _OPENCLIP_TOP[key], None
    p = key.split(".")  # text_model.encoder.layers.N.<module...>.<weight|bias>
    if p[:3] != ["text_model", "encoder", "layers"]:
        raise KeyError(f"no OpenCLIP name for text encoder parameter {key!r}")
    n, module, leaf = p[3], ".".join(p[4:-1]), p[-1]
    base = f"{OPENCLIP_PREFIX}transformer.resblocks.{n}."
    for i, proj in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        if module == proj:
            return f"{base}attn.in_proj_{leaf}", i
    if module not in _OPENCLIP_LAYER:
        raise KeyError(f"no OpenCLIP name for text encoder parameter {key!r}")
    return f"{base}{_OPENCLIP_LAYER[module]}.{leaf}", None
