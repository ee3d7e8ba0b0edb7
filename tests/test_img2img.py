"""Image-to-image (SDEdit) against diffusers' StableDiffusionImg2ImgPipeline on a tiny random model."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import max_abs_diff
from sd_fixtures import build_diffusers_pipeline

from jdiffusion_lora.pipelines.img2img import StableDiffusionImg2ImgPipeline
from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
from jdiffusion_lora.schedulers import SCHEDULERS

PROMPTS = ["a red circle on a blue background", "two green squares"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd-img2img"))
    ref = build_diffusers_pipeline(folder)
    txt2img = StableDiffusionPipeline.from_pretrained(folder)
    txt2img.set_progress_bar_config(disable=True)
    return ref, txt2img


def start_images(n=2, size=16):
    rng = np.random.default_rng(4)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _feed_our_draws(monkeypatch, seeds, shape):
    """Make diffusers use the draws our pipeline makes per image from its seed: the start noise first,
    then the VAE posterior sample."""
    import diffusers.models.autoencoders.vae as vae
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img

    gens = [np.random.default_rng(s) for s in seeds]
    start = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])
    posterior = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])
    monkeypatch.setattr(vae, "randn_tensor", lambda s, **kw: torch.from_numpy(posterior.reshape(s)))
    monkeypatch.setattr(img2img, "randn_tensor", lambda s, **kw: torch.from_numpy(start.reshape(s)))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_img2img_matches_diffusers(pipes, monkeypatch, scheduler, strength):
    import diffusers

    ref_t2i, txt2img = pipes
    ref = diffusers.StableDiffusionImg2ImgPipeline(**ref_t2i.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref_t2i.scheduler.config)
    ours = StableDiffusionImg2ImgPipeline.from_pipe(txt2img)
    ours.scheduler = SCHEDULERS[scheduler].from_config(dict(ref.scheduler.config))
    seeds = [21, 22]
    _feed_our_draws(monkeypatch, seeds, (4, 8, 8))
    images = start_images()

    expected = ref(PROMPTS, image=images, strength=strength, num_inference_steps=10, guidance_scale=7.5,
                   negative_prompt=["blurry", ""], output_type="np").images
    got = ours(PROMPTS, image=images, strength=strength, num_inference_steps=10, guidance_scale=7.5,
               negative_prompt=["blurry", ""], seed=seeds, output_type="np").images
    assert got.shape == expected.shape == (2, 16, 16, 3)
    assert max_abs_diff(got, expected) <= 1e-4
    # the start image matters, and more so at low strength
    other = ours(PROMPTS, image=start_images()[::-1], strength=strength, num_inference_steps=10, seed=seeds,
                 negative_prompt=["blurry", ""], output_type="np").images
    assert max_abs_diff(got, other) > 1e-3


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_img2img_shares_models_and_loop_with_txt2img(pipes):
    _, txt2img = pipes
    ours = StableDiffusionImg2ImgPipeline.from_pipe(txt2img)
    assert ours.unet is txt2img.unet and ours.vae is txt2img.vae and ours.text_encoder is txt2img.text_encoder
    assert StableDiffusionImg2ImgPipeline.denoise is StableDiffusionPipeline.denoise


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_img2img_low_strength_stays_near_the_start(pipes):
    """SDEdit: few steps from a lightly noised start keep the image; strength 1 repaints it."""
    _, txt2img = pipes
    ours = StableDiffusionImg2ImgPipeline.from_pipe(txt2img)
    ours.scheduler = SCHEDULERS["DDIMScheduler"].from_config(ours.scheduler.config)
    start = start_images(1)[0]
    roundtrip = ours.decode_latents(ours.encode_image(np.asarray(start, np.float32)[None].transpose(0, 3, 1, 2)
                                                      / 127.5 - 1, [np.random.default_rng(0)]))[0]
    low = ours("x", image=start, strength=0.1, num_inference_steps=20, guidance_scale=1.0, seed=1,
               output_type="np").images[0]
    high = ours("x", image=start, strength=1.0, num_inference_steps=20, guidance_scale=1.0, seed=1,
                output_type="np").images[0]
    assert np.abs(low - roundtrip).mean() < np.abs(high - roundtrip).mean()


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_img2img_bad_input(pipes):
    _, txt2img = pipes
    ours = StableDiffusionImg2ImgPipeline.from_pipe(txt2img)
    start = start_images(1)[0]
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            ours("x", image=start, strength=bad, num_inference_steps=4)
    with pytest.raises(ValueError, match="needs a start image"):
        ours("x", num_inference_steps=4)
    with pytest.raises(ValueError, match="runs no step"):
        ours("x", image=start, strength=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match="2 start images for 3 output images"):
        ours(["a", "b", "c"], image=start_images(2), num_inference_steps=2)
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        ours("x", image="start.png", num_inference_steps=2)
    # another size: resized with a warning, same result as resizing it ourselves
    big = start.resize((40, 24))
    with pytest.warns(UserWarning, match="40x24; resized to 16x16"):
        a = ours("x", image=big, strength=0.5, num_inference_steps=4, seed=3, output_type="np").images
    b = ours("x", image=big.resize((16, 16), Image.LANCZOS), strength=0.5, num_inference_steps=4, seed=3,
             output_type="np").images
    assert max_abs_diff(a, b) <= 1e-6
