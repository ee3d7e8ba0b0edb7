"""Hand-written attention kernels (`jt.code`): the CPU's blocked attention (forward and backward), the softmax
rows of the memory-efficient path on CPU, and the fused forward for GPU.

    blocked_forward(q, k, v, heads, mask)                     -> out (B, N, H*D), lse (B, H, N)
    blocked_backward(q, k, v, out, lse, dout, heads, mask)    -> dq, dk, dv

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


# --------------------------------------------------------------------------- blocked attention (CPU)

# The CPU's fused path: each (sample, head, block of query rows) is two oneDNN sgemm calls with the block's
# softmax between them, all on a (rows, M) buffer that stays in cache; the blocks are split over the threads
# with OpenMP (each sgemm then runs on its own thread). Heads are read in place from (B, L, H*D) through the
# sgemm leading dimension, so nothing is split, sliced or concatenated, and a whole attention is one op.
# oneDNN comes with Jittor (its mkl_matmul op) and is found at run time by name.
_BLOCKED_HEADER = r"""
#include <algorithm>
#include <cmath>
#include <cfloat>
#include <cstdint>
#include <vector>
#include <dlfcn.h>
#include <omp.h>
typedef int (*jdl_sgemm_t)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t,
                           const float*, int64_t, float, float*, int64_t);
// oneDNN's row-major sgemm: C = alpha * op(A) op(B) + beta * C
inline jdl_sgemm_t jdl_sgemm() {
    static jdl_sgemm_t f = (jdl_sgemm_t)dlsym(RTLD_DEFAULT, "dnnl_sgemm");
    return f;
}
// One (sample, head) pair's views into (B, L, H*D) tensors and its (B|1, H|1, N|1, M) additive mask.
struct JdlHead {
    int b, h;
    size_t q(int row) const { return ((size_t)b * N + row) * HD + (size_t)h * D; }
    size_t kv() const { return (size_t)b * M * HD + (size_t)h * D; }
    const float* mask_row(const float* mask, int row) const {
        if (!mask) return nullptr;
        return mask + (((size_t)(MB == 1 ? 0 : b) * MH + (MH == 1 ? 0 : h)) * MN + (MN == 1 ? 0 : row)) * M;
    }
    int N, M, HD, D, MB, MH, MN;
};
"""

_BLOCKED_SHAPES = r"""
    const int B = in0_shape0, N = in0_shape1, HD = in0_shape2, M = in1_shape1, H = @H@, D = HD / H;
    const int QB = @QB@, nblk = (N + QB - 1) / QB;
    const float scale = @SCALE@;
    const float* mask = @MASK_PTR@;
    const int MB = @MASK_B@, MH = @MASK_H@, MN = @MASK_N@;
    jdl_sgemm_t gemm = jdl_sgemm();
    ASSERT(gemm) << "oneDNN's dnnl_sgemm is not loaded";
"""

_BLOCKED_FORWARD_SRC = _BLOCKED_SHAPES + r"""
    const long tasks = (long)B * H * nblk;
    #pragma omp parallel
    {
        std::vector<float> buf((size_t)QB * M), inv(QB);
        float* s = buf.data();
        #pragma omp for schedule(static)
        for (long t = 0; t < tasks; t++) {
            const JdlHead p{(int)(t / nblk / H), (int)(t / nblk % H), N, M, HD, D, MB, MH, MN};
            const int r0 = (int)(t % nblk) * QB, rows = N - r0 < QB ? N - r0 : QB;
            float* lse = out1_p + ((size_t)p.b * H + p.h) * N + r0;                  // (B, H, N)
            gemm('N', 'T', rows, M, D, scale, in0_p + p.q(r0), HD, in1_p + p.kv(), HD, 0.f, s, M);   // S
            for (int i = 0; i < rows; i++) {                                          // P = exp(S - max)
                float* x = s + (size_t)i * M;
                const float* mk = p.mask_row(mask, r0 + i);
                if (mk) for (int j = 0; j < M; j++) x[j] += mk[j];
                float mx = -FLT_MAX, total = 0.f;
                for (int j = 0; j < M; j++) mx = x[j] > mx ? x[j] : mx;
                for (int j = 0; j < M; j++) { const float e = expf(x[j] - mx); x[j] = e; total += e; }
                lse[i] = mx + logf(total);
                inv[i] = 1.f / total;
            }
            float* o = out0_p + p.q(r0);
            gemm('N', 'N', rows, D, M, 1.f, s, M, in2_p + p.kv(), HD, 0.f, o, HD);  // O = P V / rowsum(P)
            for (int i = 0; i < rows; i++)
                for (int c = 0; c < D; c++) o[(size_t)i * HD + c] *= inv[i];
        }
    }
"""

# The FlashAttention backward (Dao et al. 2022, algorithm 2) on the same blocks. Inputs q, k, v, out, lse, dout
# (, mask); dK and dV sum over query blocks, so each (sample, head) pair's blocks are split into `splits`
# contiguous runs (enough tasks for every thread), each run summing into its own (M, D) buffers, added up last.
_BLOCKED_BACKWARD_SRC = _BLOCKED_SHAPES + r"""
    const int pairs = B * H, threads = omp_get_max_threads();
    const int splits = pairs >= 4 * threads ? 1 : std::min(nblk, (4 * threads + pairs - 1) / pairs);
    const int per = (nblk + splits - 1) / splits;
    const long tasks = (long)pairs * splits;
    std::vector<float> partial((size_t)tasks * 2 * M * D);                  // per task: dK (M, D), dV (M, D)
    #pragma omp parallel
    {
        std::vector<float> pbuf((size_t)QB * M), dbuf((size_t)QB * M), row(QB);
        float *pm = pbuf.data(), *ds = dbuf.data();
        #pragma omp for schedule(static)
        for (long t = 0; t < tasks; t++) {
            const JdlHead p{(int)(t / splits / H), (int)(t / splits % H), N, M, HD, D, MB, MH, MN};
            float* dk = partial.data() + (size_t)t * 2 * M * D;
            float* dv = dk + (size_t)M * D;
            const int first = (int)(t % splits) * per, last = std::min(nblk, first + per);
            for (int blk = first; blk < last; blk++) {
                const int r0 = blk * QB, rows = N - r0 < QB ? N - r0 : QB;
                const float beta = blk == first ? 0.f : 1.f;
                const float* q = in0_p + p.q(r0);
                const float* dout = in5_p + p.q(r0);
                const float* lse = in4_p + ((size_t)p.b * H + p.h) * N + r0;
                gemm('N', 'T', rows, M, D, scale, q, HD, in1_p + p.kv(), HD, 0.f, pm, M);         // S
                gemm('N', 'T', rows, M, D, 1.f, dout, HD, in2_p + p.kv(), HD, 0.f, ds, M);       // dP = dO V^T
                for (int i = 0; i < rows; i++) {
                    const float* o = in3_p + p.q(r0 + i);
                    const float* g = dout + (size_t)i * HD;
                    float r = 0.f;
                    for (int c = 0; c < D; c++) r += g[c] * o[c];                   // rowsum(dO * O)
                    float* x = pm + (size_t)i * M;
                    float* d = ds + (size_t)i * M;
                    const float* mk = p.mask_row(mask, r0 + i);
                    for (int j = 0; j < M; j++) {
                        const float e = expf(x[j] + (mk ? mk[j] : 0.f) - lse[i]);    // P
                        x[j] = e;
                        d[j] = e * (d[j] - r);                                       // dS = P (dP - rowsum)
                    }
                }
                gemm('T', 'N', M, D, rows, 1.f, pm, M, dout, HD, beta, dv, D);                 // dV += P^T dO
                gemm('N', 'N', rows, D, M, scale, ds, M, in1_p + p.kv(), HD, 0.f, out0_p + p.q(r0), HD);  // dQ
                gemm('T', 'N', M, D, rows, scale, ds, M, q, HD, beta, dk, D);                  // dK += dS^T Q
            }
        }
        #pragma omp for schedule(static)
        for (long u = 0; u < (long)pairs * M; u++) {                 // add up each pair's runs into dK, dV
            const int pair = (int)(u / M), j = (int)(u % M);
            const JdlHead p{pair / H, pair % H, N, M, HD, D, MB, MH, MN};
            float* dk = out1_p + p.kv() + (size_t)j * HD;
            float* dv = out2_p + p.kv() + (size_t)j * HD;
            for (int c = 0; c < D; c++) { dk[c] = 0.f; dv[c] = 0.f; }
            for (int sp = 0; sp < splits; sp++) {
                const float* part = partial.data() + ((size_t)pair * splits + sp) * 2 * M * D + (size_t)j * D;
                for (int c = 0; c < D; c++) { dk[c] += part[c]; dv[c] += part[(size_t)M * D + c]; }
            }
        }
    }
"""

# Scores per block kept near 1 MB (the second-level cache); at least 16 rows, at most 512.
BLOCK_BYTES = 2 ** 20


def _block_rows(m: int) -> int:
    return max(16, min(512, BLOCK_BYTES // (4 * m)))


_SGEMM = None


def blocked_available() -> bool:
    """True where the blocked CPU kernels can run: on the CPU, with Jittor's oneDNN loaded (use_mkl)."""
    global _SGEMM
    if jt.flags.use_cuda:
        return False
    if _SGEMM is None:
        import ctypes
        from jittor import compile_extern
        try:
            _SGEMM = compile_extern.mkl_ops is not None and bool(ctypes.CDLL(None).dnnl_sgemm)
        except (AttributeError, OSError):
            _SGEMM = False
    return _SGEMM


def _blocked_source(src: str, heads: int, d: int, m: int, mask, mask_input: int) -> str:
    if mask is not None:
        mb, mh, mn, mm = mask.shape
        if mm != m:
            raise ValueError(f"attention mask has {mm} keys, expected {m}")
    else:
        mb = mh = mn = 1
    fill = {"@H@": heads, "@QB@": _block_rows(m), "@SCALE@": "%.9ef" % (d ** -0.5),
            "@MASK_PTR@": "nullptr" if mask is None else f"in{mask_input}_p",
            "@MASK_B@": mb, "@MASK_H@": mh, "@MASK_N@": mn}
    for key, value in fill.items():
        src = src.replace(key, str(value))
    return src


def blocked_forward(q, k, v, heads: int, mask=None):
    """Attention of float32 q (B, N, heads*D), k/v (B, M, heads*D), additive mask (B|1, heads|1, N|1, M) or
    None -> out (B, N, heads*D), lse (B, heads, N), the log-sum-exp of each query row's scaled scores. CPU."""
    b, n, inner = q.shape
    src = _blocked_source(_BLOCKED_FORWARD_SRC, heads, inner // heads, k.shape[1], mask, 3)
    inputs = [q, k, v] + ([] if mask is None else [mask])
    return jt.code([(b, n, inner), (b, heads, n)], ["float32", "float32"], inputs,
                   cpu_header=_BLOCKED_HEADER, cpu_src=src)


def blocked_backward(q, k, v, out, lse, dout, heads: int, mask=None):
    """The gradients (dq, dk, dv) of `blocked_forward`'s out for the incoming dout, recomputing the scores
    block by block from q, k and the saved lse. CPU."""
    inner = q.shape[2]
    src = _blocked_source(_BLOCKED_BACKWARD_SRC, heads, inner // heads, k.shape[1], mask, 6)
    inputs = [q, k, v, out, lse, dout] + ([] if mask is None else [mask])
    return jt.code([q.shape, k.shape, v.shape], ["float32"] * 3, inputs,
                   cpu_header=_BLOCKED_HEADER, cpu_src=src)


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
