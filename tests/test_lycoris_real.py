"""LoHa / LoKr files written by the real `lycoris-lora` package (kohya network module) on a tiny random
diffusers pipeline, UNet and text encoder, give our pipeline the images diffusers gives with the LyCORIS
network applied. Under transformers 5, lycoris writes text-encoder keys without `text_model_`
(`lora_te_encoder_layers_0_mlp_fc1.hada_w1_a`); older tools wrote them with it: both must load.

Test-only dependency: `pip install --no-deps lycoris-lora einops toml`.
"""
import pytest
import torch

from helpers import max_abs_diff
from sd_fixtures import build_diffusers_pipeline, image_latents

from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
from jdiffusion_lora.weights import read_safetensors, save_safetensors

pytest.importorskip("lycoris")


def lycoris_file(ref, algo: str, path: str, seed: int, monkeypatch):
    """Apply a LyCORIS network to `ref` (in place), give it random non-zero weights, save it in kohya format."""
    import lycoris.kohya
    from lycoris.kohya import create_network
    # lycoris 4.1.3's "full" preset lists diffusers' TimestepEmbedding among its target classes (for Anima)
    # and also targets `time_embedding.linear_1/2` by name: "duplicated lora name" on every diffusers
    # UNet. Keep the name route.
    full = dict(lycoris.kohya.PRESET["full"])
    full["unet_target_module"] = [m for m in full["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(lycoris.kohya.PRESET, "full", full)
    network = create_network(1.0, 4, 2.0, ref.vae, ref.text_encoder, ref.unet, algo=algo, factor=4,
                             conv_dim=4, conv_alpha=2.0)
    network.apply_to(ref.text_encoder, ref.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    network.save_weights(path, torch.float32, {})
    return path


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_file_matches_diffusers(tmp_path, algo, monkeypatch):
    folder = str(tmp_path / "base")
    ref = build_diffusers_pipeline(folder)
    path = lycoris_file(ref, algo, str(tmp_path / f"{algo}.safetensors"), seed=1, monkeypatch=monkeypatch)
    tensors, _, metadata = read_safetensors(path)
    te_keys = [k for k in tensors if k.startswith("lora_te_")]
    suffix = "hada_w1_a" if algo == "loha" else "lokr_w1"
    assert te_keys and any(k.endswith(suffix) for k in te_keys)
    assert any(k.startswith("lora_unet_") for k in tensors)

    latents = image_latents(1, seed=4)
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    expected = ref("a red circle", latents=torch.from_numpy(latents), **kwargs).images

    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    plain = ours("a red circle", latents=latents, **kwargs).images
    ours.load_lora_weights(path, adapter_name=algo)
    n_text = sum(1 for k in ours.lora_state(algo).modules if k.startswith("text_encoder."))
    assert n_text == len({k.split(".")[0] for k in te_keys})  # every text module of the file is used
    got = ours("a red circle", latents=latents, **kwargs).images
    assert max_abs_diff(got, expected) <= 1e-4
    assert max_abs_diff(plain, expected) > 1e-3  # the network really changes the image

    # the same file with the other text-encoder spelling (`lora_te_text_model_encoder_...` / the other one),
    # and with SDXL's first-encoder prefix `lora_te1_`: the same image
    def respell(k, te_prefix):
        if k.startswith("lora_te_text_model_"):
            return te_prefix + k[len("lora_te_text_model_"):]
        if k.startswith("lora_te_"):
            return te_prefix + "text_model_" + k[len("lora_te_"):]
        return k
    for i, te_prefix in enumerate(("lora_te_", "lora_te1_")):
        other = str(tmp_path / f"other{i}.safetensors")
        save_safetensors({respell(k, te_prefix): v for k, v in tensors.items()}, other, metadata=metadata)
        again = StableDiffusionPipeline.from_pretrained(folder)
        again.set_progress_bar_config(disable=True)
        again.load_lora_weights(other, adapter_name="x")
        assert max_abs_diff(again("a red circle", latents=latents, **kwargs).images, got) == 0
