"""Hand-written attention kernels (`jt.code`): the softmax rows of the memory-efficient path on CPU, and the
fused forward for GPU.

Jittor runs its own elementwise and reduce kernels on one CPU thread. The memory-efficient attention's
(n, M) score blocks pass through four of them in the forward (row max, exp, row sum, log) and two in the
backward (exp, P * (dP - row)): at 512 px that was about 2 s of an SD 2.1 training step. The row kernels
below do each pass in one sweep over a block, split over the CPU's threads with OpenMP (Jittor compiles
`jt.code` with -fopenmp): same math, about 2x faster on two cores, and one op instead of six.

    row_softmax(scores)              -> ex = exp(scores - rowmax), total = rowsum(ex), rowmax
    softmax_backward(s, lse, dp, r)  -> p = exp(s - lse), ds = p * (dp - r)

The row sums add in the order of `attention._reduce_rows`, so the forward gives the op-by-op path's numbers
bit for bit (tests/test_attention.py): a checkpointed block's two forward passes (the first without
gradients, on the kernel; the rebuilt one with them, on Jittor's ops) compute the same values. The backward
agrees to float32 rounding (Jittor compiles its own fused exp-and-product with -Ofast).
"""
from __future__ import annotations

from .._runtime import jt

FUSED_MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- CPU softmax rows

_ROW_HEADER = "#include <cmath>\n#include <cfloat>\n"

_ROW_SOFTMAX_SRC = r"""
    const int n = in0_shape0, m = in0_shape1;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float* x = in0_p + (size_t)i * m;
        float* ex = out0_p + (size_t)i * m;
        float mx = -FLT_MAX;
        for (int j = 0; j < m; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < m; j++) ex[j] = expf(x[j] - mx);
        // the row sum in the order of attention._reduce_rows: 16 strided partial sums, then their sum
        const int w = (m % 16 == 0 && m >= 128) ? m / 16 : m, parts = m / w;
        float total = 0.f;
        for (int c = 0; c < w; c++) {
            float acc = 0.f;
            for (int a = 0; a < parts; a++) acc += ex[(size_t)a * w + c];
            total += acc;
        }
        out1_p[i] = total;
        out2_p[i] = mx;
    }
"""

_SOFTMAX_BACKWARD_SRC = r"""
    const int n = in0_shape0, m = in0_shape1;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float* s = in0_p + (size_t)i * m;
        const float* dp = in2_p + (size_t)i * m;
        float* p = out0_p + (size_t)i * m;
        float* ds = out1_p + (size_t)i * m;
        const float lse = in1_p[i], row = in3_p[i];
        for (int j = 0; j < m; j++) { float e = expf(s[j] - lse); p[j] = e; ds[j] = e * (dp[j] - row); }
    }
"""


def row_softmax(scores):
    """(n, M) float32 scores -> ex (n, M), total (n, 1), mx (n, 1): the softmax numerator exp(scores - mx),
    its row sums and the row maxima (the log-sum-exp is mx + log(total)). CPU only."""
    n, m = scores.shape
    return jt.code([(n, m), (n, 1), (n, 1)], ["float32"] * 3, [scores],
                   cpu_header=_ROW_HEADER, cpu_src=_ROW_SOFTMAX_SRC)


def softmax_backward(scores, lse, dp, row):
    """The memory-efficient backward's elementwise step on one (n, M) block: p = exp(scores - lse) and
    ds = p * (dp - row), with lse and row (n, 1). CPU only."""
    n, m = scores.shape
    return jt.code([(n, m), (n, m)], ["float32"] * 2, [scores, lse, dp, row],
                   cpu_header=_ROW_HEADER, cpu_src=_SOFTMAX_BACKWARD_SRC)


# --------------------------------------------------------------------------- fused forward (GPU)

# One query row per thread: q . k_j for every key, online softmax (running max and sum, the accumulator
# rescaled when the max grows), then out = acc / sum and lse = max + log(sum). The row routine is shared by
# the CUDA kernel (a thread per row) and a CPU loop (the same math, so tests check it without a GPU).
_FUSED_HEADER = r"""
#include <cmath>
#ifdef __CUDACC__
#define JDL_HD __device__ __forceinline__
#else
#define JDL_HD inline
#endif
#define JDL_D @D@
JDL_HD void jdl_attention_row(const float* qr, const float* kb, const float* vb, float* orow, float* lse,
                              int m, float scale) {
    float qs[JDL_D], acc[JDL_D];
    for (int c = 0; c < JDL_D; c++) { qs[c] = qr[c] * scale; acc[c] = 0.f; }
    float mx = -1e30f, total = 0.f;
    for (int j = 0; j < m; j++) {
        const float* kj = kb + (size_t)j * JDL_D;
        const float* vj = vb + (size_t)j * JDL_D;
        float s = 0.f;
        for (int c = 0; c < JDL_D; c++) s += qs[c] * kj[c];
        float mn = s > mx ? s : mx;
        float shrink = expf(mx - mn);
        float p = expf(s - mn);
        total = total * shrink + p;
        for (int c = 0; c < JDL_D; c++) acc[c] = acc[c] * shrink + p * vj[c];
        mx = mn;
    }
    for (int c = 0; c < JDL_D; c++) orow[c] = acc[c] / total;
    *lse = mx + logf(total);
}
"""

_FUSED_CUDA = r"""
#ifdef __CUDACC__
__global__ void jdl_attention_fwd_@D@(const float* q, const float* k, const float* v, float* o, float* lse,
                                     int n, int m, float scale) {
    int bh = blockIdx.y;
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    size_t r = (size_t)bh * n + row;
    jdl_attention_row(q + r * JDL_D, k + (size_t)bh * m * JDL_D, v + (size_t)bh * m * JDL_D,
                      o + r * JDL_D, lse + r, m, scale);
}
#endif
"""

_FUSED_CUDA_SRC = r"""
    int bh = in0_shape0, n = in0_shape1, m = in1_shape1;
    dim3 grid((n + 127) / 128, bh);
    jdl_attention_fwd_@D@<<<grid, 128>>>(in0_p, in1_p, in2_p, out0_p, out1_p, n, m, @SCALE@f);
"""

_FUSED_CPU_SRC = r"""
    int bh = in0_shape0, n = in0_shape1, m = in1_shape1;
    for (int g = 0; g < bh; g++)
        for (int row = 0; row < n; row++) {
            size_t r = (size_t)g * n + row;
            jdl_attention_row(in0_p + r * JDL_D, in1_p + (size_t)g * m * JDL_D, in2_p + (size_t)g * m * JDL_D,
                              out0_p + r * JDL_D, out1_p + r, m, @SCALE@f);
        }
"""


def fused_forward(qh, kh, vh):
    """The fused kernel on (G, N, D) / (G, M, D) float32 heads -> (out (G, N, D), lse (G, N))."""
    g, n, d = qh.shape
    if d > FUSED_MAX_HEAD_DIM:
        raise ValueError(f"the fused attention kernel handles head sizes up to {FUSED_MAX_HEAD_DIM}, got {d}")
    fill = {"@D@": str(d), "@SCALE@": repr(float(d ** -0.5))}

    def sub(src):
        for key, value in fill.items():
            src = src.replace(key, value)
        return src

    header = sub(_FUSED_HEADER)
    out, lse = jt.code([(g, n, d), (g, n)], ["float32", "float32"], [qh, kh, vh],
                       cpu_header=header, cpu_src=sub(_FUSED_CPU_SRC),
                       cuda_header=header + sub(_FUSED_CUDA), cuda_src=sub(_FUSED_CUDA_SRC))
    return out, lse
