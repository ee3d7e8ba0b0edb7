"""Gradient checkpointing: the recomputed backward gives the plain backward's gradients.

A small random UNet (SD 2.x layout: linear projections, two levels) with LoRA on every attention
projection and on the ResNet convolutions, frozen base weights, float32. Tolerance: all gradients
together (inputs, context, every LoRA tensor, as one vector) agree to 1e-6 relative, and each tensor
to 5e-6 relative. What remains is float32 rounding: about 6e-7 per tensor here (up to 1.7e-6 for a
tensor whose gradient is a sum of cancelling terms), the same with Jittor's lazy execution off, so not
a fusion artefact but the order in which the recomputed graph adds its terms.
"""
import numpy as np
import pytest

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.lora import AdapterConfig, inject_adapter, lora_parameters
from jdiffusion_lora.models import checkpointing
from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

TOL = 1e-6          # all gradients as one vector
TOL_TENSOR = 5e-6   # each tensor
CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
              attention_head_dim=(2, 4), use_linear_projection=True, sample_size=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def lora_unet(**adapter):
    jt.set_global_seed(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig(**CONFIG))
    for p in unet.parameters():
        p.stop_grad()
    inject_adapter(unet, config=AdapterConfig(rank=2, init_up="gaussian", seed=1, **adapter),
                   targets=["attn", "conv1", "conv2"])
    unet.train()
    return unet


def gradients(unet, checkpointed: bool):
    rng = np.random.default_rng(3)
    x = jt.array(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    ctx = jt.array(rng.standard_normal((2, 5, 16)).astype(np.float32))
    w = jt.array(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    if checkpointed:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    out = unet(x, np.array([10.0, 700.0], dtype=np.float32), ctx).sample
    params = lora_parameters(unet)
    grads = jt.grad((out * w).sum(), [x, ctx] + params)
    return [g.numpy() for g in grads]


def assert_same(plain, ckpt, tol=TOL, tol_tensor=TOL_TENSOR):
    assert len(plain) == len(ckpt) > 2
    for a, b in zip(plain, ckpt):
        scale = float(np.linalg.norm(a))
        assert scale > 0                                # every tensor really receives a gradient
        assert np.linalg.norm(a - b) <= tol_tensor * scale
    diff = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(plain, ckpt)))
    assert diff <= tol * np.sqrt(sum(float(np.sum(a ** 2)) for a in plain))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_checkpointed_backward_gives_the_plain_gradients(monkeypatch):
    unet = lora_unet()
    plain = gradients(unet, checkpointed=False)
    recomputed = []
    original = checkpointing._Checkpoint.grad

    def counting(self, dout):
        recomputed.append(self.fn)
        return original(self, dout)

    monkeypatch.setattr(checkpointing._Checkpoint, "grad", counting)
    ckpt = gradients(unet, checkpointed=True)
    # resnets: down 1 + 1, mid 2, up 2 + 2; transformer blocks: down 1, mid 1, up 2
    n_blocks = sum(isinstance(m, checkpointing.Checkpointable) for m in unet.modules())
    assert unet.is_gradient_checkpointing and len(recomputed) == n_blocks == 12
    assert_same(plain, ckpt)


@pytest.mark.slow
def test_rebuild_never_syncs_and_the_memory_efficient_attention_matches(monkeypatch):
    """Nothing may sync while a checkpointed block is rebuilt inside jt.grad: a sync would run the half-built
    backward graph (at SD 2.1 / 512 px the memory-efficient attention's per-block sync did, and a convolution's
    generic 7-D gradient then crashed the step). The attention orders its blocks by a zero dependency there."""
    from jdiffusion_lora.models import attention

    monkeypatch.setattr(attention, "blocked_available", lambda: False)  # the CPU's blocked kernels off, and
    monkeypatch.setattr(attention, "SAVED_SCORES_LIMIT", 0)            # every attention: the memory-efficient path
    monkeypatch.setattr(attention, "MEMORY_EFFICIENT_BLOCK_BYTES", 16 * 4 * 8)   # 64 tokens: several query blocks
    unet = lora_unet()
    plain = gradients(unet, checkpointed=False)
    synced, attended = [], []            # checkpointing.rebuilding() at each jt.sync / memory-efficient forward
    original_sync, original_execute = jt.sync, attention.MemoryEfficientAttention.execute

    def sync(*args, **kw):
        synced.append(checkpointing.rebuilding())
        return original_sync(*args, **kw)

    def execute(self, *args):
        attended.append(checkpointing.rebuilding())
        return original_execute(self, *args)

    monkeypatch.setattr(jt, "sync", sync)
    monkeypatch.setattr(attention.MemoryEfficientAttention, "execute", execute)
    ckpt = gradients(unet, checkpointed=True)
    assert attended and all(attended)    # the rebuilt blocks' attention took the memory-efficient path
    assert True not in synced
    # Looser than TOL: the checkpointed forward runs without gradients, so its attention takes the plain path
    # (another summation order than the memory-efficient one) and the blocks downstream see other roundings.
    assert_same(plain, ckpt, tol=5e-6, tol_tensor=2e-5)


@pytest.mark.slow
def test_recompute_replays_the_dropout_masks(monkeypatch):
    """Dropout masks come from a deterministic source that changes with every draw: the checkpointed
    gradients equal the plain ones only if the recomputation reuses the forward's masks."""
    # Both runs take the plain ops: the lean-backward functions (models/lean_backward) and the CPU kernels that
    # serve the no-gradient first pass (models/layer_kernels) round differently from them (1.8e-6 of this
    # model's gradient norm), which would hide what this test measures: the masks.
    from jdiffusion_lora.models import layer_kernels, layers, unet_2d_condition
    for module in (layers, unet_2d_condition):
        monkeypatch.setattr(module, "lean_backward_applies", lambda *a, **k: False)
    monkeypatch.setattr(layer_kernels, "ENABLED", False)
    unet = lora_unet(input_dropout=0.3, rank_dropout=0.2)
    draws = []

    def numbered_random(shape, dtype="float32", type="uniform"):
        draws.append(tuple(shape))
        rng = np.random.default_rng(len(draws))
        return jt.array(rng.random(tuple(shape))).cast(dtype)

    monkeypatch.setattr(jt, "random", numbered_random)
    plain = gradients(unet, checkpointed=False)
    n_plain = len(draws)
    draws.clear()
    ckpt = gradients(unet, checkpointed=True)
    assert n_plain > 0 and len(draws) == n_plain   # the recomputation drew nothing new
    assert_same(plain, ckpt)


def test_no_checkpointing_without_gradients():
    unet = lora_unet().enable_gradient_checkpointing()
    x = jt.array(np.zeros((1, 4, 8, 8), np.float32))
    with jt.no_grad():
        out = unet(x, 5.0, jt.zeros((1, 5, 16))).sample
    assert tuple(out.shape) == (1, 4, 8, 8)
    assert checkpointing.set_gradient_checkpointing(unet, False) == 12 and not unet.is_gradient_checkpointing


@pytest.mark.slow
def test_backward_near_jittors_live_op_limit_stops_with_a_clear_error(monkeypatch):
    """Past 100,000 live ops Jittor syncs every new tensor, which during a checkpointed backward runs the
    half-built backward graph (a segfault at SD 2.1 / 512 px / batch 2). Near the limit the backward stops with
    LiveOpLimitError saying what to change instead; below it, nothing changes. The limit is lowered here so a
    small model reaches it."""
    unet = lora_unet()
    assert len(gradients(unet, checkpointed=True)) > 2                      # far below the real limit: runs
    monkeypatch.setattr(checkpointing, "JITTOR_LIVE_OP_LIMIT", jt.number_of_lived_ops() + 50)
    with pytest.raises(checkpointing.LiveOpLimitError, match="smaller batch"):
        gradients(unet, checkpointed=True)
