"""LoRA-family layers on small modules: injection, parity with PEFT, closed forms, fuse/unfuse, gradients.

The PyTorch side (diffusers' Attention / ResnetBlock2D with PEFT adapters) is only a reference.
"""
import warnings

import numpy as np
import pytest
import torch

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.lora import (AdapterConfig, LoraError, LoraLayer, ModuleLora, adapted_layers, delete_adapter,
                                  fuse, get_adapter_weights, inject_adapter, list_adapters, load_adapter_weights,
                                  lora_parameters, named_lora_parameters, parse_lora_state_dict, set_adapters,
                                  unfuse, unload)
from jdiffusion_lora.lora.inject import find_target_modules
from jdiffusion_lora.models.layers import Attention, ResnetBlock2D
from helpers import max_abs_diff

TOL = 1e-4


def _copy_weights(torch_module, jt_module):
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    jt_module.load_parameters({k: state[k] for k in jt_module.state_dict()})


def _torch_attention(seed=0):
    from diffusers.models.attention_processor import Attention as TorchAttention
    torch.manual_seed(seed)
    return TorchAttention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, bias=False).eval()


def _randomize_adapters(module, seed):
    """PEFT initialises B to zero; make every adapter tensor random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))


def _peft_state(module, adapter="default"):
    from peft.utils import get_peft_model_state_dict
    return {f"unet.{k}": v.detach().numpy() for k, v in get_peft_model_state_dict(module, adapter_name=adapter).items()}


# --------------------------------------------------------------------------- injection basics

def test_injection_keeps_state_dict_keys_and_replaces_to_out():
    attn = Attention(8, 6, heads=2, dim_head=4)
    keys = sorted(attn.state_dict())
    n_params = len(attn.parameters())
    names = inject_adapter(attn, "a", AdapterConfig(rank=2, seed=0), targets="attn")
    assert names == ["to_k", "to_out.0", "to_q", "to_v"]      # add_k_proj/add_v_proj absent: fine in a preset
    assert sorted(attn.state_dict()) == keys                   # base keys unchanged, adapters not in state_dict
    assert len(attn.parameters()) == n_params
    assert isinstance(attn.to_out[0], LoraLayer) and isinstance(attn.to_q, LoraLayer)
    assert len(lora_parameters(attn, "a")) == 8
    assert {n.rsplit(".", 1)[1] for n, _ in named_lora_parameters(attn)} == {"down", "up"}
    attn.eval()   # must not freeze adapter tensors
    assert not any(p.is_stop_grad() for p in lora_parameters(attn))


def test_target_errors_and_overrides():
    attn = Attention(8, 6, heads=2, dim_head=4)
    with pytest.raises(LoraError, match="add_q_proj"):
        inject_adapter(attn, "a", targets=["to_q", "add_q_proj"])
    with pytest.raises(LoraError, match="to_out.0"):
        inject_adapter(attn, "a", targets=["to_out"])
    with pytest.raises(LoraError, match="rank_pattern"):
        inject_adapter(attn, "a", targets=["to_q"], rank_pattern={"to_v": 3})
    assert list_adapters(attn) == []
    inject_adapter(attn, "a", AdapterConfig(rank=2, alpha=4), targets=["re:to_(q|k)", "to_out.0"],
                   rank_pattern={"to_k": 3}, alpha_pattern={"re:to_out\\.0": 1.0})
    w = get_adapter_weights(attn, "a")
    assert sorted(w) == ["to_k", "to_out.0", "to_q"]
    assert (w["to_q"].rank, w["to_q"].alpha) == (2, 4)
    assert (w["to_k"].rank, w["to_k"].alpha) == (3, 4)
    assert (w["to_out.0"].rank, w["to_out.0"].alpha) == (2, 1.0)
    with pytest.raises(LoraError, match="already exists"):
        inject_adapter(attn, "a", targets=["to_q"])
    res = ResnetBlock2D(8, 16, temb_channels=4, groups=4)
    assert sorted(find_target_modules(res, "full")) == ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]


# --------------------------------------------------------------------------- parity with PEFT

# DoRA variants compile kernels of their own: slow set (CI runs it); the plain variants stay in the default set.
DORA = [False, pytest.param(True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("use_dora", DORA)
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_attention_lora_matches_peft(use_dora):
    from peft import LoraConfig, inject_adapter_in_model
    ref = _torch_attention()
    ours = Attention(8, 6, heads=2, dim_head=4)
    _copy_weights(ref, ours)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_dora=use_dora,
                     rank_pattern={"to_v": 2}, alpha_pattern={"to_k": 1.5})
    inject_adapter_in_model(cfg, ref)
    _randomize_adapters(ref, 1)
    state = parse_lora_state_dict(_peft_state(ref))
    # PEFT stores no alpha in the state dict: give the parsed modules the config's alphas.
    for path, entry in state.component("unet").items():
        entry.alpha = {"to_k": 1.5}.get(path, 6)
    load_adapter_weights(ours, state.component("unet"), "a")
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(ctx)).numpy()
        ref.to_q.scaling["default"] *= 0.5  # PEFT's multiplier is folded into scaling
        for m in (ref.to_k, ref.to_v, ref.to_out[0]):
            m.scaling["default"] *= 0.5
        expected_half = ref(torch.from_numpy(x), torch.from_numpy(ctx)).numpy()
    assert max_abs_diff(ours(jt.array(x), jt.array(ctx)).numpy(), expected) <= TOL
    set_adapters(ours, "a", 0.5)
    assert max_abs_diff(ours(jt.array(x), jt.array(ctx)).numpy(), expected_half) <= TOL


@pytest.mark.parametrize("use_dora", DORA)
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_conv_locon_matches_peft(use_dora):
    from diffusers.models.resnet import ResnetBlock2D as TorchResnet
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    ref = TorchResnet(in_channels=8, out_channels=16, temb_channels=4, groups=4, eps=1e-6).eval()
    ours = ResnetBlock2D(8, 16, temb_channels=4, groups=4, eps=1e-6)
    _copy_weights(ref, ours)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv_shortcut", "time_emb_proj"],
                     use_dora=use_dora)
    inject_adapter_in_model(cfg, ref)
    _randomize_adapters(ref, 2)
    state = parse_lora_state_dict(_peft_state(ref))
    for entry in state.modules.values():
        entry.alpha = 4
    load_adapter_weights(ours, state.component("unet"), "a")
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 6)).astype(np.float32)
    t = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    assert max_abs_diff(ours(jt.array(x), jt.array(t)).numpy(), expected) <= TOL


# --------------------------------------------------------------------------- the seed bug: to_out.0

@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_to_out_adapter_is_on_the_forward_path_and_trains():
    attn = Attention(8, 6, heads=2, dim_head=4)
    x, ctx = jt.randn(2, 5, 8), jt.randn(2, 3, 6)
    base = attn(x, ctx).numpy()
    inject_adapter(attn, "out", AdapterConfig(rank=2, seed=0), targets=["to_out.0"])
    assert max_abs_diff(attn(x, ctx).numpy(), base) == 0.0      # B = 0 at init
    attn.train()
    down, up = lora_parameters(attn, "out")
    g_down, g_up = jt.grad((attn(x, ctx) ** 2).sum(), [down, up])
    assert np.abs(g_up.numpy()).max() > 0                         # the zero B gets a gradient
    up.assign(jt.array(np.random.default_rng(0).standard_normal(up.shape).astype(np.float32)))
    g_down, g_up = jt.grad((attn(x, ctx) ** 2).sum(), [down, up])
    assert np.abs(g_down.numpy()).max() > 0 and np.abs(g_up.numpy()).max() > 0
    attn.eval()
    assert max_abs_diff(attn(x, ctx).numpy(), base) > 1e-3


# --------------------------------------------------------------------------- several adapters, fuse, unload

@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_multiple_adapters_weights_fuse_unfuse_unload():
    attn = Attention(8, 6, heads=2, dim_head=4)
    x, ctx = jt.randn(2, 5, 8), jt.randn(2, 3, 6)
    base = attn(x, ctx).numpy()
    weights_before = {k: v.numpy().copy() for k, v in attn.state_dict().items()}
    inject_adapter(attn, "a", AdapterConfig(rank=2, alpha=1, init_up="gaussian", seed=0), targets="attn")
    inject_adapter(attn, "b", AdapterConfig(rank=3, init_up="gaussian", use_dora=True, seed=1), targets=["to_q", "to_v"])
    both = attn(x, ctx).numpy()
    set_adapters(attn, ["a"])
    only_a = attn(x, ctx).numpy()
    set_adapters(attn, ["a"], [0.0])
    assert max_abs_diff(attn(x, ctx).numpy(), base) <= 1e-6
    set_adapters(attn, ["a", "b"], [1.0, 1.0])
    assert max_abs_diff(attn(x, ctx).numpy(), both) <= 1e-6
    with pytest.raises(LoraError, match="unknown adapter"):
        set_adapters(attn, ["c"])

    fuse(attn, scale=1.0)
    assert max_abs_diff(attn(x, ctx).numpy(), both) <= TOL
    unfuse(attn)
    for k, v in attn.state_dict().items():
        assert np.array_equal(v.numpy(), weights_before[k]), k   # exact, not approximately
    assert max_abs_diff(attn(x, ctx).numpy(), both) <= 1e-6

    delete_adapter(attn, "b")
    assert max_abs_diff(attn(x, ctx).numpy(), only_a) <= 1e-6
    assert isinstance(attn.to_q, LoraLayer)
    fuse(attn)
    unload(attn)            # fused weights stay, adapters go (diffusers' fuse + unload)
    assert type(attn.to_q).__name__ == "Linear" and not adapted_layers(attn)
    assert max_abs_diff(attn(x, ctx).numpy(), only_a) <= TOL


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_fuse_unfuse_exact_in_float16():
    attn = Attention(8, 6, heads=2, dim_head=4)
    for p in attn.parameters():
        p.assign(p.float16())
    before = attn.to_q.weight.numpy().copy()
    inject_adapter(attn, "a", AdapterConfig(rank=2, init_up="gaussian", seed=0), targets=["to_q"])
    fuse(attn, 0.7)
    assert str(attn.to_q.weight.dtype) == "float16" and not np.array_equal(attn.to_q.weight.numpy(), before)
    unfuse(attn)
    assert np.array_equal(attn.to_q.weight.numpy(), before)


# --------------------------------------------------------------------------- LoHa / LoKr closed forms

def _np_kron(a, b):
    if b.ndim == 4:
        return np.kron(a[:, :, None, None], b)
    return np.kron(a, b)


def _np_tucker(t, wa, wb):
    return np.einsum("ijhw,io,jn->onhw", t, wa, wb)


def _layer_delta(layer_module, x, name="a"):
    """(adapted output - base output), computed by the layer."""
    layer = layer_module
    with_adapter = layer(x).numpy()
    set_adapters(layer, [name], [0.0])
    without = layer(x).numpy()
    set_adapters(layer, [name], [1.0])
    return with_adapter - without


def _apply(x, w, conv):
    x = x.astype(np.float64)
    if not conv:
        return x @ w.T
    t = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w.astype(np.float64)), padding=1)
    return t.numpy()


CLOSED_FORMS = {
    "loha": lambda t, s: (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"]) * s,
    "loha-tucker": lambda t, s: _np_tucker(t["t1"], t["w1_a"], t["w1_b"]) * _np_tucker(t["t2"], t["w2_a"], t["w2_b"]) * s,
    "lokr": lambda t, s: _np_kron(t["w1"], t["w2"]) * s,
    "lokr-decomposed": lambda t, s: _np_kron(t["w1_a"] @ t["w1_b"], t["w2_a"] @ t["w2_b"]) * s,
    "lokr-tucker": lambda t, s: _np_kron(t["w1"], _np_tucker(t["t2"], t["w2_a"], t["w2_b"])) * s,
    "locon-tucker": lambda t, s: np.einsum("nmhw,in,mj->ijhw", t["mid"], t["up"][:, :, 0, 0], t["down"][:, :, 0, 0]) * s,
}


def _random_factors(form, conv, rng):
    """Random factor tensors of `form` for a (12, 8[, 3, 3]) weight, rank 2, and the kind."""
    k = (3, 3) if conv else ()
    kk = 9 if conv else 1
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if form == "loha":
        return "loha", {"w1_a": r(12, 2), "w1_b": r(2, 8 * kk), "w2_a": r(12, 2), "w2_b": r(2, 8 * kk)}
    if form == "loha-tucker":
        return "loha", {"t1": r(2, 2, 3, 3), "w1_a": r(2, 12), "w1_b": r(2, 8), "t2": r(2, 2, 3, 3),
                        "w2_a": r(2, 12), "w2_b": r(2, 8)}
    if form == "lokr":
        return "lokr", {"w1": r(3, 2), "w2": r(4, 4, *k)}
    if form == "lokr-decomposed":
        return "lokr", {"w1_a": r(3, 2), "w1_b": r(2, 2), "w2_a": r(4, 2), "w2_b": r(2, 4 * kk)}
    if form == "lokr-tucker":
        return "lokr", {"w1": r(3, 2), "t2": r(2, 2, 3, 3), "w2_a": r(2, 4), "w2_b": r(2, 4)}
    return "lora", {"down": r(2, 8, 1, 1), "mid": r(2, 2, 3, 3), "up": r(12, 2, 1, 1)}


@pytest.mark.slow   # every form compiles kernels of its own (cold-cache time; CI runs the slow set)
@pytest.mark.parametrize("form,conv", [("loha", False), ("lokr", False), ("lokr-decomposed", False),
                                       ("loha", True), ("loha-tucker", True), ("lokr", True), ("lokr-decomposed", True),
                                       ("lokr-tucker", True), ("locon-tucker", True)])
def test_loha_lokr_match_closed_form(form, conv):
    rng = np.random.default_rng(3)
    kind, tensors = _random_factors(form, conv, rng)
    alpha = 3.0
    entry = ModuleLora(kind, tensors, alpha)
    layer = jt.nn.Conv2d(8, 12, 3, padding=1) if conv else jt.nn.Linear(8, 12)
    holder = jt.nn.Sequential(layer)
    load_adapter_weights(holder, {"0": entry}, "a")
    exported = get_adapter_weights(holder, "a")["0"]      # what a save would write: unchanged
    assert exported.kind == kind and exported.alpha == alpha
    assert all(np.array_equal(exported.tensors[k], v) for k, v in tensors.items())
    x = rng.standard_normal((2, 8, 5, 5) if conv else (4, 8)).astype(np.float32)
    ours = _layer_delta(holder, jt.array(x))
    scale = entry.scale
    assert scale == (alpha / 2 if entry.rank else 1.0)
    expected_w = CLOSED_FORMS[form]({k: v.astype(np.float64) for k, v in tensors.items()}, scale)
    expected_w = expected_w.reshape(layer.weight.shape)
    np.testing.assert_allclose(entry.delta(tuple(layer.weight.shape)), expected_w, rtol=1e-5, atol=1e-4)
    assert max_abs_diff(ours, _apply(x, expected_w, conv)) <= 1e-3 * max(1.0, np.abs(expected_w).max())


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_lokr_full_factors_have_scale_one_and_new_adapters_start_at_zero():
    entry = ModuleLora("lokr", {"w1": np.ones((2, 2), np.float32), "w2": np.ones((3, 3), np.float32)}, alpha=8)
    assert entry.rank is None and entry.scale == 1.0
    for kind in ("lora", "loha", "lokr"):
        lin = jt.nn.Sequential(jt.nn.Linear(8, 12), jt.nn.Conv2d(12, 6, 3, padding=1))
        x = jt.randn(2, 8)
        base = lin[0](x).numpy()
        inject_adapter(lin, "a", AdapterConfig(kind=kind, rank=2, seed=0), targets=["0", "1"])
        assert max_abs_diff(lin[0](x).numpy(), base) == 0.0, kind
        params = lora_parameters(lin)
        grads = jt.grad((lin[0](x) ** 2).sum(), params[:len(get_adapter_weights(lin, "a")["0"].tensors)])
        assert any(np.abs(g.numpy()).max() > 0 for g in grads), kind


# --------------------------------------------------------------------------- dropouts

@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_dropouts_only_in_training():
    lin = jt.nn.Sequential(jt.nn.Linear(16, 16))
    x = jt.randn(4, 3, 16)
    inject_adapter(lin, "a", AdapterConfig(rank=8, init_up="gaussian", dropout=0.5, rank_dropout=0.5,
                                           input_dropout=0.2, seed=0), targets=["0"])
    lin.eval()
    a, b = lin(x).numpy(), lin(x).numpy()
    assert max_abs_diff(a, b) == 0.0
    lin.train()
    c, d = lin(x).numpy(), lin(x).numpy()
    assert max_abs_diff(c, d) > 1e-4 and max_abs_diff(c, a) > 1e-4

    mod = jt.nn.Sequential(jt.nn.Linear(16, 16))
    inject_adapter(mod, "a", AdapterConfig(rank=4, init_up="gaussian", module_dropout=0.5, seed=0), targets=["0"])
    mod.eval()
    with_adapter = mod(x).numpy()
    set_adapters(mod, "a", 0.0)
    without = mod(x).numpy()
    set_adapters(mod, "a", 1.0)
    mod.train()
    outs = [mod(x).numpy() for _ in range(30)]
    skipped = sum(max_abs_diff(o, without) < 1e-6 for o in outs)
    kept = sum(max_abs_diff(o, with_adapter) < 1e-6 for o in outs)
    assert skipped + kept == 30 and 3 <= skipped <= 27


def test_load_adapter_weights_reports_every_bad_module():
    attn = Attention(8, 6, heads=2, dim_head=4)
    good = ModuleLora("lora", {"down": np.ones((2, 8), np.float32), "up": np.ones((8, 2), np.float32)})
    bad_shape = ModuleLora("lora", {"down": np.ones((2, 7), np.float32), "up": np.ones((8, 2), np.float32)})
    modules = {"to_q": good, "to_k": bad_shape, "to_zz": good, "to_out": good}
    with pytest.raises(LoraError) as e:
        load_adapter_weights(attn, modules, "a")
    msg = str(e.value)
    assert "to_k: down (2, 7)" in msg and "to_zz: no such module" in msg and "to_out: is a Sequential" in msg
    assert not adapted_layers(attn)              # nothing half-loaded
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert load_adapter_weights(attn, modules, "a", strict=False) == ["to_q"]
    assert any("to_k" in str(x.message) and "to_zz" in str(x.message) for x in w)
