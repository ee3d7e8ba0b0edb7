"""Multi-head scaled dot-product attention (Vaswani et al. 2017): one function, the path chosen by device and size.

    attention(q, k, v, heads, mask=None, upcast=False)     # q (B, N, heads*D), k/v (B, M, heads*D) -> (B, N, heads*D)

Every model here (UNet, VAE, CLIP text encoder, the scorer's networks) calls this one function. Paths:

- "loop": one (sample, head) at a time with 2-D matmuls. On CPU Jittor runs 2-D matmuls through oneDNN but
  batched ones as a generic broadcast-reduce loop (1.3-2.2x slower at SD sizes), so this is the CPU's path
  where "fused" cannot go: dropout, or no oneDNN.
- "batched": all heads in one 4-D matmul (B, H, N, M): what a GPU wants (one batched GEMM, few kernels).
- "memory_efficient": a `jt.Function` whose forward keeps only the output and each row's log-sum-exp, and whose
  backward recomputes the scores one (sample, head, query chunk) at a time (the FlashAttention backward,
  Dao et al. 2022). A plain path keeps every head's N x M exponentials for the backward pass: at 512 px
  (N = M = 4096) that is 64 MB per head per layer, several GB over the UNet. Chosen when gradients flow and the
  saved scores would be large.
- "fused": one kernel for the whole call, never holding more than a block of scores. On CPU (the default
  there): each (sample, head, block of query rows) is two oneDNN sgemm calls with the block's softmax between
  them, in cache, blocks split over the threads, and its backward is the FlashAttention backward on the same
  blocks in one more kernel (attention_kernels.py). On GPU: a CUDA kernel computing a row per thread with an
  online softmax (Milakov & Gimelshein 2018) for head sizes up to 128 without a mask, its backward the
  memory-efficient one; that kernel's row routine also compiles for CPU so its math is tested here.

The plain paths process queries in chunks whenever one chunk's scores would not fit in the memory budget
(`query_chunk_size`: a quarter of the free memory, as diffusers' attention slicing), so inference at 768 px
never allocates all heads' N x M scores at once either.

Softmax is always taken in float32, and normalised after the value matmul (N*D divisions instead of N*M).
"""
from __future__ import annotations

import os
from typing import Optional

from .._runtime import jt
from .attention_kernels import (FUSED_MAX_HEAD_DIM, blocked_available, blocked_backward, blocked_forward,
                                fused_forward, row_softmax, softmax_backward)
from .checkpointing import rebuilding

nn = jt.nn

PATHS = ("loop", "batched", "memory_efficient", "fused")
# Saved scores (bytes, float32, all samples and heads) above which training uses the memory-efficient path.
# The plain paths keep about four N x M buffers per head for the backward (scores, exponentials and their
# slices), so even SD's cross-attention (4096 x 77 per head) and 1024-token self-attention add up to GBs.
# CLIP's 77-token self-attention stays below (about 100 MB over 23 layers): on the memory-efficient path its
# blocks' extra graph nodes took a checkpointed SD 2.1 step past Jittor's 100,000 live ops, above which
# Jittor syncs whenever a Var is created, and a sync while jt.grad builds the backward runs it half-built.
SAVED_SCORES_LIMIT = 2 ** 20
# One block's scores (bytes) from which the memory-efficient forward computes each block before building the
# next (smaller blocks cannot add up to much, and a sync per block would cost more than it saves).
SYNC_BLOCK_BYTES = 2 ** 20
# The memory-efficient path's query blocks: the backward holds about four N x M float32 buffers per block, so
# (n, M) blocks are capped near this size (4096 x 4096 tokens: 3 blocks of 1365 queries, not one of 4096).
MEMORY_EFFICIENT_BLOCK_BYTES = 64 * 2 ** 20
# On CPU, the softmax rows of blocks whose scores need no autograd graph (the memory-efficient path, and
# inference) go through the OpenMP row kernels of attention_kernels.py. False: Jittor's ops (the GPU's way).
ROW_KERNELS = True


# --------------------------------------------------------------------------- memory budget

def free_memory_bytes() -> int:
    """Free memory of the device Jittor computes on: GPU memory under CUDA, else the host's MemAvailable."""
    if jt.flags.use_cuda:
        try:
            import ctypes
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
                try:
                    lib = ctypes.CDLL(name)
                except OSError:
                    continue
                if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
                    return int(free.value)
        except Exception:  # noqa: BLE001  (no runtime: fall through to a safe guess)
            pass
        return 2 * 2 ** 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 * 2 ** 30


def query_chunk_size(n: int, m: int, rows: int = 1, budget: Optional[int] = None) -> int:
    """Queries per chunk so that `rows` (sample, head) pairs' float32 scores for one chunk, with the
    exponentials beside them (x3), use at most `budget` bytes (default: a quarter of the free memory,
    at most 1 GB). `JDIFFUSION_ATTENTION_CHUNK` forces a size."""
    forced = os.environ.get("JDIFFUSION_ATTENTION_CHUNK")
    if forced:
        return max(1, min(n, int(forced)))
    if budget is None:
        budget = min(free_memory_bytes() // 4, 2 ** 30)
    per_query = 3 * 4 * m * max(1, rows)
    return max(1, min(n, budget // per_query))


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- path choice

def _needs_grad(*xs) -> bool:
    return not jt.flags.no_grad and any(x is not None and x.requires_grad for x in xs)


_FORCED_PATH: Optional[str] = None


class attention_path:
    """Force every `attention` call to one path: `with attention_path("batched"): ...` (None: choose)."""

    def __init__(self, path: Optional[str]):
        if path is not None and path not in PATHS:
            raise ValueError(f"unknown attention path {path!r}; choose from {PATHS}")
        self.path = path

    def __enter__(self):
        global _FORCED_PATH
        self.previous, _FORCED_PATH = _FORCED_PATH, self.path
        return self

    def __exit__(self, *exc):
        global _FORCED_PATH
        _FORCED_PATH = self.previous


def choose_path(q, k, v, heads: int, mask=None, dropout: float = 0.0) -> str:
    """The path `attention` takes for these inputs on this device (see the module docstring)."""
    if _FORCED_PATH is not None:
        return _FORCED_PATH
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    grad = _needs_grad(q, k, v)
    if grad and dropout > 0:
        return "loop" if not jt.flags.use_cuda else "batched"   # dropout only on the plain paths
    big = grad and 4 * b * heads * n * m > SAVED_SCORES_LIMIT
    if jt.flags.use_cuda:
        if mask is None and d <= FUSED_MAX_HEAD_DIM:
            return "fused"
        return "memory_efficient" if big else "batched"
    if blocked_available():
        return "fused"
    return "memory_efficient" if big else "loop"


def attention(q, k, v, heads: int, mask=None, upcast: bool = False, dropout: float = 0.0,
              path: Optional[str] = None, chunk: Optional[int] = None):
    """Multi-head scaled dot-product attention.

    q: (B, N, heads*D), k/v: (B, M, heads*D); mask: additive, broadcastable to (B, heads, N, M).
    upcast: compute q k^T in float32 (diffusers' `upcast_attention`); dropout: on the probabilities
    (training only). path: force one of PATHS; chunk: force the query chunk size.
    Returns (B, N, heads*D) in q's dtype.
    """
    if path is None:
        path = choose_path(q, k, v, heads, mask, dropout)
    if path not in PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose from {PATHS}")
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))       # (B|1, heads|1, N|1, M)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float32(), k.float32(), v.float32()
    if path == "fused":
        out = FusedAttention(heads)(q, k, v, None if mask is None else _constant(mask))
    elif path == "memory_efficient":
        out = MemoryEfficientAttention(heads, chunk)(q, k, v, None if mask is None else _constant(mask))
    elif path == "batched":
        out = _batched(q, k, v, heads, mask, dropout, chunk)
    else:
        out = _loop(q, k, v, heads, mask, dropout, chunk)
    return out.cast(dtype)


# --------------------------------------------------------------------------- plain paths

def _reduce_rows(x, op: str):
    """max or sum over the last axis of (N, M) -> (N, 1).

    Jittor's CPU kernel for a last-axis reduce does not vectorise; reducing a (N, 16, M/16)
    view over the middle axis first does, and is 3-4x faster for M >= 256.
    """
    n, m = x.shape
    if m % 16 == 0 and m >= 128:
        x = x.reshape(n, 16, m // 16)
        x = x.max(dim=1) if op == "max" else x.sum(dim=1)                     # (N, M/16)
    return x.max(dim=-1, keepdims=True) if op == "max" else x.sum(dim=-1, keepdims=True)


def _row_kernels() -> bool:
    return ROW_KERNELS and not jt.flags.use_cuda


def _mask_rows(mask, i: int, h: int, rows: slice):
    """The (rows, M) block of a (B|1, H|1, N|1, M) mask for sample i, head h."""
    blk = mask[min(i, mask.shape[0] - 1), min(h, mask.shape[1] - 1)]         # (N|1, M)
    return blk if blk.shape[0] == 1 else blk[rows]


def _loop(q, k, v, heads, mask, dropout, chunk):
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    scale = d ** -0.5
    size = chunk or query_chunk_size(n, m)
    # Inference on large blocks: compute each block before building the next, or Jittor's lazy graph
    # holds every (sample, head) block's scores at once. (Training graphs keep them anyway.)
    grad = _needs_grad(q, k, v)
    eager = not grad and size * m >= 2 ** 20
    kernels = _row_kernels() and not grad and dropout == 0
    samples = []
    for i in range(b):
        outs = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            kh, vh = k[i, :, cols], v[i, :, cols]                             # (M, D)
            parts = []
            for s, e in _chunks(n, size):
                scores = nn.matmul_transpose(q[i, s:e, cols] * scale, kh)     # (n, M)
                if scores.dtype != "float32":
                    scores = scores.float32()
                if mask is not None:
                    scores = scores + _mask_rows(mask, i, h, slice(s, e))
                if kernels:
                    ex, total, _ = row_softmax(scores)                                # (n, M), (n, 1)
                    parts.append(nn.matmul(ex.cast(v.dtype), vh) / total.cast(v.dtype))
                else:
                    # softmax is shift-invariant: the row max needs no gradient. stop_fuse keeps exp()
                    # out of the row-sum kernel (fused, that kernel is 2x slower than both apart).
                    ex = (scores - _reduce_rows(scores, "max").stop_grad()).exp().stop_fuse()   # (n, M)
                    used = nn.dropout(ex, dropout, is_train=True) if dropout > 0 else ex
                    parts.append(nn.matmul(used.cast(v.dtype), vh) / _reduce_rows(ex, "sum").cast(v.dtype))
                if eager:   # one block's scores at a time (see MemoryEfficientAttention)
                    parts[-1].sync()
            outs.append(parts[0] if len(parts) == 1 else jt.concat(parts, dim=0))   # (N, D)
        samples.append(outs[0] if heads == 1 else jt.concat(outs, dim=1))      # (N, heads*D)
    return samples[0].unsqueeze(0) if b == 1 else jt.stack(samples, dim=0)


def _split_heads(x, heads):  # (B, N, H*D) -> (B, H, N, D)
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(0, 2, 1, 3)


def _batched(q, k, v, heads, mask, dropout, chunk):
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    qh, kt, vh = _split_heads(q * d ** -0.5, heads), _split_heads(k, heads).transpose(0, 1, 3, 2), _split_heads(v, heads)
    size = chunk or query_chunk_size(n, m, rows=b * heads)
    parts = []
    for s, e in _chunks(n, size):
        scores = jt.matmul(qh[:, :, s:e], kt).float32()                        # (B, H, n, M)
        if mask is not None:
            scores = scores + (mask if mask.shape[2] == 1 else mask[:, :, s:e])
        ex = (scores - scores.max(dim=-1, keepdims=True).stop_grad()).exp()
        used = nn.dropout(ex, dropout, is_train=True) if dropout > 0 else ex
        parts.append(jt.matmul(used.cast(v.dtype), vh) / ex.sum(dim=-1, keepdims=True).cast(v.dtype))  # (B, H, n, D)
    out = parts[0] if len(parts) == 1 else jt.concat(parts, dim=2)
    return out.transpose(0, 2, 1, 3).reshape(b, n, inner)


# --------------------------------------------------------------------------- memory-efficient path

def _block_matmul(a, b_, transpose_b: bool = False, transpose_a: bool = False):
    """2-D matmul a(^T) b(^T) on CPU (oneDNN), also fine on GPU.

    A transposed left operand goes straight to the BLAS as a flag (oneDNN / cuBLAS `trans_a`): Jittor's
    `transpose` op copies the matrix first, which took a quarter of a 512 px SD 2.1 training step on the
    (n, M) score blocks of the memory-efficient backward. Used only where no gradient flows through the
    product (inside a jt.Function), as the BLAS ops have no backward of their own."""
    if transpose_a:
        blas = _transposing_blas()
        if blas is not None:
            return blas(a, b_, True, transpose_b)
        a = a.transpose(1, 0)
    return nn.matmul_transpose(a, b_) if transpose_b else nn.matmul(a, b_)


def _transposing_blas():
    """The BLAS matmul op with transpose flags for this device (mkl_matmul / cublas_matmul), or None."""
    from jittor import compile_extern
    ops = compile_extern.cublas_ops if jt.flags.use_cuda else compile_extern.mkl_ops
    name = "cublas_matmul" if jt.flags.use_cuda else "mkl_matmul"
    return getattr(ops, name, None) if ops is not None else None


def _constant(x):
    """A stop-grad view of x (Jittor's `detach()` still requires grad)."""
    return x.detach().stop_grad()


class MemoryEfficientAttention(jt.Function):
    """Attention whose backward recomputes the scores per (sample, head, query chunk).

    Saved for the backward: q, k, v, the output and one log-sum-exp per query row (B, H, N): O(N*D), not O(N*M).
    The backward is FlashAttention's (Dao et al. 2022, algorithm 2) on blocks:
        P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K s, dK = dS^T Q s.


    Jittor runs a lazy graph and, left alone, schedules every block's score matmul before any softmax, so
    all blocks' N x M buffers are alive together (10 GB for 5 layers x 5 heads at 4096 tokens, measured).
    Each block is therefore computed (`jt.sync`) before the next is built: the graph upstream runs at that
    point, which costs nothing here (its values are kept for the backward anyway).
    """

    def __init__(self, heads: int, chunk: Optional[int] = None):
        self.heads = heads
        self.chunk = chunk

    def _blocks(self, q, k):
        b, n, inner = q.shape
        d = inner // self.heads
        if self.chunk is None:  # fixed at the forward pass, so the backward walks the same blocks
            budget = min(free_memory_bytes() // 4, MEMORY_EFFICIENT_BLOCK_BYTES)
            self.chunk = query_chunk_size(n, k.shape[1], budget=budget)
        size = self.chunk
        for i in range(b):
            for h in range(self.heads):
                yield i, h, slice(h * d, (h + 1) * d), _chunks(n, size)

    def _scores(self, q, k, i, h, cols, s, e, mask, after=None):
        """One block's scaled scores (n, M); `after`, a zero from `_zero_after`, orders it behind the last block."""
        d = q.shape[2] // self.heads
        qb = q[i, s:e, cols].float32()                                                                # (n, D)
        if after is not None:
            qb = qb + after
        scores = _block_matmul(qb * d ** -0.5, k[i, :, cols].float32(), True)                          # (n, M)
        if mask is not None:
            scores = scores + _mask_rows(mask, i, h, slice(s, e))
        return scores

    def execute(self, q, k, v, mask=None):
        b, n, inner = q.shape
        dtype = q.dtype
        q, k, v = _constant(q), _constant(k), _constant(v)      # the backward is ours: no graph kept here
        samples, lses = [], []
        after = None   # inside a checkpoint's rebuild: a zero tying each block to the previous one (no sync)
        for i, h, cols, chunks in self._blocks(q, k):
            if h == 0:
                samples.append([])
            vh = v[i, :, cols].float32()
            outs = []
            for s, e in chunks:
                scores = self._scores(q, k, i, h, cols, s, e, mask, after)
                if _row_kernels():
                    ex, total, mx = row_softmax(scores)                           # (n, M), (n, 1), (n, 1)
                else:
                    mx = _reduce_rows(scores, "max")                              # (n, 1)
                    ex = (scores - mx).exp().stop_fuse()
                    total = _reduce_rows(ex, "sum")
                outs.append(_block_matmul(ex, vh) / total)                        # (n, D)
                lses.append(mx + total.log())                                     # (n, 1)
                if rebuilding():   # the backward graph is being built: order the blocks instead (see `grad`)
                    after = _zero_after(outs[-1], lses[-1])
                elif 4 * (e - s) * k.shape[1] >= SYNC_BLOCK_BYTES:
                    jt.sync(outs[-1:] + lses[-1:])   # one block's scores at a time (see the class docstring)
            samples[-1].append(outs[0] if len(outs) == 1 else jt.concat(outs, dim=0))
        out = jt.stack([jt.concat(o, dim=1) for o in samples], dim=0)             # (B, N, heads*D) float32
        self.saved = (q, k, v, mask, out, lses)
        return out.cast(dtype)

    def grad(self, dout):
        # Stop-grad copies: Jittor keeps the graph behind any computed Var that could still be differentiated
        # (for higher-order gradients), which would keep every block's N x M buffers alive. (`detach()`
        # alone does not stop gradients in Jittor 1.3.)
        # No jt.sync here: `grad` runs while jt.grad builds the backward graph, and a sync then would run
        # the backward of everything downstream with every gradient jt.grad has built so far held, so each
        # of them is materialised (a 3x3 conv's per-tap gradient is 9 x C_out times its input: GBs at
        # 512 px). Each block instead reads a zero that depends on the previous block's results, so the
        # scheduler cannot start a block's N x M matmuls before the previous block's are consumed.
        q, k, v, out = (_constant(x) for x in self.saved[:3] + self.saved[4:5])
        mask, lses = self.saved[3], [_constant(x) for x in self.saved[5]]
        b, n, inner = q.shape
        d = inner // self.heads
        scale = d ** -0.5
        dout = _constant(dout).float32()
        dq_s, dk_s, dv_s = [], [], []
        lse_iter = iter(lses)
        after = None   # a zero that depends on the previous block's results: blocks run one after another
        for i, h, cols, chunks in self._blocks(q, k):
            if h == 0:
                dq_s.append([]), dk_s.append([]), dv_s.append([])
            kh, vh = k[i, :, cols].float32(), v[i, :, cols].float32()            # (M, D)
            dq_parts, dk, dv = [], None, None
            for s, e in chunks:
                scores = self._scores(q, k, i, h, cols, s, e, mask, after)       # (n, M)
                do = dout[i, s:e, cols]                                           # (n, D)
                dp = _block_matmul(do, vh, True)                                  # (n, M)
                row = (do * out[i, s:e, cols]).sum(dim=1, keepdims=True)          # (n, 1)
                if _row_kernels():
                    p, ds = softmax_backward(scores, next(lse_iter), dp, row)
                else:
                    p = (scores - next(lse_iter)).exp()                          # (n, M)
                    ds = p * (dp - row)                                           # (n, M)
                dv_c = _block_matmul(p, do, transpose_a=True)                      # (M, D)
                dq_parts.append(_block_matmul(ds, kh) * scale)                    # (n, D)
                dk_c = _block_matmul(ds, q[i, s:e, cols].float32(), transpose_a=True) * scale   # (M, D)
                dk = dk_c if dk is None else dk + dk_c
                dv = dv_c if dv is None else dv + dv_c
                after = _zero_after(dq_parts[-1], dk, dv)   # one block's scores at a time (see `grad`'s note)
            dq_s[-1].append(dq_parts[0] if len(dq_parts) == 1 else jt.concat(dq_parts, dim=0))
            dk_s[-1].append(dk)
            dv_s[-1].append(dv)

        def join(parts, like):
            return jt.stack([jt.concat(p, dim=1) for p in parts], dim=0).cast(like.dtype)

        return join(dq_s, q), join(dk_s, k), join(dv_s, v), None


def _zero_after(*xs):
    """A float32 scalar 0 (exactly, even if some x is not finite) computed from the xs: an order dependency."""
    first = xs[0].reshape(-1)[0:1]
    for x in xs[1:]:
        first = first + x.reshape(-1)[0:1]
    return jt.ternary(first == first, jt.zeros((1,), dtype="float32"), jt.zeros((1,), dtype="float32")).stop_grad()


class FusedAttention(MemoryEfficientAttention):
    """Attention in one kernel per pass (see the module docstring's "fused").

    CPU: `blocked_forward` (saving the output and each row's log-sum-exp) and `blocked_backward`.
    GPU, or a CPU without oneDNN: the row-per-thread kernel over all (sample, head) pairs, and the
    memory-efficient backward."""

    def execute(self, q, k, v, mask=None):
        b, n, inner = q.shape
        heads, d = self.heads, inner // self.heads
        self.blocked = blocked_available()
        if self.blocked:
            q32, k32, v32 = (_constant(x).float32() for x in (q, k, v))
            if mask is not None:
                mask = mask.float32().broadcast(tuple(mask.shape[:3]) + (k.shape[1],))
            out, lse = blocked_forward(q32, k32, v32, heads, mask)                # (B, N, heads*D), (B, heads, N)
            self.saved = (q32, k32, v32, mask, out, lse)
            self.dtypes = (q.dtype, k.dtype, v.dtype)
            return out.cast(q.dtype)
        if mask is not None:
            raise ValueError("the row-per-thread fused kernel (GPU) takes no mask; use another attention path")

        def groups(x):  # (B, L, H*D) -> (B*H, L, D) float32, contiguous
            return _split_heads(x.float32(), heads).reshape(b * heads, x.shape[1], d)

        out, lse = fused_forward(groups(q), groups(k), groups(v))                 # (BH, N, D), (BH, N)
        out = out.reshape(b, heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, inner)
        lse = lse.reshape(b, heads, n, 1)
        # the backward walks (sample, head, chunk) blocks in the memory-efficient order
        lses = [lse[i, h, s:e] for i, h, _, chunks in self._blocks(q, k) for s, e in chunks]
        self.saved = (q, k, v, None, out, lses)
        return out.cast(q.dtype)

    def grad(self, dout):
        if not self.blocked:
            return super().grad(dout)
        q, k, v, mask, out, lse = self.saved
        grads = blocked_backward(q, k, v, out, lse, _constant(dout).float32(), self.heads, mask)
        return tuple(g.cast(dtype) for g, dtype in zip(grads, self.dtypes)) + (None,)


__all__ = ["attention", "attention_path", "choose_path", "query_chunk_size", "free_memory_bytes", "PATHS", "MemoryEfficientAttention",
           "FusedAttention"]
