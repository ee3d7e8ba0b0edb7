"""Memory features: memory-mapped weight loading, the low-memory pipeline (bf16 weights, models loaded in turn),
VAE decoding one image at a time above a size."""
import gc
import os
import weakref

import numpy as np
import pytest

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.models import autoencoder_kl
from jdiffusion_lora.models.low_memory import is_low_memory
from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel
from jdiffusion_lora.pipelines.stable_diffusion import DeferredModel, StableDiffusionPipeline
from jdiffusion_lora.tiny import random_tiny_model_path
from jdiffusion_lora.weights import WeightsError, read_safetensors, release_pages, save_safetensors
from helpers import max_abs_diff

nn = jt.nn


def test_mmap_reading_gives_the_same_arrays(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = str(tmp_path / "w.safetensors")
    save_safetensors(tensors, path, metadata={"k": "v"})
    save_safetensors({"d": tensors["a"]}, str(tmp_path / "bf.safetensors"), dtype="bf16")
    mapped, dtypes, meta = read_safetensors(path, mmap=True)
    assert meta == {"k": "v"} and dtypes == {"a": "F32", "b": "F16", "c": "I64"}
    for name, arr in tensors.items():
        assert mapped[name].dtype == arr.dtype and np.array_equal(mapped[name], arr)
        assert not mapped[name].flags.writeable                     # a view of the read-only mapping
        release_pages(mapped[name])
        assert np.array_equal(mapped[name], arr)                   # released pages read back from the file
    bf = read_safetensors(str(tmp_path / "bf.safetensors"), mmap=True)[0]["d"]
    assert np.allclose(bf, tensors["a"], rtol=1e-2)
    release_pages(np.zeros(3))                                     # ordinary arrays: nothing to do


def test_mmap_reading_rejects_truncated_files(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_safetensors({"a": np.ones((64, 64), np.float32)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        read_safetensors(path, mmap=True)


def _round_to_bf16(model):
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is not None:
                    p.assign(p.cast("bfloat16").float32())


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_low_memory_pipeline_matches_bf16_rounded_weights():
    """Same image as the full pipeline whose Linear/Conv2d weights are rounded to bf16; the models are
    loaded only during the call, stored in bf16."""
    folder = random_tiny_model_path()
    low = StableDiffusionPipeline.from_pretrained(folder, low_memory=True)
    assert all(isinstance(getattr(low, n), DeferredModel) for n in ("unet", "vae", "text_encoder"))
    full = StableDiffusionPipeline.from_pretrained(folder)
    for model in (full.unet, full.vae, full.text_encoder):
        _round_to_bf16(model)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np", seed=5)
    for p in (low, full):
        p.set_progress_bar_config(disable=True)
    ours = low("a red circle", negative_prompt="blurry", **kw).images
    ref = full("a red circle", negative_prompt="blurry", **kw).images
    assert ours.shape == ref.shape and max_abs_diff(ours, ref) <= 1e-4
    model = low.unet.load()
    assert is_low_memory(model) and str(model.conv_in.weight.dtype) == "bfloat16"
    assert str(model.conv_norm_out.weight.dtype) == "float32"


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_low_memory_model_is_freed_without_the_cycle_collector():
    """Dropping the last reference frees a low-memory model at once: its wrapped layers form no reference
    cycle (which would keep the weights until Python's collector runs)."""
    model = DeferredModel(UNet2DConditionModel, os.path.join(random_tiny_model_path(), "unet"), None).load()
    layer = model.conv_in
    x = jt.array(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    with jt.no_grad():
        out = layer(x).numpy()
    w = layer.weight.float32()
    ref = nn.conv2d(x, w, layer.bias.float32(), padding=1).numpy()
    assert max_abs_diff(out, ref) <= 1e-5 and str(layer.weight.dtype) == "bfloat16"
    refs = [weakref.ref(model), weakref.ref(layer)]
    gc.disable()
    try:
        del model, layer
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()


def test_low_memory_refuses_a_dtype():
    with pytest.raises(ValueError, match="low_memory"):
        StableDiffusionPipeline.from_pretrained(random_tiny_model_path(), low_memory=True, dtype="float16")


def test_vae_decodes_one_image_at_a_time_above_a_size(monkeypatch):
    vae = StableDiffusionPipeline.from_pretrained(random_tiny_model_path()).vae
    z = jt.array(np.random.default_rng(1).standard_normal((2, vae.config.latent_channels, 8, 8)).astype(np.float32))
    with jt.no_grad():
        whole = vae.decode(z).sample.numpy()
        calls = []
        decode = vae._decode
        monkeypatch.setattr(vae, "_decode", lambda x: calls.append(x.shape[0]) or decode(x))
        monkeypatch.setattr(autoencoder_kl, "SLICE_ABOVE", 1)
        sliced = vae.decode(z).sample.numpy()
    assert calls == [1, 1]
    assert max_abs_diff(sliced, whole) <= 1e-5
