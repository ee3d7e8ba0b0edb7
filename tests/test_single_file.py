"""Single-file (original layout) checkpoints: written here, checked by diffusers' own from_single_file,
read back by ours to the outputs of the diffusers folder."""
import os

import numpy as np
import pytest
import torch

from jdiffusion_lora import StableDiffusionPipeline
from jdiffusion_lora.weights import WeightsError, read_safetensors

from sd_fixtures import randomize_

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "jdiffusion_lora", "assets", "tiny-sd", "tokenizer")


def build_folder(folder, sd2: bool):
    """A tiny random diffusers SD 1.x / 2.x pipeline with real-SD conventions (32 norm groups, CLIP vocabulary,
    8 heads per block for 1.x, heads of 64 channels for 2.x) saved to `folder`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionPipeline as TorchPipe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    channels = (64, 128) if sd2 else (32, 64)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=channels,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=tuple(c // 64 for c in channels) if sd2 else 8,
                                use_linear_projection=sd2)
    vae = AutoencoderKL(latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=1, hidden_act="gelu" if sd2 else "quick_gelu"))
    for i, m in enumerate((unet, vae, text_encoder)):
        randomize_(m, i, std=0.04 if m is vae else 0.15)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    # SD 2.x's tokenizer pads with "!" (what its tokenizer folder says)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, **({"pad_token": "!"} if sd2 else {}))
    pipe = TorchPipe(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def _torch_state(module):
    out = {}
    for k, v in module.state_dict().items():
        k = k if k.startswith(("text_model.", "down_", "up_", "mid_", "conv", "time_", "encoder.", "decoder.",
                                "quant", "post_quant")) or not hasattr(module, "config") or \
            not hasattr(module.config, "hidden_act") else "text_model." + k
        out[k] = v.float().numpy()
    return out


def _outputs(pipe):
    """UNet, VAE decoder and text encoder outputs on fixed inputs."""
    from jdiffusion_lora import jt
    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal((1, 4, 8, 8), dtype=np.float32))
    ids = jt.array(np.array(pipe.tokenizer(["a red circle"], padding="max_length", max_length=77,
                                           truncation=True)["input_ids"]))
    ctx = pipe.text_encoder(ids).last_hidden_state
    eps = pipe.unet(x, 500.0, ctx).sample
    img = pipe.vae.decode(x).sample
    return [ctx.numpy(), eps.numpy(), img.numpy()]


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2"])
def test_single_file_round_trip_matches_folder_and_diffusers(tmp_path, sd2):
    from diffusers import StableDiffusionPipeline as TorchPipe

    folder = str(tmp_path / "folder")
    ref = build_folder(folder, sd2)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    path = str(tmp_path / "model.safetensors")
    ours.save_single_file(path)
    tensors = read_safetensors(path)[0]
    if sd2:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in tensors
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in tensors
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in tensors
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    # diffusers' own reader of the original layout gets exactly the folder's weights back
    theirs = TorchPipe.from_single_file(path, config=folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        want, got = _torch_state(getattr(ref, name)), _torch_state(getattr(theirs, name))
        assert set(want) == set(got), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}.{k}")

    # ours, with nothing but the file: configs inferred, same outputs as the folder
    loaded = StableDiffusionPipeline.from_single_file(path)
    assert loaded.scheduler.config.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert loaded.tokenizer.pad_token == ("!" if sd2 else "<|endoftext|>")
    for a, b in zip(_outputs(loaded), _outputs(ours)):
        assert np.abs(a - b).max() <= 1e-6
    # `from_pretrained(file)` is the same thing
    assert type(StableDiffusionPipeline.from_pretrained(path).unet).__name__ == "UNet2DConditionModel"


def test_stability_sd2_layout_and_ckpt(tmp_path):
    """A Stability-style SD 2 file: 1 extra OpenCLIP block + text_projection (ignored), EMA and schedule
    buffers (ignored), as a .ckpt with global_step 875000 (the 512-base: epsilon)."""
    folder = str(tmp_path / "folder")
    build_folder(folder, sd2=True)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    path = str(tmp_path / "model.safetensors")
    ours.save_single_file(path)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(path)[0].items()}
    pre = "cond_stage_model.model.transformer.resblocks."
    for k in [k for k in tensors if k.startswith(pre + "1.")]:
        tensors[k.replace(pre + "1.", pre + "2.")] = torch.randn(tensors[k].shape)
    tensors["cond_stage_model.model.text_projection"] = torch.randn(64, 64)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["alphas_cumprod"] = torch.rand(1000)
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": tensors, "global_step": 875000}, ckpt)
    loaded = StableDiffusionPipeline.from_single_file(ckpt)
    assert loaded.text_encoder.config.num_hidden_layers == 2
    assert loaded.scheduler.config.prediction_type == "epsilon"
    for a, b in zip(_outputs(loaded), _outputs(ours)):
        assert np.abs(a - b).max() <= 1e-6
    assert StableDiffusionPipeline.from_single_file(ckpt, prediction_type="v_prediction") \
        .scheduler.config.prediction_type == "v_prediction"
    # a diffusers folder as `config=`: its configs, tokenizer and scheduler (v-prediction) are used
    with_config = StableDiffusionPipeline.from_single_file(ckpt, config=folder)
    assert with_config.scheduler.config.prediction_type == "v_prediction"
    for a, b in zip(_outputs(with_config), _outputs(ours)):
        assert np.abs(a - b).max() <= 1e-6


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_ckpt",))


def test_ckpt_with_disallowed_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.zeros(1)}, "hook": _Evil()},
               str(tmp_path / "evil.ckpt"))
    with pytest.raises(WeightsError, match="posix.system|os.system|not a tensor"):
        StableDiffusionPipeline.from_single_file(str(tmp_path / "evil.ckpt"))
    assert not (tmp_path / "pwned_by_ckpt").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    from jdiffusion_lora.weights import save_safetensors
    path = str(tmp_path / "lora.safetensors")
    save_safetensors({"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}, path)
    with pytest.raises(WeightsError, match="not a Stable Diffusion single-file checkpoint"):
        StableDiffusionPipeline.from_single_file(path)


def test_lora_merge_writes_single_file_that_reloads_identically(tmp_path, capsys):
    """`lora merge --out model.safetensors` (from a folder and from a single file) == merging into a folder."""
    from jdiffusion_lora.cli import main
    from jdiffusion_lora.lora import LoraState, ModuleLora, save_lora_state

    folder = str(tmp_path / "folder")
    build_folder(folder, sd2=False)
    rng = np.random.default_rng(0)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    att = "down_blocks.0.attentions.0.transformer_blocks.0"
    lora = save_lora_state(LoraState({
        f"unet.{att}.attn1.to_q": ModuleLora("lora", {"down": r(4, 32), "up": r(32, 4)}, 2.0),
        f"unet.{att}.attn2.to_k": ModuleLora("lora", {"down": r(4, 64), "up": r(32, 4)}, 2.0),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj": ModuleLora("lora", {"down": r(2, 64),
                                                                                        "up": r(64, 2)}),
    }), str(tmp_path / "style.safetensors"), format="kohya")
    merged_dir, merged_file = str(tmp_path / "merged"), str(tmp_path / "merged.safetensors")
    assert main(["lora", "merge", "--model", folder, "--lora", lora, "--out", merged_dir]) == 0
    assert main(["lora", "merge", "--model", folder, "--lora", lora, "--out", merged_file]) == 0
    from_dir = StableDiffusionPipeline.from_pretrained(merged_dir)
    from_file = StableDiffusionPipeline.from_single_file(merged_file)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_dir, name).numpy_state_dict(), getattr(from_file, name).numpy_state_dict()
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}.{k}")
    base = StableDiffusionPipeline.from_pretrained(folder).unet.numpy_state_dict()
    assert not np.array_equal(base[f"{att}.attn1.to_q.weight"], b_unet := from_file.unet.numpy_state_dict()[
        f"{att}.attn1.to_q.weight"]) and b_unet.shape == (32, 32)
    # single file in, single file out: the same tensors
    again = str(tmp_path / "again.safetensors")
    assert main(["lora", "merge", "--model", merged_file.replace("merged", "base"), "--lora", lora,
                 "--out", again]) == 2  # missing model: a clear error, nothing written
    assert not os.path.exists(again)
    StableDiffusionPipeline.from_pretrained(folder).save_single_file(str(tmp_path / "base.safetensors"))
    assert main(["lora", "merge", "--model", str(tmp_path / "base.safetensors"), "--lora", lora, "--out", again]) == 0
    t1, t2 = read_safetensors(merged_file)[0], read_safetensors(again)[0]
    assert set(t1) == set(t2) and all(np.array_equal(t1[k], t2[k]) for k in t1)


def test_original_yaml_flag_and_commands_take_a_file(tmp_path, capsys):
    """An original .yaml decides the prediction type and heads; `train --dry-run --base-model FILE` and
    `lora inspect --model FILE` work on the file; the dry run reads only the safetensors header."""
    from jdiffusion_lora.cli import main
    from jdiffusion_lora.train.dry_run import _load_components

    folder = str(tmp_path / "folder")
    build_folder(folder, sd2=True)
    path = str(tmp_path / "sd2.safetensors")
    StableDiffusionPipeline.from_pretrained(folder).save_single_file(path)
    yaml_path = tmp_path / "v2-inference.yaml"
    yaml_path.write_text("model:\n  params:\n    linear_start: 0.00085\n    linear_end: 0.0120\n"
                         "    unet_config:\n      params:\n        num_head_channels: 32\n")
    loaded = StableDiffusionPipeline.from_single_file(path, original_config=str(yaml_path))
    assert loaded.scheduler.config.prediction_type == "epsilon"  # no `parameterization: "v"`
    assert list(loaded.unet.config.attention_head_dim) == [2, 4]  # 64 / 32, 128 / 32
    yaml_path.write_text(yaml_path.read_text().replace("params:\n    linear", "params:\n    parameterization: v\n"
                                                                            "    linear", 1))
    assert StableDiffusionPipeline.from_single_file(path, original_config=str(yaml_path)) \
        .scheduler.config.prediction_type == "v_prediction"

    unet, text_encoder, vae, tokenizer, sched = _load_components(path)
    assert sched["prediction_type"] == "v_prediction" and tokenizer.pad_token == "!"
    assert tuple(unet.config.block_out_channels) == (64, 128) and text_encoder.config.hidden_act == "gelu"

    from jdiffusion_lora.lora import LoraState, ModuleLora, save_lora_state
    rng = np.random.default_rng(0)
    lora = save_lora_state(LoraState({"text_encoder.text_model.encoder.layers.1.mlp.fc1": ModuleLora(
        "lora", {"down": rng.standard_normal((2, 64)).astype(np.float32),
                 "up": rng.standard_normal((128, 2)).astype(np.float32)})}),
        str(tmp_path / "te.safetensors"), format="kohya")
    capsys.readouterr()
    assert main(["lora", "inspect", lora, "--model", path, "--json"]) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 1 and report["unmapped"] == []
