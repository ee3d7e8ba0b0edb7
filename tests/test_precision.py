"""Mixed precision: one LoRA training step in bf16 / fp16 against diffusers + PEFT under torch.autocast,
the loss scaler's skip-and-shrink, and the scaler's state across a resume.

The reference step is what diffusers' train_text_to_image_lora.py does with --mixed_precision: the
UNet cast to the half dtype, the LoRA parameters cast back to float32 (`cast_training_params`), the
forward under `torch.autocast`, the loss on `.float()` predictions, fp16 with a loss scale. Both sides
get the same float32 inputs and cast them to the half dtype at the UNet's entry.
"""
import json
import os

import numpy as np
import pytest
import torch

from jdiffusion_lora._runtime import DEVICE, jt
from jdiffusion_lora.lora import AdapterConfig, inject_adapter, named_lora_parameters
from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel
from jdiffusion_lora.train import precision
from jdiffusion_lora.train.batches import SampleBuilder
from jdiffusion_lora.train.objective import per_sample_loss
from jdiffusion_lora.train.precision import GradScaler
from jdiffusion_lora.train.trainer import Trainer

from helpers import randomize
from sd_fixtures import tiny_unet_config
from train_fixtures import config, tiny_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Tolerances on the step, relative to the reference's norm (loss: relative error). Our half-precision
# step rounds at the same places as autocast's (products in half, norms and softmax in float32), but
# Jittor 1.3.11's CPU half matmuls and convolutions accumulate in half precision, where torch's
# accumulate in float32. Measured (64 x K x 48 product, relative error against float32):
#   K        32      144     1024
#   fp16   0.09%   0.18%   0.48%    (torch 0.04%)
#   bf16   5.5%    21%     72%      (torch 0.3%)
# So fp16 matches autocast to a few percent and bf16 does not match at all on CPU (xfail below).
TOL = {"no": 2e-5, "bf16": 3e-2, "fp16": 5e-2}
CPU_BF16 = pytest.mark.xfail(DEVICE == "cpu", strict=True, reason="Jittor 1.3.11's CPU bf16 matmul/conv accumulate in bf16 "
                             "(72% error at K=1024): the bf16 step is far from autocast's on CPU")


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    from diffusers import UNet2DConditionModel as TorchUNet
    folder = str(tmp_path_factory.mktemp("unet_amp"))
    randomize(TorchUNet(**tiny_unet_config(sd2=True)), seed=4).save_pretrained(folder)
    return folder


def step_inputs():
    rng = np.random.default_rng(11)
    return dict(x=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                t=np.array([50.0, 800.0], dtype=np.float32),
                ctx=rng.standard_normal((2, 7, 32)).astype(np.float32),
                target=rng.standard_normal((2, 4, 8, 8)).astype(np.float32))


def our_step(folder, mode):
    """Loss and the (unscaled) gradient of every LoRA tensor, by module name and side."""
    unet = UNet2DConditionModel.from_pretrained(folder)
    for p in unet.parameters():
        p.stop_grad()
    inject_adapter(unet, config=AdapterConfig(rank=4, alpha=4, init_up="gaussian", seed=5), targets=TARGETS)
    precision.cast_frozen([unet], mode)
    unet.train()
    named = named_lora_parameters(unet)
    assert unet.dtype == precision.DTYPE[mode] and all(v.dtype == "float32" for _, v in named)
    d = step_inputs()
    pred = unet(precision.to_model_dtype(jt.array(d["x"]), unet), d["t"],
                precision.to_model_dtype(jt.array(d["ctx"]), unet)).sample
    assert pred.dtype == precision.DTYPE[mode]
    loss = per_sample_loss(pred, jt.array(d["target"])).mean()
    scaler = GradScaler.for_mode(mode)
    grads = scaler.unscale(jt.grad(scaler.scale_loss(loss), [v for _, v in named]))
    values = {n: v.numpy() for n, v in named}
    return float(loss.item()), {n: g.numpy() for (n, _), g in zip(named, grads)}, values


def torch_step(folder, mode, values):
    """The same step with diffusers + PEFT, LoRA tensors copied from ours."""
    from diffusers import UNet2DConditionModel as TorchUNet
    from peft import LoraConfig
    unet = TorchUNet.from_pretrained(folder)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    unet.to(dtype)
    params = {}
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                module, side = name.split(".lora_")
                p.data = torch.from_numpy(values[f"{module}.default.{'down' if side[0] == 'A' else 'up'}"]).float()
                p.requires_grad_(True)
                params[f"{module}.default.{'down' if side[0] == 'A' else 'up'}"] = p
    unet.train()
    d = step_inputs()
    with torch.autocast("cpu", dtype=dtype, enabled=mode != "no"):
        pred = unet(torch.from_numpy(d["x"]).to(dtype), torch.from_numpy(d["t"]),
                    torch.from_numpy(d["ctx"]).to(dtype)).sample
    loss = torch.nn.functional.mse_loss(pred.float(), torch.from_numpy(d["target"]))
    scale = 2.0 ** 16 if mode == "fp16" else 1.0
    (loss * scale).backward()
    return float(loss), {n: (p.grad / scale).numpy() for n, p in params.items()}


def relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# A UNet training step compiles kernels no default test needs (fp16 a half-precision copy of every training kernel,
# about 480 on a cold cache): slow set, which CI runs.
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["no", "fp16", pytest.param("bf16", marks=CPU_BF16)])
def test_half_precision_step_matches_torch_autocast(unet_folder, mode):
    loss, grads, values = our_step(unet_folder, mode)
    ref_loss, ref_grads = torch_step(unet_folder, mode, values)
    assert grads.keys() == ref_grads.keys() and len(grads) == 64  # 4 blocks x 2 attentions x 4 projections x 2
    assert abs(loss - ref_loss) <= TOL[mode] * abs(ref_loss)
    for n in grads:
        assert relative(grads[n], ref_grads[n]) <= TOL[mode], n


# ------------------------------------------------------------------------------ the loss scaler

def test_forced_inf_makes_the_scaler_skip_and_shrink():
    scaler = GradScaler(growth_interval=3)
    w = jt.array(np.ones((4,), np.float32))
    for poison, expect_step, expect_scale in [(False, True, 2.0 ** 16), (True, False, 2.0 ** 15),
                                              (False, True, 2.0 ** 15), (False, True, 2.0 ** 15),
                                              (False, True, 2.0 ** 16)]:
        x = jt.array(np.array([1.0, np.inf if poison else 2.0, 3.0, 4.0], np.float32))
        loss = (w * x * 1e-3).sum()
        grads = scaler.unscale(jt.grad(scaler.scale_loss(loss), [w]))
        g = grads[0].numpy()
        finite = bool(np.isfinite(g).all())
        if finite:   # unscaled: the gradient of the loss itself
            np.testing.assert_allclose(g, [1e-3, 2e-3, 3e-3, 4e-3], rtol=1e-6)
        assert scaler.update(finite) is expect_step and scaler.scale == expect_scale
    assert scaler.skipped_steps == 1 and scaler.consecutive_skips == 0


def test_scaler_state_round_trips_and_bf16_counts_without_scaling():
    a = GradScaler(scale=1024.0, good_steps=7, skipped_steps=2)
    b = GradScaler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b == a
    bf16 = GradScaler.for_mode("bf16")
    assert bf16.factor == 1.0 and not bf16.update(False) and bf16.skipped_steps == 1 and bf16.scale == 2.0 ** 16
    bf16.load_state_dict(a.state_dict())       # a checkpoint from an fp16 run: bf16 stays unscaled
    assert not bf16.enabled and bf16.factor == 1.0


@pytest.mark.slow
def test_fp16_training_skips_an_inf_step_and_resumes_with_its_scale(tmp_path, monkeypatch):
    """A sample with an inf latent at step 2 (index 1): that step is skipped (weights untouched), the
    scale halves; stopped after step 2 and resumed, the run ends where an uninterrupted one does."""
    common = dict(max_train_steps=4, mixed_precision="fp16", text_encoder_targets=["q_proj"])
    original = SampleBuilder.instance

    def poisoned(self, index, step):
        s = original(self, index, step)
        if step == 1:
            s.latent = s.latent * np.float32(np.inf)
        return s

    monkeypatch.setattr(SampleBuilder, "instance", poisoned)
    log, snaps = [], {}
    straight = Trainer(config(tmp_path / "a", **common), pipeline=tiny_pipeline(), printer=lambda s: None)

    def callback(step, m):
        log.append((step, m["skipped_steps"], m["loss_scale"]))
        if step in (1, 2):
            snaps[step] = ([p.numpy().copy() for p in straight.params], straight.optimizer.state_arrays())

    straight.run(callback=callback)
    assert log == [(1, 0, 2.0 ** 16), (2, 1, 2.0 ** 15), (3, 1, 2.0 ** 15), (4, 1, 2.0 ** 15)]
    (w1, o1), (w2, o2) = snaps[1], snaps[2]
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))                 # step 2 changed nothing
    assert o1.keys() == o2.keys() and all(np.array_equal(o1[k], o2[k]) for k in o1)
    assert straight.optimizer.step_count == 3
    assert straight.unet.dtype == "float16" and all(p.dtype == "float32" for p in straight.params)

    first = Trainer(config(tmp_path / "b", **common), pipeline=tiny_pipeline(), printer=lambda s: None)
    first.run(until=2)
    state = json.load(open(os.path.join(first.c.output_dir, "checkpoints", "checkpoint-000002", "training_state",
                                        "state.json")))
    assert state["grad_scaler"]["scale"] == 2.0 ** 15 and state["grad_scaler"]["skipped_steps"] == 1
    second = Trainer(config(tmp_path / "b", resume="latest", **common), pipeline=tiny_pipeline(),
                     printer=lambda s: None)
    second.run()
    assert second.scaler == straight.scaler
    for a, b in zip(straight.params, second.params):
        assert np.array_equal(a.numpy(), b.numpy())
