"""Adapter math: what an adapter's tensors are for each kind, its rank and scale, and the weight
update (delta) it makes, in closed form. `state.py` (the in-memory form of a LoRA file) and
`layers.py` (the adapted layers) both use it, on numpy arrays and on Jittor Vars alike.
Tensor names inside a module (shapes for a base weight of shape (out, in[, kh, kw])):

| kind | tensors |
|------|---------|
| lora | down (r, in[, kh, kw]), up (out, r[, 1, 1]); optional mid (r, r, kh, kw) (LoCon Tucker form, then down is (r, in, 1, 1)) |
| loha | w1_a (out, r), w1_b (r, in*kh*kw), w2_a, w2_b; Tucker form: t1, t2 (r, r, kh, kw) with w*_a (r, out), w*_b (r, in) |
| lokr | w1 (a, c) or w1_a (a, r) + w1_b (r, c); w2 (b, d[, kh, kw]) or w2_a (b, r) + w2_b (r, d*kh*kw); Tucker: t2 (r, r, kh, kw) with w2_a (r, b), w2_b (r, d); delta = kron(w1, w2) |

Any kind may carry `magnitude` (DoRA): shaped to broadcast against the weight, (out, 1[, 1, 1])
to normalise each output row (PEFT / current LyCORIS) or (1, in[, 1, 1]) to normalise each input
column (older LyCORIS "wd_on_out=False").

Scale: alpha / rank; no alpha means alpha = rank (scale 1). A LoKr with both factors full has
no rank and scale 1, as in LyCORIS.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np

KINDS = ("lora", "loha", "lokr")

# Which tensor names each kind may carry (magnitude is allowed for all).
KIND_TENSORS = {
    "lora": {"down", "up", "mid"},
    "loha": {"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"},
    "lokr": {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2"},
}


class LoraError(ValueError):
    """A LoRA file or state dict that cannot be used as asked (names the offending keys)."""


def strict_or_warn(message: str, strict: bool) -> None:
    """Problems found while reading or loading a LoRA: strict -> LoraError(message); otherwise a
    warning that says the listed items were skipped."""
    if strict:
        raise LoraError(message)
    warnings.warn(message + " -- skipped (strict=False)")


class AdapterTensors:
    """What follows from an adapter's kind, tensors and alpha; shared by the file-side
    `state.ModuleLora` (numpy) and the layer-side `layers.Adapter` (Jittor Vars)."""

    kind: str
    tensors: Dict[str, object]
    alpha: Optional[float]

    @property
    def rank(self) -> Optional[int]:
        return rank_of(self.kind, self.tensors)

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank)

    @property
    def uses_dora(self) -> bool:
        return "magnitude" in self.tensors


def rank_of(kind: str, tensors) -> Optional[int]:
    """The adapter rank (None for a LoKr whose two Kronecker factors are both full)."""
    t = tensors
    if kind == "lora":
        return int(t["down"].shape[0])
    if kind == "loha":
        return int(t["w1_b"].shape[0])
    if "w2_b" in t:
        return int(t["w2_b"].shape[0])
    if "w1_b" in t:
        return int(t["w1_b"].shape[0])
    return None


def scale_of(alpha: Optional[float], rank: Optional[int]) -> float:
    """alpha / rank; 1.0 without alpha (alpha = rank) or without rank."""
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


# --------------------------------------------------------------------------- closed forms
#
# Written with operations that numpy arrays and Jittor Vars share (@, reshape, transpose,
# broadcasting), so the layers in `layers.py` use the very same code on Vars.


def _flat2d(x):
    return x.reshape(x.shape[0], -1)


def tucker_rebuild(t, wa, wb):
    """Tucker/CP rebuild: t (i, j, kh, kw), wa (i, out), wb (j, in) -> (out, in, kh, kw).

    result[o, n, h, w] = sum_ij t[i, j, h, w] * wa[i, o] * wb[j, n]
    """
    i, j, kh, kw = t.shape
    out, inp = wa.shape[1], wb.shape[1]
    x = t.transpose(0, 2, 3, 1).reshape(i * kh * kw, j) @ wb             # (i*kh*kw, in)
    x = x.reshape(i, kh * kw * inp)
    x = wa.transpose(1, 0) @ x                                           # (out, kh*kw*in)
    return x.reshape(out, kh, kw, inp).transpose(0, 3, 1, 2)


def kron(a, b):
    """Kronecker product of a (l, m) with b (k, n[, kh, kw]) -> (l*k, m*n[, kh, kw])."""
    l, m = a.shape
    k, n = b.shape[0], b.shape[1]
    rest = tuple(b.shape[2:])
    a_ = a.reshape(l, 1, m, 1, *([1] * len(rest)))
    b_ = b.reshape(1, k, 1, n, *rest)
    return (a_ * b_).reshape(l * k, m * n, *rest)


def delta_weight(kind: str, t: Dict, scale: float, weight_shape=None):
    """scale * weight update of one adapter. `t` holds numpy arrays or Jittor Vars."""
    if kind == "lora":
        if "mid" in t:   # LoCon Tucker: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1)
            d = tucker_rebuild(t["mid"], _flat2d(t["up"]).transpose(1, 0), _flat2d(t["down"]))
        else:
            d = _flat2d(t["up"]) @ _flat2d(t["down"])                    # (out, in*kh*kw)
            if weight_shape is None:
                down = t["down"]
                weight_shape = (t["up"].shape[0],) + tuple(down.shape[1:])
    elif kind == "loha":
        if "t1" in t:
            d = tucker_rebuild(t["t1"], t["w1_a"], t["w1_b"]) * tucker_rebuild(t["t2"], t["w2_a"], t["w2_b"])
        else:
            d = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])       # (out, in*kh*kw)
    elif kind == "lokr":
        w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]            # (a, c)
        if "w2" in t:
            w2 = t["w2"]                                                # (b, d[, kh, kw])
        elif "t2" in t:
            w2 = tucker_rebuild(t["t2"], t["w2_a"], t["w2_b"])           # (b, d, kh, kw)
        else:
            w2 = t["w2_a"] @ t["w2_b"]                                  # (b, d*kh*kw)
            if weight_shape is not None and len(weight_shape) == 4:
                w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
        d = kron(w1, w2)
    else:
        raise LoraError(f"unknown adapter kind {kind!r}")
    if weight_shape is not None:
        d = d.reshape(*weight_shape)
    return d * scale


def norm_axes(magnitude_shape, ndim: int) -> Tuple[int, ...]:
    """Axes to take the DoRA norm over: all axes where the magnitude has size 1."""
    if len(magnitude_shape) == 1:   # PEFT's (out,) vector
        return tuple(range(1, ndim))
    return tuple(i for i in range(ndim) if magnitude_shape[i] == 1)


def weight_norm(weight: np.ndarray, magnitude_shape) -> np.ndarray:
    """L2 norm of `weight` per output row or input column, shaped like the magnitude."""
    axes = norm_axes(magnitude_shape, weight.ndim)
    return np.sqrt((weight.astype(np.float32) ** 2).sum(axis=axes, keepdims=True))


def magnitude_for_weight(magnitude: np.ndarray, weight_ndim: int) -> np.ndarray:
    """Reshape PEFT's (out,) magnitude vector to (out, 1[, 1, 1]); other shapes are kept."""
    if magnitude.ndim == 1:
        return magnitude.reshape(-1, *([1] * (weight_ndim - 1)))
    return magnitude
