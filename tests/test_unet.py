"""UNet2DConditionModel parity with diffusers 0.42.1 on tiny random-weight models.

Each reference model is built by diffusers with random (non-default) weights, saved with
`save_pretrained`, loaded here with `UNet2DConditionModel.from_pretrained`, and both run on
identical inputs. Shapes are kept tiny and reused so Jittor compiles few kernels.
"""
import json
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from jdiffusion_lora import jt
from jdiffusion_lora.models.modeling import ConfigError
from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from jdiffusion_lora.weights import WeightsError

from helpers import max_abs_diff, randomize, to_numpy

TOL = 1e-4

SD1 = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
           attention_head_dim=4, use_linear_projection=False,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)

SD2 = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, cross_attention_dim=32,
           attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, act_fn="silu",
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=16)


def reference(model, sample, timestep, context, mask=None):
    t = torch.from_numpy(timestep) if isinstance(timestep, np.ndarray) else timestep
    m = None if mask is None else torch.from_numpy(mask)
    with torch.no_grad():
        return model(torch.from_numpy(sample), t, torch.from_numpy(context), encoder_attention_mask=m).sample.numpy()


def inputs(rng, batch, height, width, tokens=7, dim=32):
    sample = rng.standard_normal((batch, 4, height, width)).astype(np.float32)
    context = rng.standard_normal((batch, tokens, dim)).astype(np.float32)
    return sample, context


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("unet_sd1"))
    ref = randomize(TorchUNet(**SD1), seed=1)
    ref.save_pretrained(folder)
    return ref, folder, UNet2DConditionModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("unet_sd2"))
    ref = randomize(TorchUNet(**SD2), seed=2)
    ref.save_pretrained(folder)
    return ref, folder, UNet2DConditionModel.from_pretrained(folder)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_sd1_style_matches_diffusers(sd1):
    ref, _, ours = sd1
    rng = np.random.default_rng(0)
    sample, context = inputs(rng, 2, 16, 16)
    timestep = np.array([10, 999], dtype=np.int64)
    expected = reference(ref, sample, timestep, context)
    got = ours(jt.array(sample), timestep, jt.array(context)).sample
    assert tuple(got.shape) == (2, 4, 16, 16)
    assert np.abs(expected).max() > 0.1
    assert max_abs_diff(to_numpy(got), expected) <= TOL

    # cross-attention mask: drop the last 3 tokens of the second prompt
    mask = np.ones((2, 7), dtype=np.float32)
    mask[1, 4:] = 0
    expected_masked = reference(ref, sample, timestep, context, mask)
    got_masked = ours(jt.array(sample), jt.array(timestep), jt.array(context), encoder_attention_mask=mask).sample
    assert max_abs_diff(to_numpy(got_masked), expected_masked) <= TOL
    assert max_abs_diff(expected_masked, expected) > 1e-3  # the mask really changed something


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_sd2_style_matches_diffusers(sd2):
    ref, _, ours = sd2
    rng = np.random.default_rng(1)
    sample, context = inputs(rng, 2, 16, 16)
    timestep = np.array([3.5, 741.0], dtype=np.float32)
    expected = reference(ref, sample, timestep, context)
    got = ours(jt.array(sample), jt.array(timestep), jt.array(context)).sample
    assert tuple(got.shape) == (2, 4, 16, 16)
    assert max_abs_diff(to_numpy(got), expected) <= TOL


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_odd_size_uses_upsample_size_and_scalar_timestep(sd2):
    """12x10 latents with 2 downsamples: 12x10 -> 6x5 -> 3x3, so upsampling must target 6x5, 12x10."""
    ref, _, ours = sd2
    rng = np.random.default_rng(2)
    sample, context = inputs(rng, 2, 12, 10)
    expected = reference(ref, sample, 500, context)
    got = ours(jt.array(sample), 500, jt.array(context)).sample
    assert tuple(got.shape) == (2, 4, 12, 10)
    assert max_abs_diff(to_numpy(got), expected) <= TOL
    # a one-element timestep array broadcasts the same way as the python number
    again = ours(jt.array(sample), jt.array(np.array([500])), jt.array(context)).sample
    assert max_abs_diff(to_numpy(again), to_numpy(got)) <= 1e-6


def test_config_roundtrip_and_heads_quirk(sd2):
    _, folder, ours = sd2
    assert isinstance(ours.config, UNet2DConditionConfig)
    assert ours.config.attention_head_dim == (2, 4, 4)
    # attention_head_dim is the number of heads: 32 channels / 2 heads -> 16 per head
    attn = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 2 and attn.to_q.weight.shape[0] == 32
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    assert sorted(ours.numpy_state_dict()) == sorted(
        k for k in TorchUNet.from_config(raw).state_dict())


def test_save_pretrained_roundtrip_loads_in_diffusers(sd1, tmp_path):
    ref, _, ours = sd1
    ours.save_pretrained(str(tmp_path))
    again = UNet2DConditionModel.from_pretrained(str(tmp_path))
    assert again.config == ours.config
    back = TorchUNet.from_pretrained(str(tmp_path))
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy())
    assert back.config.attention_head_dim == ref.config.attention_head_dim


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_bin_and_fp16_variant_load(sd1, tmp_path):
    ref, _, ours = sd1
    own = ours.numpy_state_dict()

    bin_dir = str(tmp_path / "bin")
    ref.save_pretrained(bin_dir, safe_serialization=False)
    assert os.path.isfile(os.path.join(bin_dir, "diffusion_pytorch_model.bin"))
    from_bin = UNet2DConditionModel.from_pretrained(bin_dir).numpy_state_dict()
    assert sorted(from_bin) == sorted(own)
    assert all(np.array_equal(from_bin[k], own[k]) for k in own)

    fp16_dir = str(tmp_path / "fp16")
    half = TorchUNet.from_pretrained(bin_dir, torch_dtype=torch.float16)
    half.save_pretrained(fp16_dir, variant="fp16")
    assert os.path.isfile(os.path.join(fp16_dir, "diffusion_pytorch_model.fp16.safetensors"))
    model = UNet2DConditionModel.from_pretrained(fp16_dir, variant="fp16")
    assert model.dtype == "float32"
    loaded = model.numpy_state_dict()
    for k, v in half.state_dict().items():
        np.testing.assert_array_equal(loaded[k], v.float().numpy())

    # the fp16-rounded weights still compute what diffusers computes with them (in float32)
    rng = np.random.default_rng(3)
    sample, context = inputs(rng, 2, 16, 16)
    expected = reference(half.float().eval(), sample, np.array([10, 999]), context)
    got = model(jt.array(sample), np.array([10, 999]), jt.array(context)).sample
    assert max_abs_diff(to_numpy(got), expected) <= TOL


def test_unsupported_configs_raise_clear_errors():
    base = {**SD1, "down_block_types": list(SD1["down_block_types"]), "up_block_types": list(SD1["up_block_types"])}
    with pytest.raises(ConfigError, match="FancyDownBlock2D"):
        UNet2DConditionModel.from_config({**base, "down_block_types": ["CrossAttnDownBlock2D", "FancyDownBlock2D"]})
    with pytest.raises(ConfigError, match="SimpleUpBlock"):
        UNet2DConditionModel.from_config({**base, "up_block_types": ["SimpleUpBlock", "CrossAttnUpBlock2D"]})
    with pytest.raises(ConfigError, match="class_embed_type='timestep'"):
        UNet2DConditionModel.from_config({**base, "class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        UNet2DConditionModel.from_config({**base, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        UNet2DConditionModel.from_config({**base, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match="only_cross_attention"):
        UNet2DConditionModel.from_config({**base, "only_cross_attention": True})
    # keys with default / falsy values that diffusers always writes are accepted
    UNet2DConditionModel.from_config({**base, "class_embed_type": None, "addition_embed_type_num_heads": 64,
                                      "resnet_out_scale_factor": 1.0, "_diffusers_version": "0.42.1"})


def test_wrong_shape_names_key_and_shapes(sd1):
    _, _, ours = sd1
    state = ours.numpy_state_dict()
    key = "down_blocks.0.attentions.0.proj_in.weight"
    state[key] = np.zeros((32, 32), dtype=np.float32)  # a Linear weight where a 1x1 conv is expected
    with pytest.raises(WeightsError) as err:
        UNet2DConditionModel.from_config(ours.config).load_numpy_state_dict(state)
    msg = str(err.value)
    assert key in msg and "(32, 32, 1, 1)" in msg and "(32, 32)" in msg
