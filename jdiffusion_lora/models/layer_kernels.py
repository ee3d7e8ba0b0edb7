"""Hand-written CPU kernels (`jt.code`, OpenMP) for the layers whose Jittor op graphs cost the most time per
byte: GroupNorm (+ SiLU), LayerNorm and the GEGLU gate, forward and backward.

Jittor runs its own elementwise and reduce kernels on one CPU thread, and a normalisation written as ops is
several of them (row mean, centre, square, row mean, divide, scale, shift, SiLU), each a full sweep over the
tensor; the GEGLU's two halves are sliced into copies first. Each kernel below does the same math in two or
three sweeps per group or row, the groups/rows split over the CPU's threads, and is one op instead of eight.

    group_norm(x, G, eps, w, b, silu)          -> y, mean, std       x (B, C, ...); mean, std (B, G, 1)
    group_norm_grad(x, mean, std, dy, ...)     -> dx
    layer_norm(x, eps, w, b)                   -> y, mean, std       x (..., C); mean, std (N, 1), N rows
    layer_norm_grad(x, mean, std, dy, w)       -> dx
    geglu(h)                                   -> a * gelu(g)        h (..., 2I) = [a | g]
    geglu_grad(h, dy)                          -> dh (..., 2I)

Outputs and gradients have their input's shape (the kernels see it flattened to groups or rows).

Group and row sums accumulate in float64, so the statistics are at least as accurate as the op path's (and
torch's). The formulas are the ones in lean_backward.py. Used on CPU for float32 tensors whenever `applies`
says so; GPUs and half precision keep Jittor's ops. Inference and training (including a checkpointed block's
two forward passes) go through the same kernels, so they compute the same values.
"""
from __future__ import annotations

from .._runtime import jt

# False: Jittor's ops everywhere (the GPU's way), e.g. to compare the two paths in the tests.
ENABLED = True

# Shared by the norms: a group's or row's two-pass statistics, and the last sweep of their backward.
_HEADER = r"""
#include <cmath>
#include <cstddef>
// mean and sd = sqrt(var + eps) of x[0..n), two passes, summed in double
inline void jdl_moments(const float* x, size_t n, float eps, float* mean, float* sd) {
    double sum = 0.0, sq = 0.0;
    for (size_t k = 0; k < n; k++) sum += x[k];
    const float m = (float)(sum / n);
    for (size_t k = 0; k < n; k++) { const double c = x[k] - m; sq += c * c; }
    *mean = m;
    *sd = sqrtf((float)(sq / n) + eps);
}
// dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sd, with dx holding dxhat, s1 = sum(dxhat) and
// s2 = sum(dxhat * xhat) over the n values
inline void jdl_normalise_grad(const float* x, float* dx, size_t n, float mean, float sd, double s1, double s2) {
    const float m1 = (float)(s1 / n), m2 = (float)(s2 / n);
    for (size_t k = 0; k < n; k++) dx[k] = (dx[k] - m1 - (x[k] - mean) / sd * m2) / sd;
}
"""
# JDL_W(c), JDL_B(c): channel c's affine weight and bias (inputs W and B), or 1 and 0 without them.
_AFFINE_HEADER = _HEADER + r"""
#undef JDL_W
#undef JDL_B
#if @AFFINE@
#define JDL_W(c) in@W@_p[c]
#define JDL_B(c) in@B@_p[c]
#else
#define JDL_W(c) 1.f
#define JDL_B(c) 0.f
#endif
"""


def applies(x) -> bool:
    """True where the kernels replace Jittor's ops on x: enabled, on the CPU, x float32. The kernels have no
    autograd of their own: lean_backward's Functions call them with their gradients; elsewhere see below."""
    return ENABLED and not jt.flags.use_cuda and x.dtype == "float32"


def applies_without_grad(x, *params) -> bool:
    """`applies`, and no gradient can flow to x or to the (None allowed) parameters."""
    if not applies(x):
        return False
    return jt.flags.no_grad or all(v is None or v.is_stop_grad() for v in (x,) + params)


def _literal(value: float) -> str:
    return "%.9ef" % value


def _source(src: str, **subs) -> str:
    for key, value in subs.items():
        src = src.replace("@%s@" % key, str(value))
    return src


# --------------------------------------------------------------------------- GroupNorm (+ SiLU)

# in: x (B, C, S) [, weight (C,), bias (C,)]; out: y (B, C, S), mean (B, G, 1), std (B, G, 1)
_GROUP_NORM = r"""
    const int B = in0_shape0, C = in0_shape1, S = in0_shape2, G = @G@, Cg = C / G;
    const size_t K = (size_t)Cg * S;
    #pragma omp parallel for schedule(static)
    for (int bg = 0; bg < B * G; bg++) {
        const size_t start = ((size_t)(bg / G) * C + (size_t)(bg % G) * Cg) * S;
        const float* x = in0_p + start;
        float* y = out0_p + start;
        float mean, sd;
        jdl_moments(x, K, @EPS@, &mean, &sd);
        for (int ci = 0; ci < Cg; ci++) {
            const int c = (bg % G) * Cg + ci;
            const float w = JDL_W(c), b = JDL_B(c);
            for (int s = 0; s < S; s++) {
                const size_t k = (size_t)ci * S + s;
                const float v = (x[k] - mean) / sd * w + b;
                y[k] = @SILU@ ? v / (1.f + expf(-v)) : v;
            }
        }
        out1_p[bg] = mean;
        out2_p[bg] = sd;
    }
"""

# in: x, mean, std, dy [, weight, bias]; out: dx. dxhat = dy * silu'(y) * w, then
# dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / std over each group.
_GROUP_NORM_GRAD = r"""
    const int B = in0_shape0, C = in0_shape1, S = in0_shape2, G = @G@, Cg = C / G;
    const size_t K = (size_t)Cg * S;
    #pragma omp parallel for schedule(static)
    for (int bg = 0; bg < B * G; bg++) {
        const size_t start = ((size_t)(bg / G) * C + (size_t)(bg % G) * Cg) * S;
        const float* x = in0_p + start;
        const float* dy = in3_p + start;
        float* dx = out0_p + start;
        const float mean = in1_p[bg], sd = in2_p[bg];
        double s1 = 0.0, s2 = 0.0;
        for (int ci = 0; ci < Cg; ci++) {
            const int c = (bg % G) * Cg + ci;
            const float w = JDL_W(c), b = JDL_B(c);
            for (int s = 0; s < S; s++) {
                const size_t k = (size_t)ci * S + s;
                const float xh = (x[k] - mean) / sd;
                float d = dy[k];
                if (@SILU@) {
                    const float v = xh * w + b, sg = 1.f / (1.f + expf(-v));
                    d *= sg * (1.f + v * (1.f - sg));
                }
                d *= w;
                dx[k] = d;
                s1 += d;
                s2 += (double)d * xh;
            }
        }
        jdl_normalise_grad(x, dx, K, mean, sd, s1, s2);
    }
"""


def _affine(weight, bias, first: int):
    """(inputs, header) for the affine weight/bias (None: none) passed after `first` other inputs."""
    if weight is None:
        return [], _source(_AFFINE_HEADER, AFFINE=0, W=0, B=0)
    inputs = [weight.float32()] + ([] if bias is None else [bias.float32()])
    return inputs, _source(_AFFINE_HEADER, AFFINE=1, W=first, B=first + 1)


def group_norm(x, groups: int, eps: float, weight=None, bias=None, silu: bool = False):
    """x (B, C, ...) float32 -> (y like x, mean (B, G, 1), std (B, G, 1)); y = silu?(xhat * w + b)."""
    b, c = x.shape[:2]
    x3 = x.reshape(b, c, -1)                                                  # (B, C, S)
    affine, header = _affine(weight, bias, 1)
    src = _source(_GROUP_NORM, G=groups, EPS=_literal(eps), SILU=int(silu))
    y, mean, std = jt.code([x3.shape, (b, groups, 1), (b, groups, 1)], ["float32"] * 3, [x3] + affine,
                           cpu_header=header, cpu_src=src)
    return y.reshape(x.shape), mean, std


def group_norm_grad(x, mean, std, dy, groups: int, weight=None, bias=None, silu: bool = False):
    """The gradient of `group_norm`'s y with respect to x, from dy (like x); the affine weights are frozen."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1)                                # (B, C, S)
    affine, header = _affine(weight, bias, 4)
    src = _source(_GROUP_NORM_GRAD, G=groups, SILU=int(silu))
    dx = jt.code(x3.shape, "float32", [x3, mean, std, dy.reshape(x3.shape)] + affine, cpu_header=header, cpu_src=src)
    return dx.reshape(x.shape)


# --------------------------------------------------------------------------- LayerNorm

# in: x (N, C) [, weight (C,), bias (C,)]; out: y (N, C), mean (N, 1), std (N, 1)
_LAYER_NORM = r"""
    const int N = in0_shape0, C = in0_shape1;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* x = in0_p + (size_t)i * C;
        float* y = out0_p + (size_t)i * C;
        float mean, sd;
        jdl_moments(x, C, @EPS@, &mean, &sd);
        for (int k = 0; k < C; k++)
            y[k] = (x[k] - mean) / sd * JDL_W(k) + JDL_B(k);
        out1_p[i] = mean;
        out2_p[i] = sd;
    }
"""

# in: x, mean, std, dy [, weight]; out: dx
_LAYER_NORM_GRAD = r"""
    const int N = in0_shape0, C = in0_shape1;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* x = in0_p + (size_t)i * C;
        const float* dy = in3_p + (size_t)i * C;
        float* dx = out0_p + (size_t)i * C;
        const float mean = in1_p[i], sd = in2_p[i];
        double s1 = 0.0, s2 = 0.0;
        for (int k = 0; k < C; k++) {
            const float d = dy[k] * JDL_W(k);
            dx[k] = d;
            s1 += d;
            s2 += (double)d * ((x[k] - mean) / sd);
        }
        jdl_normalise_grad(x, dx, C, mean, sd, s1, s2);
    }
"""


def layer_norm(x, eps: float, weight=None, bias=None):
    """x (..., C) float32 -> (y like x, mean (N, 1), std (N, 1)) over its N rows; y = xhat * w + b."""
    x2 = x.reshape(-1, x.shape[-1])                                           # (N, C)
    affine, header = _affine(weight, bias, 1)
    y, mean, std = jt.code([x2.shape, (x2.shape[0], 1), (x2.shape[0], 1)], ["float32"] * 3, [x2] + affine,
                           cpu_header=header, cpu_src=_source(_LAYER_NORM, EPS=_literal(eps)))
    return y.reshape(x.shape), mean, std


def layer_norm_grad(x, mean, std, dy, weight=None):
    """The gradient of `layer_norm`'s y with respect to x, from dy (like x); the affine weights are frozen."""
    x2 = x.reshape(-1, x.shape[-1])                                           # (N, C)
    affine, header = _affine(weight, None, 4)
    dx = jt.code(x2.shape, "float32", [x2, mean, std, dy.reshape(x2.shape)] + affine, cpu_header=header,
                 cpu_src=_LAYER_NORM_GRAD)
    return dx.reshape(x.shape)


# --------------------------------------------------------------------------- GEGLU gate

_GEGLU_HEADER = _HEADER + "#define JDL_INV_SQRT2 0.70710678118654752f\n#define JDL_INV_SQRT_2PI 0.3989422804014327f\n"

# in: h (N, 2I); out: (N, I) = a * g * Phi(g), Phi the normal cdf (exact, erf-based GELU)
_GEGLU = r"""
    const int N = in0_shape0, I = in0_shape1 / 2;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* a = in0_p + (size_t)i * 2 * I;
        const float* g = a + I;
        float* y = out0_p + (size_t)i * I;
        for (int k = 0; k < I; k++) y[k] = a[k] * (g[k] * 0.5f * (1.f + erff(g[k] * JDL_INV_SQRT2)));
    }
"""

# in: h (N, 2I), dy (N, I); out: dh (N, 2I) = [dy * g Phi(g) | dy * a (Phi(g) + g phi(g))]
_GEGLU_GRAD = r"""
    const int N = in0_shape0, I = in0_shape1 / 2;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* a = in0_p + (size_t)i * 2 * I;
        const float* g = a + I;
        const float* dy = in1_p + (size_t)i * I;
        float* da = out0_p + (size_t)i * 2 * I;
        float* dg = da + I;
        for (int k = 0; k < I; k++) {
            const float cdf = 0.5f * (1.f + erff(g[k] * JDL_INV_SQRT2));
            const float pdf = expf(-0.5f * g[k] * g[k]) * JDL_INV_SQRT_2PI;
            da[k] = dy[k] * g[k] * cdf;
            dg[k] = dy[k] * a[k] * (cdf + g[k] * pdf);
        }
    }
"""


def geglu(h):
    """h (..., 2I) float32 = [value | gate] -> value * gelu(gate), (..., I)."""
    half = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * half)                                              # (N, 2I)
    y = jt.code((h2.shape[0], half), "float32", [h2], cpu_header=_GEGLU_HEADER, cpu_src=_GEGLU)
    return y.reshape(tuple(h.shape[:-1]) + (half,))


def geglu_grad(h, dy):
    """The gradient of `geglu` with respect to h (..., 2I), from dy (..., I)."""
    h2 = h.reshape(-1, h.shape[-1])                                           # (N, 2I)
    dh = jt.code(h2.shape, "float32", [h2, dy.reshape(h2.shape[0], -1)], cpu_header=_GEGLU_HEADER,
                 cpu_src=_GEGLU_GRAD)
    return dh.reshape(h.shape)


__all__ = ["ENABLED", "applies", "applies_without_grad", "group_norm", "group_norm_grad", "layer_norm", "layer_norm_grad", "geglu",
           "geglu_grad"]
