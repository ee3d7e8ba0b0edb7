"""The Stable Diffusion 1.x / 2.x denoiser: diffusers' `UNet2DConditionModel` in Jittor.

A U-Net (Ronneberger et al. 2015) over latents, conditioned on the diffusion timestep
(sinusoidal embedding -> MLP, added inside every ResNet block) and on text tokens
(cross attention inside Transformer2DModel blocks, Rombach et al. 2022).

    sample (B, 4, h, w) -> conv_in -> down blocks -> mid block -> up blocks (with skips)
                        -> GroupNorm -> act -> conv_out -> (B, 4, h, w)

Parameter names are identical to diffusers 0.42.1, so its `diffusion_pytorch_model.*`
files load with no renaming. Only the options SD 1.x / 2.x checkpoints use are
implemented; anything else in a config.json raises `ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .._runtime import jt
from . import layer_kernels
from .checkpointing import Checkpointable
from .layers import (Attention, Downsample2D, GroupNorm, LayerNorm, Linear, ResnetBlock2D, TimestepEmbedding, Upsample2D,
                     activation, norm_act, timestep_embedding)
from .lean_backward import geglu, lean_backward_applies
from .modeling import ConfigError, ModelMixin

nn = jt.nn

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass
class UNet2DConditionConfig:
    """`config.json` of a diffusers UNet2DConditionModel (field names are the JSON keys).

    Quirk kept from diffusers: when `num_attention_heads` is None (every SD checkpoint),
    `attention_head_dim` is really the NUMBER OF HEADS per block; the head size is
    channels // heads. SD 1.x: attention_head_dim=8 -> 8 heads of 40/80/160 channels.
    SD 2.x: attention_head_dim=(5, 10, 20, 20) -> heads of 64 channels everywhere.
    """
    sample_size: Optional[IntOrTuple] = None  # latent size pipelines default to; the network ignores it
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False  # False only
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None  # must stay None, as in diffusers
    dual_cross_attention: bool = False  # False only
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"  # "default" only
    time_embedding_type: str = "positional"  # "positional" only
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"  # "default" only


@dataclass
class UNet2DConditionOutput:
    sample: "jt.Var"  # (B, out_channels, H, W)


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _per_block(value, n: int, name: str) -> list:
    """An int (same for every block) or a per-block tuple -> list of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{name} has {len(value)} entries but there are {n} down blocks: {value!r}")
        return list(value)
    return [value] * n


def _block_type(name: str, supported: Sequence[Optional[str]], kind: str) -> Optional[str]:
    """Check a block type name; diffusers also accepts the old "UNetRes" prefix."""
    if isinstance(name, str) and name.startswith("UNetRes"):
        name = name[len("UNetRes"):]
    if name not in supported:
        raise ConfigError(f"unsupported {kind} block type {name!r}; supported: "
                          + ", ".join(repr(s) for s in supported))
    return name


def check_config(c: UNet2DConditionConfig) -> None:
    """Reject config values whose computation is not implemented here (clear error, never silent)."""
    fixed = {"resnet_time_scale_shift": "default", "time_embedding_type": "positional", "attention_type": "default"}
    for key, want in fixed.items():
        if getattr(c, key) != want:
            raise ConfigError(f"UNet2DConditionModel: {key}={getattr(c, key)!r} is not supported (only {want!r})")
    if c.dual_cross_attention:
        raise ConfigError("UNet2DConditionModel: dual_cross_attention=True is not supported")
    if any(_per_block(c.only_cross_attention, len(c.down_block_types), "only_cross_attention")):
        raise ConfigError("UNet2DConditionModel: only_cross_attention=True is not supported")
    if c.num_attention_heads is not None:
        # diffusers itself refuses this (the attention_head_dim naming issue, diffusers#2011)
        raise ConfigError("UNet2DConditionModel: num_attention_heads must be None; "
                          "attention_head_dim gives the number of heads")
    if c.norm_num_groups is None:
        raise ConfigError("UNet2DConditionModel: norm_num_groups=None is not supported")
    if any(isinstance(n, (list, tuple)) for n in _per_block(c.transformer_layers_per_block,
                                                           len(c.down_block_types), "transformer_layers_per_block")):
        raise ConfigError("UNet2DConditionModel: nested transformer_layers_per_block (asymmetric UNet) "
                          "is not supported")
    if len(c.up_block_types) != len(c.down_block_types) or len(c.block_out_channels) != len(c.down_block_types):
        raise ConfigError(f"UNet2DConditionModel: {len(c.down_block_types)} down_block_types, "
                          f"{len(c.up_block_types)} up_block_types and {len(c.block_out_channels)} "
                          "block_out_channels must all match")
    for k in (c.conv_in_kernel, c.conv_out_kernel):
        if k % 2 != 1:
            raise ConfigError(f"UNet2DConditionModel: conv kernels must be odd, got {k}")


# --------------------------------------------------------------------------- transformer

class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj -> (value, gate) -> value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        self.proj = Linear(dim_in, dim_out * 2)
        self.dim_out = dim_out

    def execute(self, x):
        h = self.proj(x)                                        # (B, N, 2*inner)
        if lean_backward_applies(h):                            # training: save h only (see lean_backward)
            return geglu(h)
        if layer_kernels.applies_without_grad(h):               # one CPU kernel, no slice copies
            return layer_kernels.geglu(h)
        return h[..., :self.dim_out] * nn.gelu(h[..., self.dim_out:])


class FeedForward(nn.Module):
    """net.0 = GEGLU(dim -> 4*dim), net.1 = dropout, net.2 = Linear(4*dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), Linear(inner, dim)])

    def execute(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(Checkpointable, nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 upcast_attention: bool = False):
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast_attention=upcast_attention)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                               upcast_attention=upcast_attention)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def execute(self, x, context, context_mask=None):
        # x: (B, N, dim) image tokens; context: (B, T, cross_dim); context_mask: additive (B, 1, 1, T)
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, attention_mask=context_mask) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (residual).

    proj_in / proj_out are 1x1 convs (SD 1.x) or Linear layers (SD 2.x, use_linear_projection).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool = False, upcast_attention: bool = False):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner)
            self.proj_out = Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, in_channels, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention)
            for _ in range(num_layers)])

    def execute(self, x, context, context_mask=None):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            t = self.proj_in(x.reshape(b, c, h * w).transpose(0, 2, 1))        # (B, HW, inner)
        else:
            x = self.proj_in(x)                                                 # (B, inner, H, W)
            t = x.reshape(b, x.shape[1], h * w).transpose(0, 2, 1)             # (B, HW, inner)
        for block in self.transformer_blocks:
            t = block(t, context, context_mask)
        if self.use_linear_projection:
            x = self.proj_out(t).transpose(0, 2, 1).reshape(b, c, h, w)         # (B, C, H, W)
        else:
            x = self.proj_out(t.transpose(0, 2, 1).reshape(b, t.shape[2], h, w))
        return x + residual


# --------------------------------------------------------------------------- U-Net blocks

def transformer_stack(num_layers: int, channels: int, heads: int, transformer_layers: int, cross_attention_dim: int,
                      groups: int, use_linear_projection: bool, upcast_attention: bool) -> "nn.ModuleList":
    """The `attentions` list of a cross-attention block: one Transformer2DModel per ResNet block."""
    return nn.ModuleList([
        Transformer2DModel(heads, channels // heads, channels, transformer_layers, cross_attention_dim, groups,
                           use_linear_projection, upcast_attention)
        for _ in range(num_layers)])

class DownBlock2D(nn.Module):
    """ResNet blocks, then an optional stride-2 conv. Returns the output and every skip tensor."""
    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, eps: float,
                 act_fn: str, groups: int, dropout: float, add_downsample: bool, downsample_padding: int):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=groups,
                          eps=eps, act_fn=act_fn, dropout=dropout)
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, padding=downsample_padding)])
                             if add_downsample else None)

    def execute(self, x, temb, context=None, context_mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = self._attend(i, x, context, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)                                    # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips

    def _attend(self, i, x, context, context_mask):
        return x


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after every ResNet block."""
    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, eps: float,
                 act_fn: str, groups: int, dropout: float, add_downsample: bool, downsample_padding: int,
                 heads: int, cross_attention_dim: int, transformer_layers: int, use_linear_projection: bool,
                 upcast_attention: bool):
        super().__init__(in_channels, out_channels, temb_channels, num_layers, eps, act_fn, groups, dropout,
                         add_downsample, downsample_padding)
        self.attentions = transformer_stack(num_layers, out_channels, heads, transformer_layers, cross_attention_dim,
                                            groups, use_linear_projection, upcast_attention)

    def _attend(self, i, x, context, context_mask):
        return self.attentions[i](x, context, context_mask)


class UpBlock2D(nn.Module):
    """ResNet blocks, each fed the running tensor concatenated with one skip; then an optional x2 upsample."""
    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, eps: float, act_fn: str, groups: int, dropout: float, add_upsample: bool):
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip_channels, out_channels, temb_channels, groups=groups,
                                         eps=eps, act_fn=act_fn, dropout=dropout))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def execute(self, x, skips, temb, context=None, context_mask=None, upsample_size=None):
        # skips: the matching down-path tensors, consumed last-first
        for i, resnet in enumerate(self.resnets):
            x = jt.concat([x, skips[-1 - i]], dim=1)                       # (B, C + C_skip, H, W)
            x = resnet(x, temb)
            x = self._attend(i, x, context, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)                       # (B, C, 2H, 2W) or upsample_size
        return x

    def _attend(self, i, x, context, context_mask):
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after every ResNet block."""
    has_cross_attention = True

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, eps: float, act_fn: str, groups: int, dropout: float, add_upsample: bool,
                 heads: int, cross_attention_dim: int, transformer_layers: int, use_linear_projection: bool,
                 upcast_attention: bool):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, eps, act_fn,
                         groups, dropout, add_upsample)
        self.attentions = transformer_stack(num_layers, out_channels, heads, transformer_layers, cross_attention_dim,
                                            groups, use_linear_projection, upcast_attention)

    def _attend(self, i, x, context, context_mask):
        return self.attentions[i](x, context, context_mask)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, channels: int, temb_channels: int, eps: float, act_fn: str, groups: int, dropout: float,
                 output_scale_factor: float, heads: int, cross_attention_dim: int, transformer_layers: int,
                 use_linear_projection: bool, upcast_attention: bool, num_layers: int = 1):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps, act_fn=act_fn, dropout=dropout,
                          output_scale_factor=output_scale_factor)
            for _ in range(num_layers + 1)])
        self.attentions = transformer_stack(num_layers, channels, heads, transformer_layers, cross_attention_dim,
                                            groups, use_linear_projection, upcast_attention)

    def execute(self, x, temb, context, context_mask=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context, context_mask), temb)
        return x


# --------------------------------------------------------------------------- the model

def _float_var(x, dtype: str):
    """array-like or Var (bool / int / float) -> Var of `dtype`."""
    if not isinstance(x, jt.Var):
        x = jt.array(np.asarray(x, dtype=np.float32))
    return x.cast(dtype)


class UNet2DConditionModel(ModelMixin):
    """Noise (or v) prediction network of Stable Diffusion 1.x / 2.x."""

    config_class = UNet2DConditionConfig
    # keys diffusers writes that change nothing for the block types implemented here
    config_ignore = ("addition_embed_type_num_heads",   # only used with addition_embed_type (rejected)
                     "resnet_out_scale_factor",         # only used by SimpleCrossAttn/ResnetDownsample blocks
                     "resnet_skip_time_act",            # same
                     "cross_attention_norm",            # only used by SimpleCrossAttn blocks
                     "mid_block_only_cross_attention")  # only used by UNetMidBlock2DSimpleCrossAttn

    def __init__(self, config: Optional[UNet2DConditionConfig] = None):
        c = self.config = config or UNet2DConditionConfig()
        check_config(c)
        n = len(c.down_block_types)
        channels = list(c.block_out_channels)
        heads = _per_block(c.attention_head_dim, n, "attention_head_dim")   # = number of heads (see config)
        cross_dims = _per_block(c.cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(c.layers_per_block, n, "layers_per_block")
        tlayers = _per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        common = dict(eps=c.norm_eps, act_fn=c.act_fn, groups=c.norm_num_groups, dropout=c.dropout)
        attn_common = dict(use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention)

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
        time_dim = channels[0] * 4
        self.time_embedding = TimestepEmbedding(channels[0], time_dim, act_fn=c.act_fn)

        down = []
        for i, kind in enumerate(c.down_block_types):
            kind = _block_type(kind, DOWN_BLOCK_TYPES, "down")
            args = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i], temb_channels=time_dim,
                        num_layers=layers[i], add_downsample=i < n - 1, downsample_padding=c.downsample_padding,
                        **common)
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(**args, heads=heads[i], cross_attention_dim=cross_dims[i],
                                                 transformer_layers=tlayers[i], **attn_common))
            else:
                down.append(DownBlock2D(**args))
        self.down_blocks = nn.ModuleList(down)

        mid_kind = _block_type(c.mid_block_type, MID_BLOCK_TYPES, "mid")
        self.mid_block = None
        if mid_kind is not None:
            self.mid_block = UNetMidBlock2DCrossAttn(
                channels[-1], time_dim, output_scale_factor=c.mid_block_scale_factor, heads=heads[-1],
                cross_attention_dim=cross_dims[-1], transformer_layers=tlayers[-1], **attn_common, **common)

        rev = list(reversed(channels))
        up = []
        for i, kind in enumerate(c.up_block_types):
            kind = _block_type(kind, UP_BLOCK_TYPES, "up")
            j = n - 1 - i  # the matching down block
            args = dict(in_channels=rev[min(i + 1, n - 1)], prev_output_channel=rev[max(i - 1, 0)],
                        out_channels=rev[i], temb_channels=time_dim, num_layers=layers[j] + 1,
                        add_upsample=i < n - 1, **common)
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(**args, heads=heads[j], cross_attention_dim=cross_dims[j],
                                             transformer_layers=tlayers[j], **attn_common))
            else:
                up.append(UpBlock2D(**args))
        self.up_blocks = nn.ModuleList(up)
        self.num_upsamplers = n - 1

        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self._act = activation(c.act_fn)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def _timesteps(timestep, batch: int):
        """Python number, (1,) or (B,) array/Var -> float32 (B,)."""
        if isinstance(timestep, jt.Var):
            t = timestep.float32().reshape(-1)
        else:
            t = jt.array(np.asarray(timestep, dtype=np.float64).astype(np.float32).reshape(-1))
        if t.shape[0] == 1 and batch != 1:
            t = t.broadcast((batch,))
        elif t.shape[0] != batch:
            raise ValueError(f"timestep has {t.shape[0]} values for a batch of {batch}")
        return t

    def execute(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None) -> UNet2DConditionOutput:
        """sample (B, C, H, W), timestep (scalar or (B,)), encoder_hidden_states (B, T, D).

        encoder_attention_mask: optional (B, T), 1/True = attend, 0/False = ignore that token.
        """
        c = self.config
        b, _, h, w = sample.shape
        # H or W not divisible by the total downsampling: upsample to the skip sizes instead of x2
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = h % factor != 0 or w % factor != 0

        context_mask = None
        if encoder_attention_mask is not None:
            keep = _float_var(encoder_attention_mask, sample.dtype)            # (B, T)
            context_mask = ((1.0 - keep) * -10000.0).reshape(b, 1, 1, -1)   # (B, 1, 1, T) additive bias

        if c.center_input_sample:
            sample = 2 * sample - 1.0

        t = self._timesteps(timestep, b)
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(t_emb.cast(sample.dtype))                  # (B, 4*C0)

        x = self.conv_in(sample)                                             # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states, context_mask)
            skips.extend(block_skips)

        if self.mid_block is not None:
            x = self.mid_block(x, emb, encoder_hidden_states, context_mask)

        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            upsample_size = None
            if forward_upsample_size and i < len(self.up_blocks) - 1:
                upsample_size = tuple(skips[-1].shape[2:])
            x = block(x, block_skips, emb, encoder_hidden_states, context_mask, upsample_size=upsample_size)

        x = self.conv_out(norm_act(self.conv_norm_out, self._act, x))       # (B, out_channels, H, W)
        return UNet2DConditionOutput(sample=x)


__all__ = ["UNet2DConditionConfig", "UNet2DConditionModel", "UNet2DConditionOutput", "Transformer2DModel",
           "BasicTransformerBlock", "CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn",
           "CrossAttnUpBlock2D", "UpBlock2D", "check_config"]
