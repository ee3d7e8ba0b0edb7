"""The CPU kernels for GroupNorm(+SiLU), LayerNorm and the GEGLU gate (models/layer_kernels.py): forward values
against a float64 NumPy reference, used without gradients in place of Jittor's ops, and never where a gradient
must reach a trainable parameter (their backward is tested through lean_backward in test_lean_backward.py)."""
import numpy as np
import pytest
from scipy.special import erf

from jdiffusion_lora import jt
from jdiffusion_lora.models import layer_kernels, unet_2d_condition
from jdiffusion_lora.models.layers import GroupNorm, LayerNorm, norm_act

TOL = 2e-6


def _group_norm_ref(x, groups, eps, w, b, silu):
    n, c = x.shape[:2]
    h = x.astype(np.float64).reshape(n, groups, -1)
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
    h = h.reshape(x.shape)
    if w is not None:
        shape = (1, c) + (1,) * (x.ndim - 2)
        h = h * w.reshape(shape) + b.reshape(shape)
    return h / (1 + np.exp(-h)) if silu else h


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_kernel_matches_float64(affine, silu):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 12, 5, 7)) * 3 + 10).astype(np.float32)      # a large mean: two-pass variance
    w, b = (rng.standard_normal(12).astype(np.float32) for _ in range(2))
    args = (jt.array(w), jt.array(b)) if affine else (None, None)
    y, mean, std = layer_kernels.group_norm(jt.array(x).reshape(2, 12, 35), 3, 1e-6, *args, silu=silu)
    ref = _group_norm_ref(x, 3, 1e-6, w if affine else None, b, silu)
    assert np.abs(y.numpy().reshape(x.shape) - ref).max() <= TOL * np.abs(ref).max()
    groups = x.astype(np.float64).reshape(2, 3, -1)
    np.testing.assert_allclose(mean.numpy()[..., 0], groups.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(std.numpy()[..., 0], np.sqrt(groups.var(-1) + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernel_matches_float64(affine):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((11, 40)) * 2 - 5).astype(np.float32)
    w, b = (rng.standard_normal(40).astype(np.float32) for _ in range(2))
    y, mean, std = layer_kernels.layer_norm(jt.array(x), 1e-5, *((jt.array(w), jt.array(b)) if affine else ()))
    h = x.astype(np.float64)
    ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    if affine:
        ref = ref * w + b
    assert np.abs(y.numpy() - ref).max() <= TOL * np.abs(ref).max()
    np.testing.assert_allclose(std.numpy()[:, 0], np.sqrt(h.var(-1) + 1e-5), rtol=1e-6)


def test_geglu_kernel_and_gradient_match_float64():
    rng = np.random.default_rng(2)
    h = (rng.standard_normal((9, 2 * 13)) * 2).astype(np.float32)
    dy = rng.standard_normal((9, 13)).astype(np.float32)
    a, g = h[:, :13].astype(np.float64), h[:, 13:].astype(np.float64)
    cdf, pdf = 0.5 * (1 + erf(g / np.sqrt(2))), np.exp(-0.5 * g * g) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(layer_kernels.geglu(jt.array(h)).numpy(), a * g * cdf, rtol=1e-5, atol=1e-6)
    dh = layer_kernels.geglu_grad(jt.array(h), jt.array(dy)).numpy()
    np.testing.assert_allclose(dh, np.concatenate([dy * g * cdf, dy * a * (cdf + g * pdf)], 1), rtol=1e-5, atol=1e-6)


def _count_calls(monkeypatch, name):
    calls = []
    original = getattr(layer_kernels, name)
    monkeypatch.setattr(layer_kernels, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


MODULES = {
    "group_norm_silu": (lambda: GroupNorm(4, 16, eps=1e-6), lambda m, x: norm_act(m, jt.nn.silu, x), (2, 16, 6, 5),
                        "group_norm"),
    "layer_norm": (lambda: LayerNorm(24), lambda m, x: m(x), (2, 9, 24), "layer_norm"),
    "geglu": (lambda: unet_2d_condition.GEGLU(24, 12), lambda m, x: m(x), (2, 9, 24), "geglu"),
}


@pytest.mark.parametrize("case", sorted(MODULES))
def test_inference_uses_the_kernel_with_the_op_paths_values(case, monkeypatch):
    make, call, shape, kernel = MODULES[case]
    jt.set_global_seed(3)
    module = make()
    rng = np.random.default_rng(3)
    for p in module.parameters():
        p.assign(jt.array(rng.standard_normal(p.shape).astype(np.float32)))
    x = jt.array((rng.standard_normal(shape) * 2 + 1).astype(np.float32))
    calls = _count_calls(monkeypatch, kernel)
    with jt.no_grad():
        with_kernel = call(module, x).numpy()
        assert calls == [kernel]
        monkeypatch.setattr(layer_kernels, "ENABLED", False)
        with_ops = call(module, x).numpy()
    assert calls == [kernel]
    assert np.abs(with_kernel - with_ops).max() <= 1e-5 * np.abs(with_ops).max()


def test_a_trainable_norm_weight_gets_its_gradient_not_the_kernel(monkeypatch):
    """With gradients on, a stop-grad input and a trainable weight: the kernel (no autograd) must not be used."""
    calls = _count_calls(monkeypatch, "layer_norm")
    ln = LayerNorm(8)
    x = jt.array(np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)).stop_grad()
    gw = jt.grad((ln(x) * jt.arange(8).float32()).sum(), ln.weight).numpy()
    xs = x.numpy().astype(np.float64)
    xhat = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(gw, (xhat * np.arange(8)).sum(0), rtol=1e-5, atol=1e-5)
    assert calls == []
