"""The lean-backward GroupNorm(+SiLU), LayerNorm, GEGLU and frozen Linear (models/lean_backward.py): same forward values and
same gradients as the plain Jittor path and as PyTorch's autograd, used only where the affine weights are frozen."""
import numpy as np
import pytest
import torch

from jdiffusion_lora import jt
from jdiffusion_lora.lora import AdapterConfig, inject_adapter, lora_parameters
from jdiffusion_lora.lora.layers import LoraLayer
from jdiffusion_lora.models import layer_kernels, layers, unet_2d_condition
from jdiffusion_lora.models.lean_backward import FrozenLinear, Geglu, GroupNormAct, LayerNormFn, LoraLinear, geglu
from jdiffusion_lora.models.layers import GroupNorm, LayerNorm, norm_act

GRAD_TOL = 2e-5


def _plain(monkeypatch):
    """Force the plain path everywhere the models choose the lean one."""
    for module in (layers, unet_2d_condition):
        monkeypatch.setattr(module, "lean_backward_applies", lambda *a: False)
    monkeypatch.setattr(LoraLayer, "_lean_adapter", lambda self, x: None)


def _frozen(module, seed):
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.assign(jt.array(rng.standard_normal(p.shape).astype(np.float32)))
        p.stop_grad()
    return module


def _value_and_grad(fn, x, seed=1):
    xv = jt.array(x)
    y = fn(xv)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(np.float32)
    return y.numpy(), jt.grad((y * jt.array(dy)).sum(), xv).numpy(), dy


CASES = {
    "group_norm": (lambda: _frozen(GroupNorm(4, 16, eps=1e-6), 0), lambda m, x: m(x), (2, 16, 5, 7)),
    "group_norm_silu": (lambda: _frozen(GroupNorm(4, 16, eps=1e-6), 0), lambda m, x: norm_act(m, jt.nn.silu, x),
                        (2, 16, 5, 7)),
    "layer_norm": (lambda: _frozen(LayerNorm(24), 0), lambda m, x: m(x), (2, 9, 24)),
    "geglu": (lambda: _frozen(unet_2d_condition.GEGLU(24, 12), 0), lambda m, x: m(x), (2, 9, 24)),
    "linear": (lambda: _frozen(layers.Linear(24, 12), 0), lambda m, x: m(x), (2, 9, 24)),
    "linear_no_bias": (lambda: _frozen(layers.Linear(24, 12, bias=False), 0), lambda m, x: m(x), (3, 24)),
}


@pytest.mark.slow   # compiles the plain path's backward kernels, which no default test needs (CI runs the slow set)
@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lean_matches_plain_path(case, kernels, monkeypatch):
    """The lean functions on Jittor's ops compute the plain path's forward bit for bit; on the CPU kernels
    (layer_kernels.py; the plain path with gradients stays on ops) to float32 rounding."""
    monkeypatch.setattr(layer_kernels, "ENABLED", kernels)
    make, call, shape = CASES[case]
    module = make()
    x = (np.random.default_rng(2).standard_normal(shape) * 3 + 1).astype(np.float32)
    used = []
    for cls in (GroupNormAct, LayerNormFn, Geglu, FrozenLinear):   # the lean function really runs
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _o=cls.__call__: used.append(1) or _o(self, *a))
    y_lean, g_lean, _ = _value_and_grad(lambda v: call(module, v), x)
    assert used
    _plain(monkeypatch)
    y_plain, g_plain, _ = _value_and_grad(lambda v: call(module, v), x)
    if kernels:
        assert np.abs(y_lean - y_plain).max() <= 2e-6 * np.abs(y_plain).max()
    else:
        np.testing.assert_array_equal(y_lean, y_plain)                   # the same forward arithmetic
    assert np.abs(g_lean - g_plain).max() <= GRAD_TOL * max(1.0, np.abs(g_plain).max())


def test_lean_matches_torch_autograd():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 16, 6, 5)) * 2 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    gn = GroupNorm(4, 16, eps=1e-5)
    gn.weight.assign(jt.array(w)), gn.bias.assign(jt.array(b))
    gn.weight.stop_grad(), gn.bias.stop_grad()
    _, got, dy = _value_and_grad(lambda v: norm_act(gn, jt.nn.silu, v), x)
    xt = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.silu(torch.nn.functional.group_norm(xt, 4, torch.from_numpy(w), torch.from_numpy(b), 1e-5)
                             ).backward(torch.from_numpy(dy))
    assert np.abs(got - xt.grad.numpy()).max() <= 1e-5

    h = (rng.standard_normal((2, 7, 32)) * 2).astype(np.float32)
    _, got, dy = _value_and_grad(geglu, h)
    ht = torch.from_numpy(h).requires_grad_()
    a, g = ht.chunk(2, dim=-1)
    (a * torch.nn.functional.gelu(g)).backward(torch.from_numpy(dy))
    assert np.abs(got - ht.grad.numpy()).max() <= 1e-5

    ln = LayerNorm(32)
    ln.weight.assign(jt.array(w.repeat(2))), ln.bias.assign(jt.array(b.repeat(2)))
    ln.weight.stop_grad(), ln.bias.stop_grad()
    _, got, dy = _value_and_grad(ln, h)
    ht = torch.from_numpy(h).requires_grad_()
    torch.nn.functional.layer_norm(ht, (32,), torch.from_numpy(w.repeat(2)), torch.from_numpy(b.repeat(2))
                                   ).backward(torch.from_numpy(dy))
    assert np.abs(got - ht.grad.numpy()).max() <= 1e-5


def _held_bytes(shape):
    """Bytes held by live, allocated Vars of `shape` (Jittor's graph dump)."""
    import re
    total, seen = 0, set()
    for info in jt.dump_all_graphs().nodes_info:
        m = re.match(r"Var\(\d+:[^,]*,[^,]*,[^,]*,([0-9a-fx]+)\)\[([^\]]*)\]", info)
        if m and m.group(1) != "0" and m.group(1) not in seen and m.group(2) == ",".join(map(str, shape)) + ",":
            seen.add(m.group(1))
            total += 4 * int(np.prod(shape))
    return total


def test_frozen_linear_keeps_nothing_of_its_input():
    """Plain Jittor keeps a frozen matmul's input until the backward; the lean Linear keeps none of it, so two
    frozen Linears in a row leave only the (Python-held) input and output alive after the forward."""
    first, second = _frozen(layers.Linear(48, 40), 0), _frozen(layers.Linear(40, 48), 1)
    scale = jt.array(np.float32([2.0]))       # a trainable input upstream: gradients flow through both layers
    x = jt.array(np.random.default_rng(8).standard_normal((300, 48)).astype(np.float32)).stop_grad() * scale
    mid_shape = (300, 40)
    y = second(first(x))
    loss = (y * y).sum()
    loss.sync()
    assert _held_bytes(mid_shape) == 0                  # the first layer's output was freed after the second read it
    g = jt.grad(loss, scale).numpy()
    w1, w2 = first.weight.numpy(), second.weight.numpy()
    xs = x.numpy() / 2.0
    y_np = (xs * 2 @ w1.T + first.bias.numpy()) @ w2.T + second.bias.numpy()
    np.testing.assert_allclose(g, [(2 * y_np * ((xs @ w1.T) @ w2.T)).sum()], rtol=1e-4)


def test_trainable_affine_keeps_the_plain_path():
    """A GroupNorm whose weight trains must still get its gradient (the lean functions give it none)."""
    gn = GroupNorm(4, 16)
    x = jt.array(np.random.default_rng(4).standard_normal((1, 16, 3, 3)).astype(np.float32))
    gw, gx = jt.grad((norm_act(gn, jt.nn.silu, x) ** 2).sum(), [gn.weight, x])
    assert np.abs(gw.numpy()).max() > 0 and np.abs(gx.numpy()).max() > 0


@pytest.mark.slow   # compiles the plain path's backward kernels, which no default test needs (CI runs the slow set)
def test_unet_lora_gradients_unchanged(monkeypatch):
    """A whole tiny UNet's LoRA gradients (and the context's) with the lean functions equal the plain path's."""
    from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

    jt.set_global_seed(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, use_linear_projection=True, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    for p in unet.parameters():
        p.stop_grad()
    inject_adapter(unet, config=AdapterConfig(rank=4, init_up="gaussian", seed=0), targets="attn")
    params = lora_parameters(unet)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((1, 7, 32)).astype(np.float32)

    def grads():
        c = jt.array(ctx)
        out = unet(jt.array(x).stop_grad(), np.array([500.0], np.float32), c).sample
        return [g.numpy() for g in jt.grad((out * out).mean(), params + [c])]

    lean = grads()
    _plain(monkeypatch)
    plain = grads()
    worst = max(np.abs(a - b).max() / max(1e-3, np.abs(b).max()) for a, b in zip(lean, plain))
    assert worst <= 1e-4


class _Proj(jt.nn.Module):
    def __init__(self):
        self.to_q = jt.nn.Linear(24, 16)


@pytest.mark.slow   # compiles the plain path's backward kernels, which no default test needs (CI runs the slow set)
def test_lora_linear_matches_plain_path(monkeypatch):
    """A frozen Linear with a rank-4 LoRA: same output, same gradients for x, down and up; dropout keeps the
    plain path."""
    jt.set_global_seed(0)
    m = _Proj()
    for p in m.parameters():
        p.stop_grad()
    inject_adapter(m, config=AdapterConfig(rank=4, alpha=2.0, init_up="gaussian", seed=0), targets=["to_q"])
    params = lora_parameters(m)
    x = np.random.default_rng(6).standard_normal((2, 5, 24)).astype(np.float32)

    def run():
        xv = jt.array(x)
        y = m.to_q(xv)
        dy = jt.array(np.random.default_rng(7).standard_normal(y.shape).astype(np.float32))
        return [y.numpy()] + [g.numpy() for g in jt.grad((y * dy).sum(), [xv] + params)]

    used = []
    monkeypatch.setattr(LoraLinear, "__call__", lambda self, *a, _o=LoraLinear.__call__: used.append(1) or _o(self, *a))
    lean = run()
    assert used
    _plain(monkeypatch)
    plain = run()
    np.testing.assert_allclose(lean[0], plain[0], rtol=0, atol=1e-6)
    for a, b in zip(lean[1:], plain[1:]):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    monkeypatch.undo()
    m.to_q._adapters[m.to_q.adapter_names[0]].dropout = 0.1
    assert m.to_q._lean_adapter(jt.array(x)) is None
