"""The shipped pretrained tiny model: it draws what it is asked for, its files are the recorded ones,
and the pretraining script rebuilds identical bytes from a seed."""
import hashlib
import os

import numpy as np
import pytest

import jdiffusion_lora
from tools import tiny_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(os.path.dirname(os.path.abspath(jdiffusion_lora.__file__)), "assets", "tiny-sd")

# The pixel check: centre region shows the shape colour and corners show the background colour,
# in at least PASS_AT of the seeds, with PIXEL_STEPS DDIM steps and guidance PIXEL_GUIDANCE.
PIXEL_PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]
PIXEL_SEEDS = list(range(100, 108))
PASS_AT = 6
PIXEL_STEPS = 10
PIXEL_GUIDANCE = 4.0


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_dataset_is_deterministic_and_passes_its_own_check():
    a_images, a_caps, a_meta = tiny_data.make_dataset(64, seed=3)
    b_images, b_caps, _ = tiny_data.make_dataset(64, seed=3)
    assert np.array_equal(a_images, b_images) and a_caps == b_caps
    assert a_images.shape == (64, 64, 64, 3) and a_images.dtype == np.uint8
    for image, caption, meta in zip(a_images, a_caps, a_meta):
        assert caption == tiny_data.caption(meta["colour"], meta["shape"], meta["background"])
        assert tiny_data.matches(image, meta["colour"], meta["background"])
    assert not np.array_equal(a_images, tiny_data.make_dataset(64, seed=4)[0])


def test_colour_dataset_is_deterministic_and_leaves_the_named_palette():
    a = tiny_data.make_colour_dataset(32, seed=1)
    assert a.shape == (32, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, tiny_data.make_colour_dataset(32, seed=1))
    palette = np.asarray(list(tiny_data.COLOURS.values()), dtype=np.float64)            # (6, 3)
    corners = a[:, :4, :4].reshape(32, -1, 3).mean(1)                                   # (32, 3) background
    distance = np.sqrt(((corners[:, None] - palette[None]) ** 2).sum(-1)).min(1)       # to the nearest named colour
    assert (distance > 40).mean() > 0.5


def test_shipped_files_match_sha256sums():
    with open(os.path.join(MODEL, "SHA256SUMS")) as f:
        lines = [line.split() for line in f if line.strip()]
    assert {rel for _, rel in lines} == {"unet/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors",
                                         "text_encoder/model.safetensors"}
    for digest, rel in lines:
        assert _sha256(os.path.join(MODEL, rel)) == digest, rel
    for name in ("model_index.json", "train_log.txt", "samples.png", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert os.path.isfile(os.path.join(MODEL, name)), name


def test_it_is_the_default_base_model():
    from jdiffusion_lora.tiny import tiny_model_path
    from jdiffusion_lora.train.config import TrainConfig
    from jdiffusion_lora.pipelines import load_pipeline

    assert os.path.samefile(tiny_model_path(), MODEL)
    assert TrainConfig().base_model == ""   # "" = the built-in model
    pipe = load_pipeline("")
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.unet.config.sample_size == 16


@pytest.fixture(scope="module")
def pipe():
    from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.progress_bar_disabled = True
    return pipe


@pytest.mark.parametrize("prompt", PIXEL_PROMPTS)
def test_model_draws_the_prompted_colours(pipe, prompt):
    words = prompt.split()
    colour, background = words[1], words[5]
    images = pipe([prompt] * len(PIXEL_SEEDS), num_inference_steps=PIXEL_STEPS, guidance_scale=PIXEL_GUIDANCE,
                  seed=PIXEL_SEEDS, output_type="np").images                     # (8, 64, 64, 3) in [0, 1]
    found = [tiny_data.region_colours(np.round(im * 255)) for im in images]
    passed = sum(f == (colour, background) for f in found)
    assert passed >= PASS_AT, f"{prompt!r}: {passed}/{len(PIXEL_SEEDS)} passed; saw {found}"


@pytest.mark.slow
def test_pretraining_rebuilds_identical_bytes(tmp_path):
    from tools import pretrain_tiny
    tiny_run = dict(seed=5, data=8, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=4, decoder_steps=2,
                    decoder_batch=2, grid=False, checkpoint_every=0, quiet=True)

    def digests(out):
        files = pretrain_tiny.weight_files(out)
        assert len(files) == 3
        found = {rel: _sha256(os.path.join(out, rel)) for rel in files}
        with open(os.path.join(out, "SHA256SUMS")) as f:
            assert f.read().split() == [x for rel in files for x in (found[rel], rel)]
        return found

    runs = []
    for name in ("a", "b"):
        pretrain_tiny.pretrain(str(tmp_path / name), **tiny_run)
        runs.append(digests(str(tmp_path / name)))
    assert runs[0] == runs[1]
    # phase 3 run later on a saved folder (how the shipped model was finished) gives the same bytes
    split = str(tmp_path / "split")
    pretrain_tiny.pretrain(split, **dict(tiny_run, decoder_steps=0))
    assert digests(split)["vae/diffusion_pytorch_model.safetensors"] != runs[0]["vae/diffusion_pytorch_model.safetensors"]
    pretrain_tiny.finetune_decoder(split, seed=5, data=8, steps=2, batch=2, grid=False, quiet=True)
    assert digests(split) == runs[0]
