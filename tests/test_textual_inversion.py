"""Textual Inversion loading against diffusers' `load_textual_inversion`, and embeddings bundled in a LoRA file."""
import numpy as np
import pytest
import torch

from helpers import max_abs_diff
from sd_fixtures import CROSS_DIM, build_diffusers_pipeline, image_latents

from jdiffusion_lora.lora.formats import load_lora_state
from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
from jdiffusion_lora.pipelines.textual_inversion import (TextualInversionError, read_embedding_file,
                                                         save_textual_inversion)
from jdiffusion_lora.weights import read_safetensors

PROMPTS = ["a <Sty-A> dog on grass", "<sty-b> painting, a cat and <sty-b>"]
NEGATIVE = ["blurry <sty-c>", ""]


def vectors(n, seed, width=CROSS_DIM):
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32) * 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One embedding file of each format: diffusers (1 vector), A1111 .pt (3 vectors), A1111 safetensors (2)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("emb")
    save_file({"<Sty-A>": torch.from_numpy(vectors(1, 1)[0])}, str(d / "learned_embeds.safetensors"))
    param = torch.nn.Parameter(torch.from_numpy(vectors(3, 2)))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": param},
                "name": "<sty-b>", "step": 500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "sd21"},
               str(d / "styleb.pt"))
    save_file({"emb_params": torch.from_numpy(vectors(2, 3))}, str(d / "sty-c.safetensors"))
    return d


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, files):
    folder = str(tmp_path_factory.mktemp("sd-ti"))
    ref = build_diffusers_pipeline(folder)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(files))                                  # folder: learned_embeds.safetensors
    ref.load_textual_inversion(str(files / "styleb.pt"))                    # token from the file's `name`
    ref.load_textual_inversion(str(files / "sty-c.safetensors"), token="<sty-c>")
    added = (ours.load_textual_inversion(str(files)) + ours.load_textual_inversion(str(files / "styleb.pt"))
             + ours.load_textual_inversion(str(files / "sty-c.safetensors"), token="<sty-c>"))
    assert added == ["<Sty-A>", "<sty-b>", "<sty-b>_1", "<sty-b>_2", "<sty-c>", "<sty-c>_1"]
    return folder, ref, ours


def test_tokens_and_text_encoder_output_match_diffusers(pipes):
    _, ref, ours = pipes
    assert len(ours.tokenizer) == len(ref.tokenizer) == 514 + 6
    for prompt in PROMPTS + NEGATIVE:
        expanded = ref.maybe_convert_prompt(prompt, ref.tokenizer)
        assert ours.maybe_convert_prompt(prompt) == expanded
        ids_ref = ref.tokenizer(expanded, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.tokenizer([expanded])["input_ids"][0].tolist() == ids_ref
    with torch.no_grad():
        expected, _ = ref.encode_prompt(PROMPTS, "cpu", 1, False)
    got = ours.encode_prompt(PROMPTS).numpy()
    assert max_abs_diff(got, expected.numpy()) <= 1e-5
    # and the new tokens really reach the encoder (not the unknown token)
    plain = ours.encode_prompt(["a dog on grass"]).numpy()
    assert max_abs_diff(got[:1], plain) > 1e-2


def test_images_match_diffusers(pipes):
    _, ref, ours = pipes
    latents = image_latents(2, seed=8)
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.0, output_type="np")
    expected = ref(PROMPTS, latents=torch.from_numpy(latents), **kwargs).images
    got = ours(PROMPTS, latents=latents, **kwargs).images
    assert max_abs_diff(got, expected) <= 1e-4


def test_reading_each_format(files):
    token, vec = read_embedding_file(str(files / "styleb.pt"))
    assert token == "<sty-b>" and vec.shape == (3, CROSS_DIM) and np.allclose(vec, vectors(3, 2))
    token, vec = read_embedding_file(str(files / "sty-c.safetensors"))
    assert token == "sty-c" and vec.shape == (2, CROSS_DIM)             # A1111: the token is the file's stem
    token, vec = read_embedding_file(str(files))
    assert token == "<Sty-A>" and vec.shape == (1, CROSS_DIM)


def test_saved_embeddings_load_in_diffusers(pipes, tmp_path):
    folder, _, ours = pipes
    from diffusers import StableDiffusionPipeline as TorchPipeline

    embeddings = ours.textual_inversion_embeddings()
    assert sorted(embeddings) == ["<Sty-A>", "<sty-b>", "<sty-c>"] and embeddings["<sty-b>"].shape == (3, CROSS_DIM)
    path = save_textual_inversion({"<sty-b>": embeddings["<sty-b>"]}, str(tmp_path / "b"))
    a1111 = save_textual_inversion({"<sty-c>": embeddings["<sty-c>"]}, str(tmp_path / "c.safetensors"), "a1111")
    ref = TorchPipeline.from_pretrained(folder, safety_checker=None)
    ref.load_textual_inversion(path)
    ref.load_textual_inversion(a1111, token="<sty-c>")
    with torch.no_grad():
        expected, _ = ref.encode_prompt(PROMPTS[1:] + NEGATIVE[:1], "cpu", 1, False)
    assert max_abs_diff(ours.encode_prompt(PROMPTS[1:] + NEGATIVE[:1]).numpy(), expected.numpy()) <= 1e-5


def test_bad_input_is_refused_and_changes_nothing(pipes, files, tmp_path):
    _, _, ours = pipes
    n_tokens, n_rows = len(ours.tokenizer), ours.text_encoder.get_input_embeddings().weight.shape[0]
    with pytest.raises(TextualInversionError, match="already in the tokenizer's vocabulary"):
        ours.load_textual_inversion(str(files / "styleb.pt"))
    with pytest.raises(TextualInversionError, match="already in the tokenizer's vocabulary"):
        ours.load_textual_inversion({ours.tokenizer.decoder[300]: vectors(1, 0)[0]})
    with pytest.raises(TextualInversionError, match="width 48 does not match .* width 32"):
        ours.load_textual_inversion({"<wide>": vectors(1, 0, width=48)[0]})
    with pytest.raises(TextualInversionError, match="names no token"):
        ours.load_textual_inversion(vectors(1, 0))
    with pytest.raises(TextualInversionError, match="not an embedding file"):
        ours.load_textual_inversion({"a": vectors(1, 0), "b": vectors(1, 1)})
    # a pickle that would run code is refused, not run
    import pickle
    import zipfile
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"name": "x", "string_to_param": {"*": OSError("boom")}}))
    with pytest.raises(ValueError, match="refusing|cannot read"):
        ours.load_textual_inversion(str(evil))
    with pytest.raises(FileNotFoundError):
        ours.load_textual_inversion(str(tmp_path / "missing.pt"))
    assert len(ours.tokenizer) == n_tokens
    assert ours.text_encoder.get_input_embeddings().weight.shape[0] == n_rows


def test_lora_file_carries_its_embeddings(pipes, tmp_path):
    """kohya/A1111 `bundle_emb` keys: written with the LoRA, read back with it (both LoRA formats)."""
    folder, _, ours = pipes
    rng = np.random.default_rng(0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    weight = dict(ours.unet.named_modules())[path].weight
    lora = {f"unet.{path}.lora_A.weight": rng.standard_normal((4, weight.shape[1])).astype(np.float32) * 0.3,
            f"unet.{path}.lora_B.weight": rng.standard_normal((weight.shape[0], 4)).astype(np.float32) * 0.3}
    ours.load_lora_weights(lora, adapter_name="bundle")
    try:
        latents = image_latents(1, seed=2)
        expected = ours(PROMPTS[1], latents=latents, num_inference_steps=2, output_type="np").images
        for fmt in ("kohya", "diffusers"):
            saved = ours.save_lora_weights(str(tmp_path / f"{fmt}.safetensors"), format=fmt, adapter_name="bundle",
                                           embeddings={"<sty-b>": ours.textual_inversion_embeddings()["<sty-b>"]})
            tensors = read_safetensors(saved)[0]
            assert tensors["bundle_emb.<sty-b>.string_to_param.*"].shape == (3, CROSS_DIM)
            assert load_lora_state(saved).embeddings["<sty-b>"].shape == (3, CROSS_DIM)
            fresh = StableDiffusionPipeline.from_pretrained(folder)
            fresh.set_progress_bar_config(disable=True)
            fresh.load_lora_weights(saved, adapter_name="bundle")
            got = fresh(PROMPTS[1], latents=latents, num_inference_steps=2, output_type="np").images
            assert max_abs_diff(got, expected) <= 1e-5
        # loading it again next to the same embedding is fine; a different vector under that token is not
        fresh.load_lora_weights(saved, adapter_name="again")
        clash = ours.lora_state("bundle")
        clash.embeddings = {"<sty-b>": vectors(3, 9)}
        with pytest.raises(TextualInversionError, match="already in the tokenizer's vocabulary"):
            fresh.load_lora_weights(clash, adapter_name="third")
        assert "third" not in fresh.get_list_adapters().get("unet", [])
    finally:
        ours.delete_adapters("bundle")
