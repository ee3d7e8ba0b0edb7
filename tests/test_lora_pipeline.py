"""A LoRA made by peft + diffusers changes our whole text-to-image pipeline exactly as it changes diffusers'."""
import pytest
import torch

from helpers import max_abs_diff
from sd_fixtures import build_diffusers_pipeline, image_latents
from test_lora_diffusers import build_diffusers_lora_file, transformers_peft_allowed

from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("base"))
    ref = build_diffusers_pipeline(folder, sd2=True, prediction_type="v_prediction")
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    lora_dir = str(tmp_path_factory.mktemp("lora"))
    # adapters go on copies' modules in place; the reference pipe is rebuilt from the folder afterwards
    from diffusers import StableDiffusionPipeline as TorchPipeline
    donor = TorchPipeline.from_pretrained(folder, safety_checker=None)
    path = build_diffusers_lora_file(donor.unet, donor.text_encoder, lora_dir, rank=4, alpha=6, seed=3)
    with transformers_peft_allowed():
        ref.load_lora_weights(path, adapter_name="style")
    ours.load_lora_weights(path, adapter_name="style")
    return ref, ours


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_pipeline_with_lora_matches_diffusers(pipes, scale):
    ref, ours = pipes
    with transformers_peft_allowed():
        ref.set_adapters(["style"], [scale])
    ours.set_adapters(["style"], [scale])
    latents = image_latents(2, seed=4)
    kwargs = dict(negative_prompt=["ugly", ""], num_inference_steps=3, guidance_scale=6.0, output_type="np")
    expected = ref(["a red circle", "stripes"], latents=torch.from_numpy(latents), **kwargs).images
    got = ours(["a red circle", "stripes"], latents=latents, **kwargs).images
    assert max_abs_diff(got, expected) <= 1e-4


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_lora_really_changes_the_image(pipes):
    _, ours = pipes
    latents = image_latents(1, seed=4)
    ours.set_adapters(["style"], [1.0])
    with_lora = ours("a red circle", latents=latents, num_inference_steps=2, output_type="np").images
    ours.set_adapters(["style"], [0.0])
    without = ours("a red circle", latents=latents, num_inference_steps=2, output_type="np").images
    ours.set_adapters(["style"], [1.0])
    assert max_abs_diff(with_lora, without) > 1e-3
