"""AutoencoderKL: the Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"), numerically matching diffusers' `AutoencoderKL`.

The encoder maps an image (B, 3, H, W) in [-1, 1] to the mean and log-variance of a diagonal
Gaussian over latents (B, 4, H/f, W/f), f = 2 ** (len(block_out_channels) - 1) (8 for SD).
The decoder maps latents back to images. Diffusion models work on `latents * scaling_factor`.

Parameter names are identical to diffusers (`encoder.down_blocks.0.resnets.0.conv1.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, ...), so a diffusers `vae/` folder loads directly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .._runtime import jt, release_between
from .layers import Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from .modeling import ConfigError, ModelMixin

nn = jt.nn

RESNET_EPS = 1e-6  # every norm in the VAE uses this eps


@dataclass
class AutoencoderKLConfig:
    """The keys of diffusers' `vae/config.json` (defaults are diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, Tuple[int, ...]] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ConfigError(f"AutoencoderKL: only DownEncoderBlock2D is supported, got {self.down_block_types}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ConfigError(f"AutoencoderKL: only UpDecoderBlock2D is supported, got {self.up_block_types}")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            raise ConfigError("AutoencoderKL: down_block_types, up_block_types and block_out_channels "
                              "must have the same length")


# --------------------------------------------------------------------------- outputs

@dataclass
class AutoencoderKLOutput:
    latent_dist: "DiagonalGaussianDistribution"


@dataclass
class DecoderOutput:
    sample: "jt.Var"  # (B, C, H, W)


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, from the encoder's (B, 2*C, h, w) moments."""

    def __init__(self, parameters, deterministic: bool = False):
        self.parameters = parameters                                   # (B, 2C, h, w)
        c = parameters.shape[1] // 2
        self.mean = parameters[:, :c]                                  # (B, C, h, w)
        self.logvar = jt.clamp(parameters[:, c:], -30.0, 20.0)
        self.deterministic = deterministic
        self.std = jt.exp(0.5 * self.logvar)
        self.var = jt.exp(self.logvar)
        if deterministic:
            self.std = jt.zeros_like(self.mean)
            self.var = jt.zeros_like(self.mean)

    def sample(self, noise=None):
        """mean + std * noise; `noise` (same shape as mean, numpy or jt) makes it reproducible."""
        if noise is None:
            noise = jt.randn(self.mean.shape, dtype=self.mean.dtype)
        elif not isinstance(noise, jt.Var):
            noise = jt.array(np.asarray(noise))
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.cast(self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None):
        """KL(self || other) summed over (C, h, w) -> (B,); `other` None means N(0, 1)."""
        if self.deterministic:
            return jt.zeros((self.mean.shape[0],), dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.sqr() + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).sqr() / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * terms.sum(dims=(1, 2, 3))

    def nll(self, sample, dims=(1, 2, 3)):
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return jt.zeros((self.mean.shape[0],), dtype=self.mean.dtype)
        terms = float(np.log(2.0 * np.pi)) + self.logvar + (sample - self.mean).sqr() / self.var
        return 0.5 * terms.sum(dims=tuple(dims))


# --------------------------------------------------------------------------- blocks

class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then an optional stride-2 downsampler (right/bottom padded)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=RESNET_EPS, act_fn=act_fn)
            for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels, padding=0)]) \
            if add_downsample else None

    def execute(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)                                # (B, C, H/2, W/2)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then an optional nearest-x2 upsampler with a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None,
                          groups=groups, eps=RESNET_EPS, act_fn=act_fn)
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def execute(self, x):
        for resnet in self.resnets:
            x = release_between(resnet(x))
        if self.upsamplers is not None:
            x = release_between(self.upsamplers[0](x))                 # (B, C, 2H, 2W)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> single-head spatial self-attention (with residual) -> resnet."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool = True):
        self.add_attention = add_attention
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=RESNET_EPS, act_fn=act_fn)
            for _ in range(2)])
        # one head of width `channels`; diffusers upcasts the softmax (we compute it in float32 too)
        self.attentions = nn.ModuleList([
            Attention(channels, heads=1, dim_head=channels, bias=True, upcast_attention=True,
                      norm_num_groups=groups, eps=RESNET_EPS, residual_connection=True)
        ] if add_attention else [])

    def execute(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)                                  # (B, C, H, W)
        return self.resnets[1](x)


# --------------------------------------------------------------------------- encoder / decoder

class Encoder(nn.Module):
    """(B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        ch = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        blocks, prev = [], ch[0]
        for i, out in enumerate(ch):
            blocks.append(DownEncoderBlock2D(prev, out, cfg.layers_per_block, groups, cfg.act_fn,
                                             add_downsample=i < len(ch) - 1))
            prev = out
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(ch[-1], groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=RESNET_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def execute(self, x):
        x = self.conv_in(x)                                            # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)                                               # (B, ch[i], H/2^i, W/2^i)
        x = self.mid_block(x)
        x = nn.silu(self.conv_norm_out(x))  # diffusers' conv_act is always SiLU
        return self.conv_out(x)                                        # (B, 2 * latent, h, w)


class Decoder(nn.Module):
    """latents (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        ch = list(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, cfg.act_fn, cfg.mid_block_add_attention)
        blocks, prev = [], ch[0]
        for i, out in enumerate(ch):
            blocks.append(UpDecoderBlock2D(prev, out, cfg.layers_per_block + 1, groups, cfg.act_fn,
                                           add_upsample=i < len(ch) - 1))
            prev = out
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=RESNET_EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def execute(self, z):
        x = self.conv_in(z)                                            # (B, ch[-1], h, w)
        x = release_between(self.mid_block(x))
        for block in self.up_blocks:
            x = block(x)                                               # doubles H, W except the last
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)                                        # (B, out_channels, H, W)


# --------------------------------------------------------------------------- tiling helpers

def _blend(a, b, extent: int, axis: int):
    """Cross-fade the last `extent` rows/cols (axis 2/3) of tile `a` into the first ones of tile `b`.

    Weight of `b` ramps as y / extent for y = 0 .. extent-1, as diffusers' blend_v / blend_h.
    """
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    ramp = (np.arange(extent, dtype=np.float64) / extent)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w_b = jt.array(ramp.astype(np.float32).reshape(shape)).cast(b.dtype)
    w_a = jt.array((1.0 - ramp).astype(np.float32).reshape(shape)).cast(b.dtype)
    if axis == 2:
        a_tail, b_head, b_rest = a[:, :, a.shape[2] - extent:], b[:, :, :extent], b[:, :, extent:]
    else:
        a_tail, b_head, b_rest = a[:, :, :, a.shape[3] - extent:], b[:, :, :, :extent], b[:, :, :, extent:]
    mixed = a_tail * w_a + b_head * w_b
    if b_rest.shape[axis] == 0:
        return mixed
    return jt.concat([mixed, b_rest], dim=axis)


def _tiled(x, tile_in: int, tile_out: int, overlap: float, fn):
    """Run `fn` on overlapping tile_in x tile_in tiles of x and stitch the tile_out-sized results.

    Tiles start every int(tile_in * (1 - overlap)) pixels. Each tile is blended with its (already
    blended) upper and left neighbours over int(tile_out * overlap) pixels, then cropped to
    tile_out - blend pixels, which is what diffusers' in-place blending computes.
    """
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    keep = tile_out - blend
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, axis=3)
            row[j] = tile  # later neighbours blend against the blended tile
            kept.append(tile[:, :, :keep, :keep])
        out_rows.append(jt.concat(kept, dim=3))
    return jt.concat(out_rows, dim=2)


# --------------------------------------------------------------------------- the model

SLICE_ABOVE = 512 * 512   # output pixels of a batch above which decode() goes one image at a time

_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class AutoencoderKL(ModelMixin):
    """The SD VAE: `encode(x).latent_dist`, `decode(z).sample`, and `execute(x)` = decode(encode(x))."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        lat = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

        # memory options (see enable_slicing / enable_tiling)
        self.use_slicing = False
        self.use_tiling = False
        size = config.sample_size
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.tile_sample_min_size = size                                       # image pixels
        self.tile_latent_min_size = int(size / 2 ** (len(config.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> Optional[float]:
        return self.config.shift_factor

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # ------------------------------------------------------------- memory options

    def enable_slicing(self):
        """Encode / decode one image of the batch at a time."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self):
        """Encode / decode large images in overlapping tiles (of config.sample_size pixels) blended together."""
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    # ------------------------------------------------------------- encode / decode

    def _encode(self, x):
        """(B, C, H, W) -> moments (B, 2 * latent, H/f, W/f)."""
        if self.use_tiling and (x.shape[2] > self.tile_sample_min_size or x.shape[3] > self.tile_sample_min_size):
            return self.tiled_encode_moments(x)
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h

    def _decode(self, z):
        """(B, latent, h, w) -> (B, out_channels, h*f, w*f)."""
        if self.use_tiling and (z.shape[2] > self.tile_latent_min_size or z.shape[3] > self.tile_latent_min_size):
            return self.tiled_decode(z).sample
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x) -> AutoencoderKLOutput:
        """Images in [-1, 1] (B, C, H, W) -> AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)."""
        if self.use_slicing and x.shape[0] > 1:
            moments = jt.concat([self._encode(x[i:i + 1]) for i in range(x.shape[0])], dim=0)
        else:
            moments = self._encode(x)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z) -> DecoderOutput:
        """Unscaled latents (B, latent, h, w) -> DecoderOutput(sample=(B, out_channels, H, W)).

        Batches of more than SLICE_ABOVE output pixels in all are decoded one image at a time even without
        `enable_slicing()` (the same values; the decoder's activations at 512 px are about 1 GB per image)."""
        f = self.downscale_factor
        if (self.use_slicing or z.shape[0] * z.shape[2] * z.shape[3] * f * f > SLICE_ABOVE) and z.shape[0] > 1:
            sample = jt.concat([self._decode(z[i:i + 1]) for i in range(z.shape[0])], dim=0)
        else:
            sample = self._decode(z)
        return DecoderOutput(sample=sample)

    def tiled_encode_moments(self, x):
        """Tiled encoder: (B, C, H, W) -> moments (B, 2 * latent, H/f, W/f), as diffusers' `_tiled_encode`."""
        def encode_tile(tile):
            h = self.encoder(tile)
            return self.quant_conv(h) if self.quant_conv is not None else h
        return _tiled(x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor,
                      encode_tile)

    def tiled_encode(self, x) -> AutoencoderKLOutput:
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(self.tiled_encode_moments(x)))

    def tiled_decode(self, z) -> DecoderOutput:
        """Tiled decoder, as diffusers' `tiled_decode` (tiles of tile_latent_min_size latents)."""
        def decode_tile(tile):
            if self.post_quant_conv is not None:
                tile = self.post_quant_conv(tile)
            return self.decoder(tile)
        sample = _tiled(z, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor,
                        decode_tile)
        return DecoderOutput(sample=sample)

    def execute(self, x, sample_posterior: bool = False, noise=None) -> DecoderOutput:
        """Reconstruct x: decode(posterior sample with `noise`, or its mean)."""
        posterior = self.encode(x).latent_dist
        z = posterior.sample(noise) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ------------------------------------------------------------- checkpoints

    def convert_state_dict(self, state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Old VAE attention names (query/key/value/proj_attn, possibly 1x1-conv shaped) -> to_q/to_k/to_v/to_out.0."""
        out = {}
        for key, value in state.items():
            m = _OLD_ATTENTION.match(key)
            if m:
                key = f"{m.group(1)}.{_OLD_TO_NEW[m.group(2)]}.{m.group(3)}"
            if ".attentions." in key and key.endswith(".weight") and np.ndim(value) == 4 \
                    and tuple(np.shape(value)[2:]) == (1, 1):
                value = np.asarray(value)[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
            out[key] = value
        return out


__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "AutoencoderKLOutput", "DecoderOutput",
           "DiagonalGaussianDistribution", "Encoder", "Decoder"]
