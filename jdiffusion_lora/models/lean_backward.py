"""Normalisations and activations whose backward keeps only what its formula needs.

Jittor runs a training step's forward and backward as one graph and keeps every forward value that some
backward op reads until that op runs. Written as plain Jittor ops, a GroupNorm keeps its centred input, a SiLU
(x * sigmoid(x)) its input and its sigmoid, a GEGLU both halves of its projection plus the GELU and the erf
inside it: several full-size tensors per layer (at 512 px, most of a LoRA step's memory). PyTorch keeps only what
each backward formula reads. These `jt.Function`s do the same: their forward is the plain path's arithmetic
(same values), and they save

    group_norm_act(x)   x and one (mean, std) per group           (B, C, ...)  +  (B, G, 1) x 2
    layer_norm(x)       x and one (mean, std) per row             (..., C)     +  (..., 1) x 2
    geglu(h)            h, the projection                         (..., 2I)
    lora_linear(x)      x and the rank-r activation h = x D^T     (..., Cin)   +  (..., r)
    frozen_linear(x)    nothing (dx = dy W reads only the weight)

then rebuild the rest in the backward. frozen_linear matters more than it looks: a plain Jittor matmul keeps its
input for the backward even when the weight needs no gradient (its broadcast marks the input as needed), so
every frozen projection (proj_in/proj_out, the feed-forward's two layers, CLIP's MLP) kept its input alive.
Used only where a gradient flows and the affine weights are frozen (LoRA training): the weight/bias get no
gradient here. On the CPU, the norms and the GEGLU run as the OpenMP kernels of layer_kernels.py (same
formulas); elsewhere (GPU, half precision) as Jittor ops.

Formulas (xhat = (x - mean) / std, y = xhat * w + b, reductions over each group / row of size K):
    dxhat = dy * w,   dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / std
    silu(y) = y * s, s = sigmoid(y):      d/dy = s * (1 + y * (1 - s))
    gelu(g) = g * Phi(g):                 d/dg = Phi(g) + g * phi(g),  Phi, phi: the normal cdf and pdf
    y = x W^T + b + s (x D^T) U^T:        dx = dy W + s (dy U) D,  dU = s dy^T h,  dD = s (dy U)^T x
"""
from __future__ import annotations

import math

from .._runtime import jt
from . import layer_kernels
from .attention import _block_matmul, _constant

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def lean_backward_applies(x, *frozen) -> bool:
    """True where these functions should replace the plain path: gradients are on, x needs one, and the
    affine parameters (None allowed) are frozen."""
    if jt.flags.no_grad or x.is_stop_grad():
        return False
    return all(p is None or p.is_stop_grad() for p in frozen)


def _normalise(h, eps: float, axis: int):
    """Two-pass normalisation of float32 h over `axis` -> (xhat, mean, std), std = sqrt(var + eps)."""
    mean = h.mean(dim=axis, keepdims=True)
    c = h - mean
    std = jt.sqrt((c * c).mean(dim=axis, keepdims=True) + eps)
    return c / std, mean, std


def _normalise_grad(dxhat, xhat, std, axis: int):
    """d(loss)/d(input) of xhat = (h - mean) / std from d(loss)/d(xhat)."""
    return (dxhat - dxhat.mean(dim=axis, keepdims=True)
            - xhat * (dxhat * xhat).mean(dim=axis, keepdims=True)) / std


def _frozen_affine(fn):
    """fn's affine (weight, bias) as stop-grad Vars, or (None, None) without them."""
    return (None, None) if fn.weight is None else (_constant(fn.weight), _constant(fn.bias))


def _silu_grad(y):
    s = jt.sigmoid(y)
    return s * (1.0 + y * (1.0 - s))


class GroupNormAct(jt.Function):
    """GroupNorm (frozen affine weight/bias), optionally followed by SiLU; saves x and the group statistics."""

    def __init__(self, groups: int, eps: float, weight, bias, silu: bool):
        self.groups, self.eps, self.silu = groups, eps, silu
        self.weight, self.bias = weight, bias

    def _affine(self, xhat, shape):
        """(B, G, K) normalised -> (B, C, ...) with the affine weight and bias, float32."""
        h = xhat.reshape(shape)
        if self.weight is not None:
            c = (1, shape[1]) + (1,) * (len(shape) - 2)
            h = h * _constant(self.weight).float32().reshape(c) + _constant(self.bias).float32().reshape(c)
        return h

    def execute(self, x):
        x = _constant(x)
        if layer_kernels.applies(x):
            y, mean, std = layer_kernels.group_norm(x, self.groups, self.eps, *_frozen_affine(self), silu=self.silu)
            self.saved = (x, mean, std)
            return y
        xhat, mean, std = _normalise(x.float32().reshape(x.shape[0], self.groups, -1), self.eps, 2)   # (B, G, K)
        y = self._affine(xhat, x.shape)
        self.saved = (x, mean, std)
        return (y * jt.sigmoid(y) if self.silu else y).cast(x.dtype)

    def grad(self, dout):
        x, mean, std = self.saved
        self.saved = None
        shape, n = x.shape, x.shape[0]
        dy = _constant(dout).float32()                                           # (B, C, ...)
        if layer_kernels.applies(x):
            return layer_kernels.group_norm_grad(x, mean, std, dy, self.groups, *_frozen_affine(self), silu=self.silu)
        xhat = (x.float32().reshape(n, self.groups, -1) - mean) / std           # (B, G, K)
        if self.silu:
            dy = dy * _silu_grad(self._affine(xhat, shape))
        if self.weight is not None:
            dy = dy * _constant(self.weight).float32().reshape((1, shape[1]) + (1,) * (len(shape) - 2))
        dx = _normalise_grad(dy.reshape(n, self.groups, -1), xhat, std, 2)
        return dx.reshape(shape).cast(x.dtype)


class LayerNormFn(jt.Function):
    """LayerNorm over the last axis (frozen affine weight/bias); saves x and the row statistics."""

    def __init__(self, eps: float, weight, bias):
        self.eps, self.weight, self.bias = eps, weight, bias

    def execute(self, x):
        x = _constant(x)
        if layer_kernels.applies(x):
            y, mean, std = layer_kernels.layer_norm(x, self.eps, *_frozen_affine(self))
            self.saved = (x, mean, std)                                          # mean, std: (N, 1)
            return y
        xhat, mean, std = _normalise(x.float32(), self.eps, -1)                  # (..., C)
        self.saved = (x, mean, std)
        if self.weight is not None:
            xhat = xhat * _constant(self.weight).float32() + _constant(self.bias).float32()
        return xhat.cast(x.dtype)

    def grad(self, dout):
        x, mean, std = self.saved
        self.saved = None
        dxhat = _constant(dout).float32()
        if layer_kernels.applies(x):
            return layer_kernels.layer_norm_grad(x, mean, std, dxhat, _frozen_affine(self)[0])
        if self.weight is not None:
            dxhat = dxhat * _constant(self.weight).float32()
        xhat = (x.float32() - mean) / std
        return _normalise_grad(dxhat, xhat, std, -1).cast(x.dtype)


class Geglu(jt.Function):
    """value * gelu(gate) for h = (..., 2I) = [value | gate] (exact, erf-based GELU); saves h."""

    def execute(self, h):
        h = _constant(h)
        self.saved = h
        half = h.shape[-1] // 2
        if layer_kernels.applies(h):
            return layer_kernels.geglu(h)
        return h[..., :half] * jt.nn.gelu(h[..., half:])                        # (..., I)

    def grad(self, dout):
        h, self.saved = self.saved, None
        half = h.shape[-1] // 2
        if layer_kernels.applies(h):
            return layer_kernels.geglu_grad(h, _constant(dout).float32())
        a, g = h[..., :half].float32(), h[..., half:].float32()                  # (..., I)
        do = _constant(dout).float32()
        cdf = 0.5 * (1.0 + jt.erf(g * _INV_SQRT2))
        pdf = (g * g * -0.5).exp() * _INV_SQRT_2PI
        da = do * (g * cdf)
        dg = do * a * (cdf + g * pdf)
        return jt.concat([da, dg], dim=-1).cast(h.dtype)


class FrozenLinear(jt.Function):
    """x W^T + b for a frozen W, b; saves nothing: dx = dy W."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def _product(self, x2):
        """(N, Cin) -> x W^T + b, (N, Cout)."""
        out = jt.nn.matmul_transpose(x2, _constant(self.weight))
        return out if self.bias is None else out + _constant(self.bias)

    def _product_grad(self, dy):
        """(N, Cout) -> dy W, (N, Cin)."""
        return jt.nn.matmul(dy, _constant(self.weight))

    def execute(self, x):
        self.shape, self.dtype = x.shape, x.dtype
        out = self._product(_constant(x).reshape(-1, x.shape[-1]))              # (N, Cout)
        return out.reshape(tuple(x.shape[:-1]) + (self.weight.shape[0],))

    def grad(self, dout):
        dy = _constant(dout).reshape(-1, dout.shape[-1])                         # (N, Cout)
        return self._product_grad(dy).reshape(self.shape).cast(self.dtype)


class LoraLinear(FrozenLinear):
    """A frozen Linear (weight W, bias b) plus one low-rank adapter (down D (r, Cin), up U (Cout, r), scale s).
    Plain ops keep several copies of x per layer (10 input-sized tensors per layer, measured); this saves x and h."""

    def __init__(self, weight, bias, scale: float):
        super().__init__(weight, bias)
        self.scale = scale

    def execute(self, x, down, up):
        shape = x.shape
        x2 = _constant(x).reshape(-1, shape[-1])                                 # (N, Cin)
        down, up = _constant(down), _constant(up)
        out = self._product(x2)                                                  # (N, Cout)
        h = jt.nn.matmul_transpose(x2, down)                                     # (N, r)
        out = out + jt.nn.matmul_transpose(h, up) * self.scale
        self.saved = (x2, h, down, up, shape)
        return out.reshape(tuple(shape[:-1]) + (self.weight.shape[0],))

    def grad(self, dout):
        x2, h, down, up, shape = self.saved
        self.saved = None
        dy = _constant(dout).reshape(-1, dout.shape[-1])                         # (N, Cout)
        dh = jt.nn.matmul(dy, up) * self.scale                                   # (N, r)
        dx = self._product_grad(dy) + jt.nn.matmul(dh, down)                     # (N, Cin)
        d_up = _block_matmul(dy, h, transpose_a=True) * self.scale               # (Cout, r)
        d_down = _block_matmul(dh, x2, transpose_a=True)                         # (r, Cin)
        return dx.reshape(shape), d_down, d_up


def frozen_linear(x, weight, bias):
    """x W^T + b for a frozen W, b with the lean backward (keeps nothing of x)."""
    return FrozenLinear(weight, bias)(x)


def lora_linear(x, weight, bias, down, up, scale: float):
    """x W^T + b + scale * (x D^T) U^T for a frozen W, b, with the lean backward (float32)."""
    return LoraLinear(weight, bias, scale)(x, down, up)


def group_norm_act(norm, x, silu: bool = False):
    """`norm` (our GroupNorm module) on x, then SiLU if `silu`, with the lean backward."""
    weight = norm.weight if norm.affine else None
    bias = norm.bias if norm.affine else None
    return GroupNormAct(norm.num_groups, norm.eps, weight, bias, silu)(x)


def layer_norm(norm, x):
    """`norm` (our LayerNorm module) on x with the lean backward."""
    weight = norm.weight if norm.elementwise_affine else None
    bias = norm.bias if norm.elementwise_affine else None
    return LayerNormFn(norm.eps, weight, bias)(x)


def geglu(h):
    """value * gelu(gate) of the (..., 2I) projection h with the lean backward."""
    return Geglu()(h)


__all__ = ["lean_backward_applies", "group_norm_act", "layer_norm", "geglu", "lora_linear", "frozen_linear",
           "GroupNormAct", "LayerNormFn", "Geglu", "LoraLinear", "FrozenLinear"]
