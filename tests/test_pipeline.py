"""Full text-to-image runs against diffusers' StableDiffusionPipeline on a tiny random model."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import default_set, max_abs_diff
from sd_fixtures import build_diffusers_pipeline, image_latents

from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
from jdiffusion_lora.schedulers import SCHEDULERS

PROMPTS = ["a red circle on a blue background", "Two GREEN squares, 3 stripes!"]
NEGATIVE = ["blurry", "low quality, jpeg"]

# (scheduler class, extra config, our call kwargs)
CASES = [
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 0.7}),
    ("DDPMScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True}, {}),
]


@pytest.fixture(scope="module", params=["sd1-eps", "sd2-v"])
def pipes(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    sd2 = request.param == "sd2-v"
    ref = build_diffusers_pipeline(folder, sd2=sd2, prediction_type="v_prediction" if sd2 else "epsilon")
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def _patch_diffusers_noise(monkeypatch, seeds, shape):
    """Make diffusers' stochastic samplers use the noise our pipeline draws: per image, from its own seed,
    after the (discarded) starting latent."""
    import diffusers.schedulers.scheduling_ddim as ddim
    import diffusers.schedulers.scheduling_ddpm as ddpm
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a

    gens = [np.random.default_rng(s) for s in seeds]
    for g in gens:
        g.standard_normal(shape, dtype=np.float32)

    def randn_tensor(out_shape, **kwargs):
        assert tuple(out_shape) == (len(gens), *shape)
        return torch.from_numpy(np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens]))

    for module in (ddim, ddpm, euler_a):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)


# Each scheduler compiles kernels of its own (cold-cache time): DDIM runs in the default set, the others in the slow
# set, which CI runs too.
@pytest.mark.parametrize("name,extra,kwargs", default_set({"DDIMScheduler"},
                                                          [f"{c[0]}{'-eta' if c[2] else ''}" for c in CASES], CASES))
def test_pipeline_matches_diffusers(pipes, monkeypatch, name, extra, kwargs):
    import diffusers

    ref, ours = pipes
    if name not in SCHEDULERS:
        pytest.fail(f"{name} is not implemented")
    ref.scheduler = getattr(diffusers, name).from_config({**ref.scheduler.config, **extra})
    ours.scheduler = SCHEDULERS[name].from_config({**dict(ref.scheduler.config)})
    latents = image_latents(len(PROMPTS))
    seeds = [11, 12]
    _patch_diffusers_noise(monkeypatch, seeds, latents.shape[1:])

    expected = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5,
                   latents=torch.from_numpy(latents), output_type="np", **kwargs).images
    got = ours(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, latents=latents,
               seed=seeds, output_type="np", **kwargs).images
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert max_abs_diff(got, expected) <= 1e-4


@pytest.mark.slow   # kernels of its own (cold-cache time; CI runs the slow set)
def test_latent_output_matches_diffusers_without_guidance(pipes):
    import diffusers

    ref, ours = pipes
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    latents = image_latents(1, seed=5)
    expected = ref(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, latents=torch.from_numpy(latents),
                   output_type="latent").images
    ours.scheduler = SCHEDULERS["DDIMScheduler"].from_config(dict(ref.scheduler.config))
    got = ours(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, latents=latents, output_type="latent").images
    assert max_abs_diff(got.numpy(), expected.numpy()) <= 1e-4


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", pytest.param("EulerAncestralDiscreteScheduler",
                                                                    marks=pytest.mark.slow)])   # kernels of its own
def test_image_depends_only_on_its_seed(pipes, scheduler):
    """The seed system drew one noise tensor per batch; here an image is the same alone or in a batch of 4.

    "The same" up to float32 rounding: Jittor's fused kernels and oneDNN sum in a different order for other
    batch sizes, and oneDNN's order also depends on the CPU (1e-6 on one machine, 2.3e-5 on an AMD EPYC); the
    bound, 1e-4, is a fortieth of one 8-bit level, while another draw differs by more than 1e-2."""
    _, ours = pipes
    ours.scheduler = SCHEDULERS[scheduler].from_config(ours.scheduler.config)
    prompts = ["a red circle", "a blue square", "stripes", "a dog"]
    batch = ours(prompts, num_inference_steps=3, seed=[7, 8, 9, 10], output_type="np").images
    for i in (0, 2):
        alone = ours(prompts[i], num_inference_steps=3, seed=7 + i, output_type="np").images[0]
        np.testing.assert_allclose(alone, batch[i], rtol=0, atol=1e-4)
    # an int seed means seed + i for image i
    again = ours(prompts[2:], num_inference_steps=3, seed=9, output_type="np").images
    np.testing.assert_allclose(again, batch[2:], rtol=0, atol=1e-4)
    # and the seed really matters
    other = ours(prompts[0], num_inference_steps=3, seed=99, output_type="np").images[0]
    assert max_abs_diff(other, batch[0]) > 1e-2


def test_num_images_per_prompt_and_pil_output(pipes):
    _, ours = pipes
    out = ours(["a", "b"], num_images_per_prompt=2, num_inference_steps=2, seed=3)
    assert len(out.images) == 4 and out.seeds == [3, 4, 5, 6]
    assert out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    with pytest.raises(ValueError, match="multiples of 2"):
        ours("a", height=15, width=16, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents have shape"):
        ours("a", latents=np.zeros((1, 4, 3, 3), np.float32), num_inference_steps=1)


def test_scheduler_swap_the_diffusers_way(pipes):
    _, ours = pipes
    ddim = SCHEDULERS["DDIMScheduler"]
    euler = SCHEDULERS["EulerDiscreteScheduler"]
    ours.scheduler = euler.from_config(ours.scheduler.config)
    ours.scheduler = ddim.from_config(ours.scheduler.config)
    assert type(ours.scheduler) is ddim
    assert ours.scheduler.config.prediction_type in ("epsilon", "v_prediction")


def test_loading_errors_name_what_is_wrong(tmp_path, pipes):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))
    folder = tmp_path / "sd"
    build_diffusers_pipeline(str(folder))
    import shutil
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        StableDiffusionPipeline.from_pretrained(str(folder))


def test_save_pretrained_roundtrip_loads_in_diffusers(tmp_path, pipes):
    from diffusers import StableDiffusionPipeline as TorchPipeline

    ref, ours = pipes
    ours.scheduler = SCHEDULERS["DDIMScheduler"].from_config(dict(ref.scheduler.config))
    ours.save_pretrained(str(tmp_path / "saved"))
    reloaded = TorchPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None)
    reloaded.set_progress_bar_config(disable=True)
    latents = image_latents(1, seed=9)
    a = reloaded(PROMPTS[0], num_inference_steps=2, latents=torch.from_numpy(latents), output_type="np").images
    b = ours(PROMPTS[0], num_inference_steps=2, latents=latents, output_type="np").images
    assert max_abs_diff(a, b) <= 1e-4


def test_cli_txt2img_on_builtin_model(tmp_path):
    # as on a fresh machine with nvcc but no CUDA runtime: none of Jittor's variables set beforehand
    env = {k: v for k, v in os.environ.items() if k not in ("nvcc_path", "FIX_TORCH_ERROR", "log_silent")}
    env["JDIFFUSION_CACHE"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "jdiffusion_lora.cli", "txt2img", "--steps", "2", "--num-images", "2",
                          "--seed", "5", "--out", str(tmp_path / "imgs")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "imgs")) == ["seed5.png", "seed6.png"]
    assert "wrote 2 image(s) of 64x64" in out.stdout
