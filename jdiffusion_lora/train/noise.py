"""Training noise and timesteps, drawn per sample from that sample's numpy Generator (numpy in, numpy out).

- gaussian noise, plus optional
- noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): + offset * N(0, 1) per channel;
- multi-resolution ("pyramid") noise (Whitaker 2023): sum over i of upsampled N(0, 1) at size
  ~ H / r**i (r uniform in [2, 4]) weighted by discount**i, rescaled to unit std (kohya's form);
- Perlin noise: a sum of `octaves` gradient-noise fields (frequency doubling, amplitude times
  `persistence`), standardised and added with weight `perturbation`, then rescaled to unit std;
- timesteps uniform on [t_min, t_max) or logit-normal (Esser et al. 2024, SD3 sec. 3.1): t = floor(
  sigmoid(N(mean, std)) * (t_max - t_min)) + t_min, which favours the middle of the range.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


def bilinear_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width), bilinear with half-pixel centres (align_corners=False)."""
    c, h, w = x.shape

    def axis(n_in, n_out):
        pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, height)
    x0, x1, fx = axis(w, width)
    rows = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]      # (C, height, w)
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx                         # (C, height, width)


def pyramid_noise(rng: np.random.Generator, noise: np.ndarray, iterations: int, discount: float) -> np.ndarray:
    """Add multi-resolution noise to `noise` (C, H, W) and rescale to unit std."""
    c, h, w = noise.shape
    out = noise.astype(np.float32).copy()
    for i in range(iterations):
        r = rng.random() * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        out += bilinear_resize(rng.standard_normal((c, hn, wn), dtype=np.float32), h, w) * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).astype(np.float32)


def _fade(t):
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_2d(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """One octave of 2-D gradient (Perlin) noise with `cells` lattice cells across the short side."""
    cells = max(1, cells)
    ch = max(1, round(cells * height / min(height, width)))
    cw = max(1, round(cells * width / min(height, width)))
    angles = rng.random((ch + 1, cw + 1)) * 2 * math.pi
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)                  # (ch+1, cw+1, 2)
    ys = (np.arange(height) + 0.5) / height * ch
    xs = (np.arange(width) + 0.5) / width * cw
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def dot(dy, dx):
        g = grad[(y0 + dy)[:, None], (x0 + dx)[None, :]]                        # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return top * (1 - v) + bottom * v


def perlin_noise(rng: np.random.Generator, shape: Tuple[int, int, int], octaves: int, persistence: float) -> np.ndarray:
    """(C, H, W) sum of octaves of Perlin noise, standardised to zero mean and unit std per channel."""
    c, h, w = shape
    out = np.zeros(shape, dtype=np.float64)
    for ch in range(c):
        amp, cells = 1.0, 2
        for _ in range(octaves):
            out[ch] += amp * perlin_2d(rng, h, w, cells)
            amp *= persistence
            cells *= 2
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-8
    return out.astype(np.float32)


def draw_noise(rng: np.random.Generator, shape: Tuple[int, int, int], c) -> np.ndarray:
    """The training noise of one sample (C, H, W) with the config's noise options."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if c.noise_offset:
        noise = noise + np.float32(c.noise_offset) * rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
    if c.multires_noise_iterations:
        noise = pyramid_noise(rng, noise, c.multires_noise_iterations, c.multires_noise_discount)
    if c.perlin_noise_octaves:
        field = perlin_noise(rng, shape, c.perlin_noise_octaves, c.perlin_noise_persistence)
        noise = noise + np.float32(c.perlin_noise_perturbation) * field
        noise = noise / noise.std()
    return noise.astype(np.float32)


def draw_timestep(rng: np.random.Generator, c, num_train_timesteps: int) -> int:
    lo = c.timestep_min
    hi = c.timestep_max or num_train_timesteps
    hi = min(hi, num_train_timesteps)
    if c.timestep_sampling == "logit_normal":
        u = 1.0 / (1.0 + math.exp(-rng.normal(c.logit_mean, c.logit_std)))
        return min(int(math.floor(u * (hi - lo))) + lo, hi - 1)
    return int(rng.integers(lo, hi))
