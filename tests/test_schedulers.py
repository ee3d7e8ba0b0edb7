"""Scheduler parity with diffusers 0.42: tables, timesteps and whole sampling loops, step for step.

Both sides get the same config dict, the same starting latent, the same explicit noise for stochastic
steps, and a "model" that is a fixed function of (scaled input, t). Every step's prev_sample must match.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch

import diffusers
import diffusers.schedulers.scheduling_ddpm as d_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as d_euler_a
import diffusers.schedulers.scheduling_euler_discrete as d_euler

from jdiffusion_lora import jt
from jdiffusion_lora import schedulers as S
from jdiffusion_lora.schedulers import ConfigError
from helpers import default_set

# diffusers deprecates algorithm_type "dpmsolver"/"sde-dpmsolver"; we still check them
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SHAPE = (2, 4, 8, 8)

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}


def sd(**kw):
    return {**SD15, **kw}


def sd2(**kw):
    return {**SD21, **kw}


# ----------------------------------------------------------------------------- the loop


def fake_model(x: np.ndarray, t, R: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the UNet: depends on the input and the timestep."""
    return (0.1 * x + np.sin(0.01 * float(t) + 0.3) * R).astype(np.float32)


def assert_timesteps_equal(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Integer timesteps exactly; fractional (Euler's Karras) ones to float32 rounding of the sigma table."""
    assert ours.dtype == theirs.dtype
    if ours.dtype == np.int64:
        np.testing.assert_array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)


def run_both(ours, theirs, steps, monkeypatch=None, module=None, noise_via=None, step_kwargs=None,
             noise_scale=1.0):
    """Sample `steps` steps with both schedulers and compare every step.

    Stochastic steps: our side gets `noise=`; diffusers gets the same array either as a step kwarg
    (`noise_via="variance_noise"`) or from a monkeypatched `randn_tensor` in `module`.
    """
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    ts_theirs = theirs.timesteps.numpy()
    assert_timesteps_equal(ours.timesteps, ts_theirs)
    np.testing.assert_allclose(ours.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)

    rng = np.random.default_rng(1)
    R = rng.standard_normal(SHAPE).astype(np.float32)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [noise_scale * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(len(ts_theirs))]

    current = {}
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(current["noise"]).clone())

    # float32 cancellation: once values of magnitude M went through a step, both sides carry ~M * 6e-8
    # rounding error (Euler starts at sigma_max * x, 4096 * x with zero terminal SNR), so the absolute
    # tolerance follows the largest magnitude seen so far
    magnitude = 1.0
    x_ours = jt.array(x0) * ours.init_noise_sigma
    x_theirs = torch.from_numpy(x0) * theirs.init_noise_sigma
    np.testing.assert_allclose(x_ours.numpy(), x_theirs.numpy(), rtol=1e-6, atol=1e-6)
    for i, (t_ours, t_theirs) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        current["noise"] = noises[i]
        in_ours = ours.scale_model_input(x_ours, t_ours).numpy()
        in_theirs = theirs.scale_model_input(x_theirs, t_theirs).numpy()
        magnitude = max(magnitude, float(np.abs(x_theirs.numpy()).max()))
        atol = max(1e-4, 1e-6 * magnitude)
        np.testing.assert_allclose(in_ours, in_theirs, rtol=1e-5, atol=atol, err_msg=f"scaled input, step {i}")
        kw_theirs = dict(step_kwargs)
        if noise_via:
            kw_theirs[noise_via] = torch.from_numpy(noises[i])
        out_ours = ours.step(jt.array(fake_model(in_ours, t_ours, R)), t_ours, x_ours,
                             noise=jt.array(noises[i]), **step_kwargs)
        out_theirs = theirs.step(torch.from_numpy(fake_model(in_theirs, t_theirs, R)), t_theirs, x_theirs,
                                 **kw_theirs)
        x_ours, x_theirs = out_ours.prev_sample, out_theirs.prev_sample
        np.testing.assert_allclose(x_ours.numpy(), x_theirs.numpy(), rtol=1e-5, atol=atol,
                                   err_msg=f"prev_sample, step {i} (t={t_ours})")
        assert x_ours.dtype == "float32"
        their_x0 = getattr(out_theirs, "pred_original_sample", None)
        if their_x0 is not None:
            np.testing.assert_allclose(out_ours.pred_original_sample.numpy(), their_x0.numpy(), rtol=1e-5,
                                       atol=atol, err_msg=f"pred_original_sample, step {i}")
    assert np.isfinite(x_ours.numpy()).all()
    return x_ours


def pair(name, config):
    return S.SCHEDULERS[name].from_config(config), getattr(diffusers, name).from_config(config)


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("config", [
    {}, sd(), {"beta_schedule": "squaredcos_cap_v2"}, sd(rescale_betas_zero_snr=True),
    {"num_train_timesteps": 37, "beta_start": 0.001, "beta_end": 0.03},
    {"trained_betas": list(np.linspace(0.0001, 0.02, 1000))},
], ids=["linear", "scaled_linear", "squaredcos", "zero_snr", "short", "trained"])
def test_beta_tables_bit_identical(config):
    ours, theirs = pair("DDIMScheduler", config)
    if config.get("rescale_betas_zero_snr"):  # torch's float32 sqrt is off by an ulp here and there
        np.testing.assert_allclose(ours.betas, theirs.betas.numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
        return
    np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert ours.betas.dtype == np.float32 and ours.alphas_cumprod.dtype == np.float32


@pytest.mark.parametrize("config", [sd(), {"beta_schedule": "squaredcos_cap_v2"}, sd(rescale_betas_zero_snr=True)])
def test_sigma_tables(config):
    ours, theirs = pair("EulerDiscreteScheduler", config)
    rtol = 2e-5 if config.get("rescale_betas_zero_snr") else 1e-6
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=rtol)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=rtol)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 25, 50])
def test_timesteps(name, spacing, steps):
    ours, theirs = pair(name, sd(timestep_spacing=spacing))
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    if name in ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"):
        assert ours.timesteps.dtype == np.int64
    np.testing.assert_allclose(ours.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)


# ----------------------------------------------------------------------------- sampling loops
# Each scheduler and configuration compiles step kernels of its own (seconds each on a cold Jittor cache): the
# default set runs DDIM on SD-1.5's configuration (the pipeline tests run it end to end); the other loops run in the
# slow set, which CI runs too.


@pytest.mark.parametrize("config", default_set({"sd15"}, [
    "sd15", "sd21", "defaults_clip", "sample_clip", "trailing", "linspace", "squaredcos_v", "zero_snr"], [
    sd(), sd2(), {}, sd(prediction_type="sample", clip_sample=True), sd2(timestep_spacing="trailing"),
    sd2(timestep_spacing="linspace"), {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    sd2(timestep_spacing="trailing", rescale_betas_zero_snr=True),
]))
def test_ddim_loop(config):
    run_both(*pair("DDIMScheduler", config), 10)


@pytest.mark.slow
@pytest.mark.parametrize("config", [sd(), sd2(set_alpha_to_one=True)], ids=["sd15", "sd21"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(config, eta):
    run_both(*pair("DDIMScheduler", config), 10, noise_via="variance_noise", step_kwargs={"eta": eta})


@pytest.mark.slow
def test_ddim_clipped_model_output():
    run_both(*pair("DDIMScheduler", {"clip_sample_range": 0.5}), 10,
             step_kwargs={"use_clipped_model_output": True})


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    {}, sd(), sd2(), sd(variance_type="fixed_large"), sd(variance_type="fixed_small_log"),
    sd2(timestep_spacing="trailing"), {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
], ids=["defaults", "sd15", "sd21", "fixed_large", "fixed_small_log", "trailing", "squaredcos_sample"])
def test_ddpm_loop(config, monkeypatch):
    run_both(*pair("DDPMScheduler", config), 10, monkeypatch, d_ddpm)


@pytest.mark.slow
@pytest.mark.parametrize("config,steps", [
    (sd(), 10), (sd2(), 10), (sd(solver_order=1), 10), (sd(solver_order=3), 10), (sd(solver_order=3), 20),
    (sd2(solver_order=2), 20), (sd(solver_type="heun"), 10),
    (sd(lower_order_final=False, final_sigmas_type="sigma_min"), 10),
    (sd(euler_at_final=True, final_sigmas_type="sigma_min"), 20),
    (sd(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), 10),
    (sd2(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), 20),
    (sd(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), 10),
    (sd(use_karras_sigmas=True), 10), (sd2(use_karras_sigmas=True, timestep_spacing="trailing"), 10),
    (sd(timestep_spacing="leading"), 10), (sd2(timestep_spacing="trailing", rescale_betas_zero_snr=True), 10),
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 10),
    ({"lambda_min_clipped": -5.1}, 10), (sd(algorithm_type="deis", final_sigmas_type="sigma_min"), 10),
], ids=["sd15", "sd21", "order1", "order3", "order3_20", "sd21_20", "heun", "no_lower_final", "euler_final",
        "dpmsolver", "dpmsolver_o3", "dpmsolver_heun", "karras", "karras_trailing", "leading", "zero_snr",
        "squaredcos_sample", "lambda_clip", "deis"])
def test_dpmsolver_loop(config, steps):
    run_both(*pair("DPMSolverMultistepScheduler", config), steps)


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    sd(algorithm_type="sde-dpmsolver++"), sd2(algorithm_type="sde-dpmsolver++", solver_type="heun"),
    sd(algorithm_type="sde-dpmsolver++", solver_order=3),
    sd(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
], ids=["sde++", "sde++_heun", "sde++_o3", "sde"])
def test_dpmsolver_sde_loop(config):
    ours, theirs = pair("DPMSolverMultistepScheduler", config)
    assert ours.stochastic
    run_both(ours, theirs, 10, noise_via="variance_noise")


@pytest.mark.slow
def test_dpmsolver_state_resets():
    """Two runs after set_timesteps give the same result (multistep history is cleared)."""
    ours, theirs = pair("DPMSolverMultistepScheduler", sd())
    a = run_both(ours, theirs, 8).numpy()
    b = run_both(ours, theirs, 8).numpy()
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("config,steps", [
    (sd(), 10), (sd2(), 10), (sd(timestep_spacing="leading"), 10), (sd2(timestep_spacing="trailing"), 10),
    (sd(), 25), (sd(use_karras_sigmas=True), 10), (sd2(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 10),
    (sd(final_sigmas_type="sigma_min"), 10), ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 10),
    (sd2(timestep_spacing="trailing", rescale_betas_zero_snr=True), 10),
], ids=["sd15", "sd21", "leading", "trailing", "fractional_t", "karras", "karras_range", "sigma_min",
        "squaredcos_sample", "zero_snr"])
def test_euler_loop(config, steps):
    run_both(*pair("EulerDiscreteScheduler", config), steps)


@pytest.mark.slow
def test_euler_churn(monkeypatch):
    run_both(*pair("EulerDiscreteScheduler", sd()), 10, monkeypatch, d_euler,
             step_kwargs={"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003})


@pytest.mark.slow
@pytest.mark.parametrize("config,steps", [
    (sd(), 10), (sd2(), 10), (sd(timestep_spacing="leading"), 10), (sd2(timestep_spacing="trailing"), 10),
    (sd(), 25), ({"beta_schedule": "squaredcos_cap_v2"}, 10),
    (sd2(timestep_spacing="trailing", rescale_betas_zero_snr=True), 10),
], ids=["sd15", "sd21", "leading", "trailing", "fractional_t", "squaredcos", "zero_snr"])
def test_euler_ancestral_loop(config, steps, monkeypatch):
    run_both(*pair("EulerAncestralDiscreteScheduler", config), steps, monkeypatch, d_euler_a)


@pytest.mark.slow
@pytest.mark.parametrize("config,steps", [
    (sd(), 10), (sd(), 3), (sd2(), 10), (sd(timestep_spacing="linspace"), 10), (sd(timestep_spacing="trailing"), 10),
    (sd(skip_prk_steps=False), 10), (sd2(skip_prk_steps=False, set_alpha_to_one=True), 10), ({}, 10),
], ids=["sd15", "sd15_3", "sd21", "linspace", "trailing", "prk", "prk_v", "defaults_prk"])
def test_pndm_loop(config, steps):
    run_both(*pair("PNDMScheduler", config), steps)


# ----------------------------------------------------------------------------- training side


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("config", [sd(), {}, sd2(rescale_betas_zero_snr=True)], ids=["sd", "linear", "zero_snr"])
def test_add_noise_and_velocity(name, config, rng):
    ours, theirs = pair(name, config)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([0, 999], dtype=np.int64) if "rescale_betas_zero_snr" not in config else np.array([17, 500])
    expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    for t_in in (t, jt.array(t.astype(np.int32))):
        got = ours.add_noise(jt.array(x), jt.array(noise), t_in)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    if hasattr(theirs, "get_velocity"):
        expected_v = theirs.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
        got_v = ours.get_velocity(jt.array(x), jt.array(noise), jt.array(t.astype(np.int32)))
        np.testing.assert_allclose(got_v.numpy(), expected_v, rtol=1e-6, atol=1e-6)


def test_add_noise_random_timesteps(rng):
    ours, theirs = pair("DDPMScheduler", sd2())
    x = rng.standard_normal((6, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((6, 4, 4, 4)).astype(np.float32)
    t = rng.integers(0, 1000, 6)
    np.testing.assert_allclose(
        ours.add_noise(jt.array(x), jt.array(noise), t).numpy(),
        theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)).numpy(),
        rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        ours.get_velocity(jt.array(x), jt.array(noise), t).numpy(),
        theirs.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)).numpy(),
        rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_add_noise_sigma_schedulers(name, rng):
    ours, theirs = pair(name, sd())
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t = ours.timesteps[[2, 7]]
    expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), theirs.timesteps[[2, 7]]).numpy()
    np.testing.assert_allclose(ours.add_noise(jt.array(x), jt.array(noise), t).numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    ours.set_begin_index(3)
    theirs.set_begin_index(3)
    expected = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), theirs.timesteps[[3, 3]]).numpy()
    np.testing.assert_allclose(ours.add_noise(jt.array(x), jt.array(noise), ours.timesteps[[3, 3]]).numpy(),
                               expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_img2img_begin_index():
    """Starting part-way (set_begin_index) matches diffusers' img2img usage."""
    ours, theirs = pair("DPMSolverMultistepScheduler", sd())
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    ours.set_begin_index(4)
    theirs.set_begin_index(4)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    a, b = jt.array(x), torch.from_numpy(x)
    for t_o, t_t in zip(ours.timesteps[4:], theirs.timesteps[4:]):
        a = ours.step(0.1 * a, t_o, a).prev_sample
        b = theirs.step(0.1 * b, t_t, b).prev_sample
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- configs and files


def test_from_config_round_trip():
    euler = S.EulerDiscreteScheduler.from_config(sd2())
    ddim = S.DDIMScheduler.from_config(euler.config)
    d_ddim = diffusers.DDIMScheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(sd2()).config)
    for field in dataclasses.fields(ddim.config):
        assert getattr(ddim.config, field.name) == d_ddim.config[field.name], field.name
    assert ddim.config.timestep_spacing == "leading"  # Euler's default "linspace" was not given: not carried
    run_both(ddim, d_ddim, 10)
    # and back
    again = S.EulerDiscreteScheduler.from_config(ddim.config)
    assert dataclasses.asdict(again.config) == dataclasses.asdict(euler.config)
    assert isinstance(ddim.config, S.SchedulerConfig)


def test_switching_class_keeps_given_values_only():
    """As in diffusers: values given to one class travel through another that does not use them,
    while values that were only defaults do not."""
    ddim = S.DDIMScheduler.from_config(SD21)
    euler = S.EulerDiscreteScheduler.from_config(ddim.config)
    back = S.DDIMScheduler.from_config(euler.config)
    d_back = diffusers.DDIMScheduler.from_config(
        diffusers.EulerDiscreteScheduler.from_config(diffusers.DDIMScheduler.from_config(SD21).config).config)
    assert euler.config.timestep_spacing == "linspace"  # DDIM's default "leading" did not leak
    assert back.config.clip_sample is False and d_back.config.clip_sample is False
    assert dataclasses.asdict(back.config) == {f.name: d_back.config[f.name] for f in dataclasses.fields(back.config)}
    pndm = S.PNDMScheduler.from_config(SD15)
    for name in S.SCHEDULERS:
        ours = S.SCHEDULERS[name].from_config(pndm.config)
        theirs = getattr(diffusers, name).from_config(diffusers.PNDMScheduler.from_config(SD15).config)
        assert dataclasses.asdict(ours.config) == {f.name: theirs.config[f.name]
                                                   for f in dataclasses.fields(ours.config)}, name


@pytest.mark.slow
def test_from_config_accepts_diffusers_config():
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(sd2(solver_order=3))
    ours = S.DPMSolverMultistepScheduler.from_config(theirs.config)
    assert ours.config.solver_order == 3 and ours.config.prediction_type == "v_prediction"
    run_both(ours, theirs, 10)


def test_from_config_overrides_and_kwargs():
    s = S.DDIMScheduler.from_config(SD21, timestep_spacing="trailing")
    assert s.config.timestep_spacing == "trailing" and s.config.prediction_type == "v_prediction"
    s = S.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    assert s.config.beta_schedule == "scaled_linear" and not s.config.clip_sample
    with pytest.raises(TypeError, match="no config option"):
        S.DDIMScheduler.from_config(SD21, timestep_spacin="trailing")
    with pytest.raises(TypeError, match="no config option"):
        S.DDIMScheduler(solver_order=2)
    with pytest.raises(ConfigError, match="thresholding"):
        S.DDIMScheduler(thresholding=True)
    # kwargs on top of a config that carries keys of other classes
    s = S.DDIMScheduler(S.DDIMScheduler.from_config(SD15).config, prediction_type="v_prediction")
    assert s.config.prediction_type == "v_prediction" and s.config.steps_offset == 1


def test_pndm_config_loads_into_ddim_silently():
    s = S.DDIMScheduler.from_config(SD15)  # skip_prk_steps etc. belong to PNDM: ignored
    assert not hasattr(s.config, "skip_prk_steps")
    assert s.config.steps_offset == 1 and s.config.set_alpha_to_one is False and s.config.clip_sample is False
    # keys of other classes with unusual values are ignored as well
    S.EulerDiscreteScheduler.from_config({**SD15, "thresholding": True, "solver_order": 3, "clip_sample": True})


@pytest.mark.parametrize("name,bad", [
    ("DDIMScheduler", {"thresholding": True}),
    ("DDPMScheduler", {"thresholding": True}),
    ("DPMSolverMultistepScheduler", {"thresholding": True}),
    ("DDPMScheduler", {"variance_type": "learned_range"}),
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}),
    ("DDIMScheduler", {"timestep_spacing": "karras"}),
    ("DDIMScheduler", {"prediction_type": "flow_prediction"}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),  # final_sigmas_type "zero"
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "sample"}),
])
def test_unsupported_values_raise(name, bad):
    with pytest.raises(ConfigError, match=list(bad)[0]):
        S.SCHEDULERS[name].from_config({**SD15, **bad})


def test_from_pretrained_diffusers_folder(tmp_path):
    theirs = diffusers.DDIMScheduler.from_config(SD21)
    theirs.save_pretrained(str(tmp_path / "scheduler"))
    ours = S.DDIMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
    assert ours.config.prediction_type == "v_prediction" and ours.config.steps_offset == 1
    run_both(ours, diffusers.DDIMScheduler.from_pretrained(str(tmp_path), subfolder="scheduler"), 10)
    # a PNDM folder (SD-1.5 layout) loads into any class; load_scheduler follows _class_name
    diffusers.PNDMScheduler.from_config(SD15).save_pretrained(str(tmp_path / "pndm"))
    s = S.load_scheduler(str(tmp_path / "pndm"))
    assert type(s) is S.PNDMScheduler and s.config.skip_prk_steps
    s = S.load_scheduler(str(tmp_path), subfolder="pndm", class_name="EulerDiscreteScheduler")
    assert type(s) is S.EulerDiscreteScheduler and s.config.steps_offset == 1
    assert S.DPMSolverMultistepScheduler.from_pretrained(str(tmp_path / "pndm")).config.steps_offset == 1
    with pytest.raises(FileNotFoundError):
        S.DDIMScheduler.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_save_pretrained_round_trip(name, tmp_path):
    config = sd2()
    if name == "DDIMScheduler":
        config["trained_betas"] = [float(b) for b in np.linspace(0.0001, 0.02, 1000)]
    ours = S.SCHEDULERS[name].from_config(config)
    ours.save_pretrained(str(tmp_path))
    with open(tmp_path / "scheduler_config.json") as f:
        saved = json.load(f)
    assert saved["_class_name"] == name
    again = S.SCHEDULERS[name].from_pretrained(str(tmp_path))
    assert dataclasses.asdict(again.config) == dataclasses.asdict(ours.config)
    theirs = getattr(diffusers, name).from_pretrained(str(tmp_path))  # diffusers reads our file
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for field in dataclasses.fields(ours.config):
        assert plain(theirs.config[field.name]) == plain(getattr(ours.config, field.name)), field.name
    assert saved["clip_sample"] is False  # a key of other classes, kept and saved as diffusers does
    np.testing.assert_array_equal(again.alphas_cumprod, theirs.alphas_cumprod.numpy())


def test_registry_and_api():
    assert set(S.SCHEDULERS) == {"DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "PNDMScheduler"}
    for name, cls in S.SCHEDULERS.items():
        s = cls()
        assert s.order == 1 and len(s) == 1000
        assert dataclasses.asdict(s.config)["num_train_timesteps"] == 1000
        # defaults are diffusers' defaults
        d = getattr(diffusers, name)()
        for field in dataclasses.fields(s.config):
            assert getattr(s.config, field.name) == d.config[field.name], (name, field.name)


def test_noise_none_draws_randn():
    s = S.EulerAncestralDiscreteScheduler.from_config(sd())
    s.set_timesteps(4)
    x = jt.ones(SHAPE) * s.init_noise_sigma
    t = s.timesteps[0]
    out = s.step(jt.zeros(SHAPE), t, x).prev_sample.numpy()
    assert np.isfinite(out).all() and out.std() > 0.1
