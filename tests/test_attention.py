"""The one attention function: every path (loop, batched, memory-efficient, fused: the CPU's blocked kernels) gives
the same output and gradients as the others and as PyTorch's / diffusers' attention, with masks and query chunks;
the GPU's fused kernel through its row routine's CPU build."""
import numpy as np
import pytest
import torch

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.models import attention as A
from jdiffusion_lora.models.attention import PATHS, attention, attention_path, choose_path, query_chunk_size
from jdiffusion_lora.models.layers import Attention
from helpers import max_abs_diff, randomize

TOL = 1e-5
GRAD_TOL = 1e-4
CPU_PATHS = ["loop", "batched", "memory_efficient", "fused"]   # "fused" is the blocked kernels on CPU
# The path CPU runs take (fused) and its fallbacks are in the default set; the batched (GPU) path compiles
# kernels of its own (about 400 on a cold cache), so it runs in the slow set (CI runs both).


def paths(names=CPU_PATHS):
    return [pytest.param(p, marks=pytest.mark.slow) if p == "batched" else p for p in names]


def _inputs(b=2, n=37, m=29, heads=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((b, length, heads * d)).astype(np.float32) for length in (n, m, m)]


def _torch_attention(q, k, v, heads, mask=None):
    """Reference: torch's scaled_dot_product_attention on (B, H, L, D) heads."""
    def split(x):
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=None if mask is None else torch.from_numpy(mask))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_every_path_matches_torch_sdpa(path, chunk):
    q, k, v = _inputs()
    ref = _torch_attention(q, k, v, 3).numpy()
    with jt.no_grad():
        out = attention(jt.array(q), jt.array(k), jt.array(v), 3, path=path, chunk=chunk).numpy()
    assert out.shape == (2, 37, 24)
    assert max_abs_diff(out, ref) <= TOL


@pytest.mark.parametrize("path", paths(["loop", "batched", "memory_efficient", "fused"]))
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_masked_paths_match_torch(path):
    """Additive masks broadcast over samples/heads (the CLIP causal mask) and per sample."""
    q, k, v = _inputs(n=11, m=11)
    causal = np.triu(np.full((11, 11), -1e9, np.float32), 1)[None, None]            # (1, 1, N, M)
    per_sample = np.random.default_rng(1).standard_normal((2, 1, 11, 11)).astype(np.float32)
    for mask in (causal, per_sample):
        ref = _torch_attention(q, k, v, 3, mask).numpy()
        with jt.no_grad():
            out = attention(jt.array(q), jt.array(k), jt.array(v), 3, mask=jt.array(mask), path=path, chunk=4).numpy()
        assert max_abs_diff(out, ref) <= TOL


@pytest.mark.parametrize("path", paths())
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_every_path_has_the_same_gradients(path):
    """d(sum(out * w))/d(q, k, v) against torch autograd, the memory-efficient backward included."""
    q, k, v = _inputs(n=19, m=23, heads=2, d=8, seed=3)
    w = np.random.default_rng(4).standard_normal((2, 19, 16)).astype(np.float32)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    (_torch_attention(tq, tk, tv, 2) * torch.from_numpy(w)).sum().backward()
    jq, jk, jv = jt.array(q), jt.array(k), jt.array(v)
    out = attention(jq, jk, jv, 2, path=path, chunk=5)
    grads = jt.grad((out * jt.array(w)).sum(), [jq, jk, jv])
    for ours, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert max_abs_diff(ours.numpy(), ref.numpy()) <= GRAD_TOL


@pytest.mark.slow
def test_memory_efficient_masked_gradients():
    q, k, v = _inputs(n=9, m=9, heads=2, d=4, seed=5)
    mask = np.triu(np.full((9, 9), -1e9, np.float32), 1)[None, None]
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    _torch_attention(tq, tk, tv, 2, mask).pow(2).sum().backward()
    jq, jk, jv = jt.array(q), jt.array(k), jt.array(v)
    out = attention(jq, jk, jv, 2, mask=jt.array(mask), path="memory_efficient", chunk=4)
    for ours, ref in zip(jt.grad((out * out).sum(), [jq, jk, jv]), (tq.grad, tk.grad, tv.grad)):
        assert max_abs_diff(ours.numpy(), ref.numpy()) <= GRAD_TOL


@pytest.mark.parametrize("path", paths())
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_attention_module_matches_diffusers(path):
    """diffusers' Attention (self- and cross-attention, SD 2 head layout) with our module forced onto each path."""
    from diffusers.models.attention_processor import Attention as TorchAttention

    ref = randomize(TorchAttention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=False), seed=2)
    ours = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, bias=False)
    ours.load_parameters({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 20, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 12)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx)).numpy()
    with jt.no_grad(), attention_path(path):
        got = ours(jt.array(x), encoder_hidden_states=jt.array(ctx)).numpy()
    assert max_abs_diff(got, expected) <= TOL


def test_path_choice_on_cpu(monkeypatch):
    """CPU: the blocked kernels (fused) for inference and training, with or without a mask; without oneDNN the
    per-head loop, or the memory-efficient path when the saved scores would be large; dropout: the loop."""
    assert not jt.flags.use_cuda
    small = [jt.array(x) for x in _inputs(b=1, n=16, m=16, heads=2)]
    big = [jt.zeros((1, 4096, 320)) for _ in range(3)]
    assert A.blocked_available()
    with jt.no_grad():
        assert choose_path(*small, heads=2) == "fused"
        assert choose_path(*big, heads=5, mask=jt.zeros((1, 1, 4096, 4096))) == "fused"
    assert choose_path(*big, heads=5) == "fused"
    assert choose_path(*big, heads=5, dropout=0.1) == "loop"            # dropout: only the plain paths
    monkeypatch.setattr(A, "blocked_available", lambda: False)
    assert choose_path(*big, heads=5) == "memory_efficient"          # 5 heads x 4096^2 floats = 320 MB saved
    with jt.no_grad():
        assert choose_path(*small, heads=2) == "loop"
        assert choose_path(*big, heads=5) == "loop"
    with attention_path("batched"):
        assert choose_path(*small, heads=2) == "batched"
    with pytest.raises(ValueError, match="unknown attention path"):
        attention_path("flash")
    assert set(CPU_PATHS) == set(PATHS)


def test_blocked_kernels_split_rows_and_runs(monkeypatch):
    """The blocked kernels with several query blocks per (sample, head), the backward's blocks split into runs
    whose dK/dV partial sums are added at the end, and a per-sample mask: output and gradients against torch."""
    from jdiffusion_lora.models import attention_kernels as K

    monkeypatch.setattr(K, "BLOCK_BYTES", 4 * 29 * 16)                  # 16 query rows per block: 3 blocks of 37
    q, k, v = _inputs(b=2, n=37, m=29, heads=3, d=8, seed=11)
    mask = np.random.default_rng(12).standard_normal((2, 1, 37, 29)).astype(np.float32)
    w = np.random.default_rng(13).standard_normal((2, 37, 24)).astype(np.float32)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    ref = _torch_attention(tq, tk, tv, 3, mask)
    (ref * torch.from_numpy(w)).sum().backward()
    jq, jk, jv = jt.array(q), jt.array(k), jt.array(v)
    out = attention(jq, jk, jv, 3, mask=jt.array(mask), path="fused")
    assert max_abs_diff(out.numpy(), ref.detach().numpy()) <= TOL
    grads = jt.grad((out * jt.array(w)).sum(), [jq, jk, jv])
    for ours, expected in zip(grads, (tq.grad, tk.grad, tv.grad)):
        assert max_abs_diff(ours.numpy(), expected.numpy()) <= GRAD_TOL


@pytest.mark.slow   # compiles the GPU kernel's row routine for CPU
def test_gpu_fused_kernel_row_routine_matches_torch():
    q, k, v = _inputs(b=2, n=13, m=9, heads=1, d=8, seed=14)
    out, lse = A.fused_forward(jt.array(q), jt.array(k), jt.array(v))   # (G, N, D) heads: here G = B, one head
    assert max_abs_diff(out.numpy(), _torch_attention(q, k, v, 1).numpy()) <= TOL
    scores = np.einsum("gnd,gmd->gnm", q, k) * 8 ** -0.5
    expected = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    assert np.abs(lse.numpy() - expected).max() <= TOL


def test_query_chunks_follow_the_budget(monkeypatch):
    assert query_chunk_size(4096, 4096, budget=1 << 40) == 4096                          # everything fits
    assert query_chunk_size(4096, 4096, rows=1, budget=3 * 4 * 4096 * 100) == 100
    assert query_chunk_size(4096, 4096, budget=1) == 1
    monkeypatch.setattr(A, "free_memory_bytes", lambda: 4 * 3 * 4 * 4096 * 512)          # a quarter: 512 rows
    assert query_chunk_size(4096, 4096) == 512
    monkeypatch.setenv("JDIFFUSION_ATTENTION_CHUNK", "64")
    assert query_chunk_size(4096, 4096) == 64


def test_fused_kernel_rejects_large_heads():
    x = jt.zeros((1, 4, 256))
    with pytest.raises(ValueError, match="head sizes up to 128"):
        A.fused_forward(x, x, x)


@pytest.mark.parametrize("m", [29, 64, 144, 256])
def test_row_kernels_give_the_op_paths_numbers_bit_for_bit(m, monkeypatch):
    """The CPU row kernels (softmax rows, memory-efficient backward) against Jittor's op-by-op path: the same
    bits for the forward (inference's loop path; the memory-efficient path with a mask), the same gradients to
    float32 rounding; m covers both row-sum orders (16 strided partial sums when m % 16 == 0 and m >= 128)."""
    q, k, v = _inputs(b=2, n=21, m=m, heads=2, d=8, seed=7)
    mask = np.random.default_rng(8).standard_normal((2, 1, 21, m)).astype(np.float32)
    w = jt.array(np.random.default_rng(9).standard_normal((2, 21, 16)).astype(np.float32))

    def run(kernels):
        monkeypatch.setattr(A, "ROW_KERNELS", kernels)
        jq, jk, jv = jt.array(q), jt.array(k), jt.array(v)
        with jt.no_grad():
            plain = attention(jq, jk, jv, 2, path="loop", chunk=8).numpy()
        out = attention(jq, jk, jv, 2, mask=jt.array(mask), path="memory_efficient", chunk=8)
        grads = jt.grad((out * w).sum(), [jq, jk, jv])
        return [plain, out.numpy()] + [g.numpy() for g in grads]

    with_kernels, with_ops = run(True), run(False)
    assert np.abs(with_kernels[0] - _torch_attention(q, k, v, 2).numpy()).max() <= TOL
    for a, b in zip(with_kernels[:2], with_ops[:2]):
        assert np.array_equal(a, b)
    # Jittor compiles its fused backward (exp and product in one kernel) with -Ofast: last-bit differences
    for a, b in zip(with_kernels[2:], with_ops[2:]):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
