"""Building blocks shared by the UNet and the VAE, named exactly as in diffusers.

Shapes: images/feature maps are (B, C, H, W); token sequences are (B, N, C).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._runtime import jt
from ..configuration import ConfigError
from .attention import attention
from . import layer_kernels
from .checkpointing import Checkpointable
from .lean_backward import frozen_linear, group_norm_act, layer_norm, lean_backward_applies

nn = jt.nn


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jt.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


# diffusers' `act_fn` and transformers' `hidden_act` names
ACTIVATIONS = {
    "silu": nn.silu, "swish": nn.silu,
    "gelu": nn.gelu,                                   # exact, erf based (torch's default GELU)
    "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
    "quick_gelu": lambda x: x * jt.sigmoid(1.702 * x),  # CLIP (SD-1's text encoder)
    "relu": nn.relu,
    "mish": lambda x: x * jt.tanh(nn.softplus(x)),
}


def activation(name: str, supported=None, what: str = "activation"):
    """An activation by name -> a Jittor function; `supported` limits the names a model accepts.
    Anything else is a ConfigError naming `what` (e.g. "CLIPTextModel: hidden_act")."""
    if name not in ACTIVATIONS or (supported is not None and name not in supported):
        raise ConfigError(f"{what}: unsupported {name!r}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------- time embedding

def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
                       max_period: int = 10000) -> "jt.Var":
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in DDPM / "Attention is all you need"."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - downscale_freq_shift)
    freqs = jt.array(np.exp(exponent).astype(np.float32))                  # (half,)
    args = timesteps.float32().reshape(-1, 1) * freqs.reshape(1, -1)       # (B, half)
    emb = jt.concat([jt.sin(args), jt.cos(args)], dim=1)
    if flip_sin_to_cos:
        emb = jt.concat([emb[:, half:], emb[:, :half]], dim=1)
    if dim % 2 == 1:
        emb = jt.concat([emb, jt.zeros((emb.shape[0], 1), dtype=emb.dtype)], dim=1)
    return emb


class Linear(nn.Linear):
    """Jittor's nn.Linear (same parameters and names); while training a LoRA with this layer frozen, the
    product goes through `frozen_linear`, which keeps nothing of the input for the backward."""

    def execute(self, x):
        if lean_backward_applies(x, self.weight, self.bias):
            return frozen_linear(x, self.weight, self.bias)
        return super().execute(x)


# Inference convolutions whose input is larger than CONV_BAND_FROM (bytes) run in bands of rows of about
# CONV_BAND_BYTES each.
CONV_BAND_FROM = 128 * 2 ** 20
CONV_BAND_BYTES = 64 * 2 ** 20


class Conv2d(nn.Conv2d):
    """Jittor's nn.Conv2d (same parameters and names). Without gradients, a stride-1 convolution on a large
    input (the VAE at 512 px and up) runs in bands of rows, each band with its halo, one after the other:
    oneDNN copies a convolution's input and output into its blocked layout and back, and on whole
    256-channel 512 x 512 maps those two copies (256 MB each) were the decoder's peak. Same sums per output
    pixel, so the same result to float32 rounding. SD 2.1 VAE decode at 512 px: peak +1.41 -> +1.28 GB (torch
    +1.19 GB), time unchanged; banding the 128 MB inputs too took it to +1.09 GB but cost 20% more time."""

    def execute(self, x):
        bands = self._bands(x) if jt.flags.no_grad else 1
        return self._banded(x, bands) if bands > 1 else super().execute(x)

    def _bands(self, x) -> int:
        if x.ndim != 4 or tuple(self.stride) != (1, 1) or tuple(self.dilation) != (1, 1) or self.groups != 1:
            return 1
        size = x.nbytes
        return 1 if size <= CONV_BAND_FROM else min(x.shape[2], -(-size // CONV_BAND_BYTES))

    def _banded(self, x, bands: int):
        h = x.shape[2]
        pad_h, pad_w = self.padding
        rows = -(-h // bands)
        outs = []
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            lo, hi = max(0, r0 - pad_h), min(h, r1 + pad_h)                     # the band and its halo
            band = x[:, :, lo:hi]
            top, bottom = pad_h - (r0 - lo), pad_h - (hi - r1)                  # zero rows at the image edges
            if top or bottom:
                band = nn.pad(band, (0, 0, top, bottom))
            outs.append(nn.conv2d(band, self.weight, self.bias, 1, (0, pad_w)).sync())   # (B, Cout, r1-r0, W')
        return jt.concat(outs, dim=2)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> act -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu"):
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def execute(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


# --------------------------------------------------------------------------- normalisation

class GroupNorm(nn.Module):
    """torch.nn.GroupNorm with a two-pass variance, computed in float32.

    Jittor's nn.GroupNorm uses E[x^2] - E[x]^2, which loses precision when a group's mean is
    large next to its spread (5e-4 error at mean 10, std 1) and overflows in float16.
    Same constructor and parameter names (weight, bias) as torch / Jittor.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        assert num_channels % num_groups == 0, f"{num_channels} channels do not split into {num_groups} groups"
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = jt.ones((num_channels,), dtype="float32")
            self.bias = jt.zeros((num_channels,), dtype="float32")

    def execute(self, x):
        if lean_backward_applies(x, *self._affine()):       # training a LoRA: save x, not the centred copy
            return group_norm_act(self, x)
        if layer_kernels.applies_without_grad(x, *self._affine()):
            return self._kernel(x)
        dtype = x.dtype
        n = x.shape[0]
        h = x.float32().reshape(n, self.num_groups, -1)                  # (B, G, C/G * spatial)
        h = h - h.mean(dim=2, keepdims=True)
        var = (h * h).mean(dim=2, keepdims=True)
        h = (h / jt.sqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, self.num_channels) + (1,) * (x.ndim - 2)
            h = h * self.weight.float32().reshape(shape) + self.bias.float32().reshape(shape)
        return h.cast(dtype)

    def _affine(self):
        return (self.weight, self.bias) if self.affine else ()

    def _kernel(self, x, silu: bool = False):
        """The CPU kernel's forward (layer_kernels.group_norm), SiLU included if asked; no gradient."""
        return layer_kernels.group_norm(x, self.num_groups, self.eps, *(self._affine() or (None, None)), silu=silu)[0]


def norm_act(norm, act, x):
    """act(norm(x)); GroupNorm + SiLU as one step where it can be: the lean backward while training a LoRA
    (see lean_backward), one CPU kernel where no gradient flows."""
    if act is nn.silu and isinstance(norm, GroupNorm):
        if lean_backward_applies(x, *norm._affine()):
            return group_norm_act(norm, x, silu=True)
        if layer_kernels.applies_without_grad(x, *norm._affine()):
            return norm._kernel(x, silu=True)
    return act(norm(x))


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32 with a two-pass variance.

    Jittor's nn.LayerNorm uses E[x^2] - E[x]^2 in the input's dtype, which in bfloat16/float16
    keeps about two significant digits of the variance. Same parameter names (weight, bias).
    The output has the input's dtype (half under mixed precision, as torch's layer_norm).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True):
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = jt.ones(self.normalized_shape, dtype="float32")
            self.bias = jt.zeros(self.normalized_shape, dtype="float32")

    def execute(self, x):
        if lean_backward_applies(x, *self._affine()):
            return layer_norm(self, x)                       # training a LoRA: save x, not the centred copy
        if layer_kernels.applies_without_grad(x, *self._affine()):
            return layer_kernels.layer_norm(x, self.eps, *(self._affine() or (None, None)))[0]
        dtype = x.dtype
        h = x.float32()                                                    # (..., C)
        h = h - h.mean(dim=-1, keepdims=True)
        h = h / jt.sqrt((h * h).mean(dim=-1, keepdims=True) + self.eps)
        if self.elementwise_affine:
            h = h * self.weight.float32() + self.bias.float32()
        return h.cast(dtype)

    def _affine(self):
        return (self.weight, self.bias) if self.elementwise_affine else ()


# --------------------------------------------------------------------------- resnet and resampling

def _divisor(value: float, like):
    """`value` as a stop-grad Var of like's shape, to divide by. Jittor's divide keeps its dividend for the
    backward whenever the divisor may need a gradient, and a Python number or a broadcast scalar may; skipping
    a division by 1 instead would change how the kernels fuse, and so the rounding."""
    return jt.array(np.float32(value)).broadcast(like.shape).stop_grad()


class ResnetBlock2D(Checkpointable, nn.Module):
    """GroupNorm -> act -> conv3x3 (+ time embedding) -> GroupNorm -> act -> dropout -> conv3x3, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, temb_channels: Optional[int] = 512,
                 groups: int = 32, eps: float = 1e-6, act_fn: str = "silu", dropout: float = 0.0,
                 output_scale_factor: float = 1.0):
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.act = activation(act_fn)
        self.output_scale_factor = output_scale_factor

    def execute(self, x, temb=None):
        h = self.conv1(norm_act(self.norm1, self.act, x))                 # (B, Cout, H, W)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, :, None, None]  # (B, Cout, 1, 1)
        h = self.conv2(self.dropout(norm_act(self.norm2, self.act, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out / _divisor(self.output_scale_factor, out)


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. padding=0 (the VAE) pads right/bottom by one first."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def execute(self, x):
        if self.padding == 0:
            x = nn.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double H and W (nearest neighbour, or to `output_size`) then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def execute(self, x, output_size=None):
        b, c, h, w = x.shape
        if output_size is None:
            # nearest x2 without interpolation kernels: (B, C, H, 1, W, 1) -> (B, C, 2H, 2W)
            x = x.reshape(b, c, h, 1, w, 1).broadcast((b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
        else:
            x = nn.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)


# --------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """diffusers' `Attention`: to_q / to_k / to_v / to_out.0 (+ dropout as to_out.1).

    Used for UNet self/cross attention on (B, N, C) tokens and, with `norm_num_groups`
    and `residual_connection`, as the VAE's spatial attention on (B, C, H, W) maps.
    """

    def __init__(self, query_dim: int, cross_attention_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, bias: bool = False, upcast_attention: bool = False,
                 norm_num_groups: Optional[int] = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, out_bias: bool = True):
        inner = heads * dim_head
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups else None
        kv_dim = cross_attention_dim or query_dim
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(kv_dim, inner, bias=bias)
        self.to_v = Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def execute(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        if spatial:
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(0, 2, 1)   # (B, HW, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attention(self.to_q(hidden_states), self.to_k(context), self.to_v(context), self.heads,
                        mask=attention_mask, upcast=self.upcast_attention)   # (B, N, inner)
        out = self.to_out[1](self.to_out[0](out))
        if spatial:
            out = out.transpose(0, 2, 1).reshape(b, c, h, w)
        if self.residual_connection:
            out = out + residual
        return out / _divisor(self.rescale_output_factor, out)
