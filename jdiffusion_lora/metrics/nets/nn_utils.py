"""Small Jittor pieces the scoring networks share: eval-mode batch norm, pooling, resizing.

Everything here is inference-only and matches the PyTorch function named in each docstring.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict

import numpy as np

from ..._runtime import jt

nn = jt.nn


class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    Parameter names as torch (weight, bias, running_mean, running_var); `num_batches_tracked`
    in checkpoints is dropped by `drop_num_batches_tracked`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = jt.ones((num_features,), dtype="float32")
        self.bias = jt.zeros((num_features,), dtype="float32")
        self.running_mean = jt.zeros((num_features,), dtype="float32")
        self.running_var = jt.ones((num_features,), dtype="float32")

    def execute(self, x):  # (B, C, H, W)
        scale = self.weight / jt.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def drop_num_batches_tracked(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@lru_cache(maxsize=64)
def _pool_counts(h: int, w: int, k: int, pad: int) -> np.ndarray:
    """How many real (non-padding) pixels each stride-1 k x k window covers, (1, 1, H', W')."""
    def counts(n):  # per axis: real pixels under each window position
        return np.convolve(np.pad(np.ones(n), pad), np.ones(k), "valid")
    return np.outer(counts(h), counts(w)).astype(np.float32)[None, None]


def avg_pool_exclude_pad(x, kernel_size: int = 3, padding: int = 1):
    """F.avg_pool2d(x, k, stride=1, padding, count_include_pad=False).

    Jittor's `count_include_pad=False` still divides by k*k at the borders (and its pool refuses
    inputs not larger than the kernel), so the zero padding and the division by the true window
    sizes are done here.
    """
    k, p = kernel_size, padding
    b, c, h, w = x.shape
    oh, ow = h + 2 * p - k + 1, w + 2 * p - k + 1
    extra_h, extra_w = max(0, k + 1 - (h + 2 * p)), max(0, k + 1 - (w + 2 * p))
    if p or extra_h or extra_w:
        x = nn.pad(x, [p, p + extra_w, p, p + extra_h], mode="constant", value=0.0)
    summed = nn.AvgPool2d(k, 1, 0)(x)[:, :, :oh, :ow] * float(k * k)
    return summed / jt.array(_pool_counts(h, w, k, p))


def max_pool(x, kernel_size: int, stride: int, padding: int = 0, ceil_mode: bool = False):
    """F.max_pool2d(x, kernel_size, stride, padding, ceil_mode).

    Padding is done here with -inf rows/columns (and one more where needed), because Jittor's
    pool refuses inputs not larger than the kernel; the output is cropped to torch's size.
    """
    k, s, p = kernel_size, stride, padding
    b, c, h, w = x.shape

    def out_size(n):
        span = n + 2 * p - k
        size = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (size - 1) * s >= n + p:  # torch: the last window must start inside the input
            size -= 1
        return size

    oh, ow = out_size(h), out_size(w)
    # enough -inf on the bottom/right for ceil_mode windows and for Jittor's size check
    extra_h = max(0, (oh - 1) * s + k - (h + 2 * p), k + 1 - (h + 2 * p))
    extra_w = max(0, (ow - 1) * s + k - (w + 2 * p), k + 1 - (w + 2 * p))
    if p or extra_h or extra_w:
        x = nn.pad(x, [p, p + extra_w, p, p + extra_h], mode="constant", value=-1e30)
    y = nn.MaxPool2d(k, s, 0)(x)
    return y[:, :, :oh, :ow]


@lru_cache(maxsize=32)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of F.interpolate(mode="bilinear", align_corners=False, antialias=False) on one axis."""
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def resize_bilinear(x, height: int, width: int):
    """(B, C, H, W) -> (B, C, height, width) like F.interpolate(bilinear, align_corners=False)."""
    b, c, h, w = x.shape
    if (h, w) == (height, width):
        return x
    my = jt.array(bilinear_matrix(h, height))          # (height, H)
    mx = jt.array(bilinear_matrix(w, width))           # (width, W)
    y = jt.matmul(x.reshape(b * c, h, w), mx.transpose(1, 0))          # (BC, H, width)
    y = jt.matmul(my, y)                                               # (BC, height, width)
    return y.reshape(b, c, height, width)
