"""AutoencoderKL parity against diffusers 0.42.1 on tiny random-weight VAEs (float32, <= 1e-4)."""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from jdiffusion_lora.models.modeling import ConfigError
from jdiffusion_lora.weights import WeightsError, save_safetensors

from helpers import max_abs_diff, to_numpy

TOL = 1e-4

CONFIGS = {
    # 32x32 images, 8 groups, everything on
    "g8": dict(norm_num_groups=8, sample_size=32),
    # 16 groups, no mid-block attention, no quant convs
    "g16_plain": dict(norm_num_groups=16, sample_size=16, mid_block_add_attention=False,
                      use_quant_conv=False, use_post_quant_conv=False),
}


def make_reference(seed: int = 0, **overrides) -> TorchAutoencoderKL:
    """Tiny diffusers VAE with every parameter random (norm weights around 1, the rest ~0.1)."""
    kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.3)
    kwargs.update(overrides)
    model = TorchAutoencoderKL(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = ("norm" in name) and name.endswith(".weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise)
    return model


def images(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(diffusers model, our model loaded from its save_pretrained folder, config overrides)."""
    overrides = CONFIGS[request.param]
    ref = make_reference(**overrides)
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref.save_pretrained(str(folder))
    return ref, AutoencoderKL.from_pretrained(str(folder)), overrides


def test_config_and_parameter_names(pair):
    ref, ours, overrides = pair
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.scaling_factor == 0.3
    assert ours.config.norm_num_groups == overrides["norm_num_groups"]
    assert ours.downscale_factor == 2


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_encode_decode_forward_match(pair):
    ref, ours, overrides = pair
    size = overrides["sample_size"]
    x = images((2, 3, size, size))
    noise = torch.randn((2, 4, size // 2, size // 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        z_sampled = post.sample(generator=torch.Generator().manual_seed(5))  # = mean + std * noise
        decoded = ref.decode(post.mean).sample
        forward = ref(torch.from_numpy(x)).sample
        forward_sampled = ref(torch.from_numpy(x), sample_posterior=True,
                              generator=torch.Generator().manual_seed(5)).sample
        kl = post.kl()

    ours_post = ours.encode(jt.array(x)).latent_dist
    assert max_abs_diff(to_numpy(ours_post.mean), to_numpy(post.mean)) <= TOL
    assert max_abs_diff(to_numpy(ours_post.std), to_numpy(post.std)) <= TOL
    assert max_abs_diff(to_numpy(ours_post.logvar), to_numpy(post.logvar)) <= TOL
    assert max_abs_diff(to_numpy(ours_post.sample(noise.numpy())), to_numpy(z_sampled)) <= TOL
    assert max_abs_diff(to_numpy(ours_post.kl()), to_numpy(kl)) <= TOL * max(1.0, float(kl.abs().max()))
    assert max_abs_diff(to_numpy(ours.decode(ours_post.mean).sample), to_numpy(decoded)) <= TOL
    assert max_abs_diff(to_numpy(ours(jt.array(x)).sample), to_numpy(forward)) <= TOL
    ours_sampled = ours(jt.array(x), sample_posterior=True, noise=noise.numpy()).sample
    assert max_abs_diff(to_numpy(ours_sampled), to_numpy(forward_sampled)) <= TOL
    # the outputs are not trivially small, so the tolerance means something
    assert float(forward.abs().max()) > 0.05


def test_logvar_is_clamped():
    moments = np.zeros((1, 8, 2, 2), dtype=np.float32)
    moments[:, 4:] = np.array([-100.0, 100.0, 0.0, 1.0], dtype=np.float32).reshape(1, 4, 1, 1)
    from jdiffusion_lora.models.autoencoder_kl import DiagonalGaussianDistribution
    dist = DiagonalGaussianDistribution(jt.array(moments))
    np.testing.assert_allclose(dist.logvar.numpy()[0, :, 0, 0], [-30.0, 20.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="noise shape"):
        dist.sample(np.zeros((1, 4, 3, 3), dtype=np.float32))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_inference_decode_releases_memory_between_stages_with_the_same_numbers(pair, monkeypatch):
    """Without gradients the decoder computes stage by stage and gives cached memory back after each (mid
    block, every up-block resnet and upsampler); with gradients it never syncs. The numbers are the same."""
    _, ours, overrides = pair
    z = jt.array(images((1, 4, overrides["sample_size"] // 2, overrides["sample_size"] // 2), seed=4))
    calls = []
    real_gc = jt.gc
    monkeypatch.setattr(jt, "gc", lambda: (calls.append(1), real_gc()))
    with_grad = ours.decode(z).sample.numpy()
    assert calls == []
    with jt.no_grad():
        inference = ours.decode(z).sample.numpy()
    up = ours.decoder.up_blocks
    assert len(calls) == 1 + sum(len(b.resnets) + (b.upsamplers is not None) for b in up)
    assert np.array_equal(inference, with_grad)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_slicing_matches_batched(pair):
    _, ours, overrides = pair
    size = overrides["sample_size"]
    x = jt.array(images((2, 3, size, size), seed=2))
    moments = ours.encode(x).latent_dist.parameters.numpy()
    out = ours.decode(jt.array(moments[:, :4])).sample.numpy()
    ours.enable_slicing()
    try:
        sliced_moments = ours.encode(x).latent_dist.parameters.numpy()
        sliced_out = ours.decode(jt.array(moments[:, :4])).sample.numpy()
    finally:
        ours.disable_slicing()
    assert max_abs_diff(sliced_moments, moments) <= 1e-5
    assert max_abs_diff(sliced_out, out) <= 1e-5


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_tiled_decode_and_encode_match_diffusers(tmp_path):
    """sample_size=16 -> 8x8 latent tiles; a 16x16 latent (32x32 image) is split into 3x3 tiles."""
    ref = make_reference(seed=3, sample_size=16)
    ref.save_pretrained(str(tmp_path))
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    x = images((2, 3, 32, 32), seed=3)
    z = images((2, 4, 16, 16), seed=4)
    with torch.no_grad():
        plain = ref.decode(torch.from_numpy(z)).sample
        ref.enable_tiling()
        tiled = ref.decode(torch.from_numpy(z)).sample
        tiled_mean = ref.encode(torch.from_numpy(x)).latent_dist.mean
        tiled_forward = ref(torch.from_numpy(x)).sample
    assert max_abs_diff(to_numpy(tiled), to_numpy(plain)) > 1e-3  # tiling really happened

    ours.enable_tiling()
    assert max_abs_diff(to_numpy(ours.decode(jt.array(z)).sample), to_numpy(tiled)) <= TOL
    assert max_abs_diff(to_numpy(ours.encode(jt.array(x)).latent_dist.mean), to_numpy(tiled_mean)) <= TOL
    assert max_abs_diff(to_numpy(ours(jt.array(x)).sample), to_numpy(tiled_forward)) <= TOL
    # an image no larger than one tile is not tiled
    small = images((1, 4, 8, 8), seed=6)
    tiled_small = ours.decode(jt.array(small)).sample.numpy()
    ours.disable_tiling()
    assert max_abs_diff(tiled_small, ours.decode(jt.array(small)).sample.numpy()) <= 1e-6
    assert max_abs_diff(to_numpy(ours.decode(jt.array(z)).sample), to_numpy(plain)) <= TOL


def _save_folder(folder, config: dict, state: dict):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **config}, f)
    save_safetensors(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("conv_shaped", [True, False])
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_old_attention_names_load(tmp_path, conv_shaped):
    ref = make_reference(seed=7, sample_size=16)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_state = {}
    for key, value in ref.state_dict().items():
        value = value.numpy()
        for new, old in renames.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if conv_shaped and key.endswith(".weight"):
                    value = value[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        old_state[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old_state
    _save_folder(str(tmp_path), dict(ref.config), old_state)
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    x = images((1, 3, 16, 16), seed=8)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).sample
    assert max_abs_diff(to_numpy(ours(jt.array(x)).sample), to_numpy(expected)) <= TOL


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_save_pretrained_loads_in_diffusers(tmp_path):
    ours = AutoencoderKL(AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                             norm_num_groups=8, sample_size=16))
    ours.save_pretrained(str(tmp_path))
    ref = TorchAutoencoderKL.from_pretrained(str(tmp_path)).eval()
    x = images((1, 3, 16, 16), seed=9)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).sample
    assert max_abs_diff(to_numpy(ours(jt.array(x)).sample), to_numpy(expected)) <= TOL


def test_missing_and_corrupt_weights_name_the_file(tmp_path):
    ref = make_reference(seed=10, sample_size=16)
    ref.save_pretrained(str(tmp_path))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(str(tmp_path))
    weights.write_bytes(b"\x00" * 3)
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(str(tmp_path))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*diffusion_pytorch_model"):
        AutoencoderKL.from_pretrained(str(tmp_path))


def test_unsupported_config_is_rejected():
    with pytest.raises(ConfigError, match="DownEncoderBlock2D"):
        AutoencoderKL.from_config({"down_block_types": ["AttnDownEncoderBlock2D"],
                                   "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [32]})
    with pytest.raises(ConfigError, match="same length"):
        AutoencoderKLConfig(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32,))


@pytest.mark.parametrize("kernel, padding, rows", [(3, 1, 37), (1, 0, 20), (3, 1, 5)])
def test_banded_inference_convolution_matches_the_whole_one(kernel, padding, rows, monkeypatch):
    """Large inference convolutions run in bands of rows with their halo (zero rows at the image edges only):
    the same output as one convolution over the whole input, against torch's conv2d too. With gradients, or
    strided, a convolution is never banded."""
    from jdiffusion_lora.models import layers

    conv = layers.Conv2d(3, 5, kernel, padding=padding)
    x = np.random.default_rng(0).standard_normal((2, 3, rows, 11)).astype(np.float32)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(conv.weight.numpy()),
                                          torch.from_numpy(conv.bias.numpy()), padding=padding).numpy()
    whole = conv(jt.array(x)).numpy()
    monkeypatch.setattr(layers, "CONV_BAND_FROM", 0)
    monkeypatch.setattr(layers, "CONV_BAND_BYTES", 2 * 3 * 11 * 4 * 2)              # two rows per band
    with jt.no_grad():
        assert conv._bands(jt.array(x)) == (rows + 1) // 2
        banded = conv(jt.array(x)).numpy()
    assert max_abs_diff(banded, expected) <= 1e-5
    assert max_abs_diff(banded, whole) <= 1e-6
    strided = layers.Conv2d(3, 5, 3, stride=2, padding=1)
    assert strided._bands(jt.array(x)) == 1
    monkeypatch.setattr(layers.Conv2d, "_banded", lambda *a: pytest.fail("banded while gradients flow"))
    assert max_abs_diff(conv(jt.array(x)).numpy(), whole) == 0
