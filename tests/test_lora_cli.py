"""`lora inspect | convert | merge` command handlers (numpy-only files, no models)."""
import argparse
import json
import os

import numpy as np
import pytest

from jdiffusion_lora.cli import lora as lora_cli
from jdiffusion_lora.lora import LoraError, LoraState, ModuleLora, load_lora_state, save_lora_state
from jdiffusion_lora.weights import read_safetensors, save_safetensors

ATT = "down_blocks.0.attentions.0.transformer_blocks.0"


def run(*argv):
    parser = argparse.ArgumentParser()
    lora_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lora", *argv])
    return args.func(args)


def sample_state(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return LoraState({
        f"unet.{ATT}.attn1.to_q": ModuleLora("lora", {"down": r(4, 16), "up": r(16, 4)}, 2.0),
        f"unet.{ATT}.attn2.to_k": ModuleLora("lora", {"down": r(4, 768), "up": r(16, 4)}, 2.0),
        "unet.mid_block.resnets.0.conv1": ModuleLora("loha", {"w1_a": r(16, 2), "w1_b": r(2, 144),
                                                             "w2_a": r(16, 2), "w2_b": r(2, 144)}, 1.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": ModuleLora("lora", {"down": r(4, 768),
                                                                                         "up": r(768, 4)}),
    })


def test_inspect(tmp_path, capsys):
    path = save_lora_state(sample_state(), str(tmp_path / "style.safetensors"), format="kohya", dtype="fp16",
                           metadata={"ss_learning_rate": "1e-05"})
    assert run("inspect", path) == 0
    out = capsys.readouterr().out
    assert "format:      lycoris" in out and "base model:  sd_v1" in out
    assert "unet: down_blocks.0 2, mid_block 1" in out and "text_encoder: layers.0 1" in out
    assert "meta ss_learning_rate = 1e-05" in out
    run("inspect", path, "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 4 and report["kinds"] == {"lora": 3, "loha": 1}
    assert report["rank"] == {"4": 3, "2": 1} and report["dtypes"] == {"F16": 14}
    assert any("mid_block.resnets.0.conv1: loha" in x for x in report["diffusers_would_reject"])
    assert report["a1111_would_reject"] == [] and report["unmapped"] == []

    d = save_lora_state(LoraState({k: v for k, v in sample_state().modules.items() if v.kind == "lora"}),
                        str(tmp_path / "d.safetensors"), format="diffusers")
    run("inspect", d, "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "diffusers" and report["diffusers_would_reject"] == []
    assert "kohya names" in report["a1111_would_reject"][0]


def test_inspect_lists_unmapped_keys(tmp_path, capsys):
    tensors, _, meta = read_safetensors(save_lora_state(sample_state(), str(tmp_path / "k.safetensors"), "kohya"))
    tensors["lora_unet_custom_block_proj.lora_down.weight"] = np.ones((2, 4), np.float32)
    tensors["lora_unet_custom_block_proj.lora_up.weight"] = np.ones((4, 2), np.float32)
    save_safetensors(tensors, str(tmp_path / "odd.safetensors"), metadata=meta)
    run("inspect", str(tmp_path / "odd.safetensors"), "--json")
    report = json.loads(capsys.readouterr().out)
    assert len(report["unmapped"]) == 1 and "lora_unet_custom_block_proj.lora_down.weight" in report["unmapped"][0]
    # with the model's own names (--model) the key maps
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "text_encoder").mkdir()
    names = {"custom_block.proj.weight": np.ones((4, 4), np.float32)}
    for key in sample_state().modules:
        names[key.split(".", 1)[1] + ".weight"] = np.ones(1, np.float32)   # only the names matter here
    save_safetensors({k: v for k, v in names.items() if not k.startswith("text_model")},
                     str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    save_safetensors({k: v for k, v in names.items() if k.startswith("text_model")},
                     str(model / "text_encoder" / "model.safetensors"))
    run("inspect", str(tmp_path / "odd.safetensors"), "--json", "--model", str(model))
    report = json.loads(capsys.readouterr().out)
    assert report["unmapped"] == [] and report["blocks"]["unet"]["custom_block"] == 1
    with pytest.raises(LoraError, match="custom_block_proj"):
        run("convert", str(tmp_path / "odd.safetensors"), str(tmp_path / "x.safetensors"), "--to", "diffusers")


def test_convert(tmp_path, capsys):
    state = LoraState({k: v for k, v in sample_state().modules.items() if v.kind == "lora"})
    src = save_lora_state(state, str(tmp_path / "k.safetensors"), format="kohya")
    assert run("convert", src, str(tmp_path / "d.safetensors"), "--to", "diffusers", "--dtype", "fp16") == 0
    assert "-> " in capsys.readouterr().out
    back = load_lora_state(str(tmp_path / "d.safetensors"))
    for key, entry in state.modules.items():
        np.testing.assert_array_equal(back.modules[key].tensors["up"], entry.tensors["up"].astype(np.float16))
        assert back.modules[key].scale == entry.scale
    with pytest.raises(LoraError, match="loha"):
        run("convert", save_lora_state(sample_state(), str(tmp_path / "l.safetensors"), "kohya"),
            str(tmp_path / "l2.safetensors"), "--to", "diffusers")


def test_merge(tmp_path, capsys):
    rng = np.random.default_rng(1)
    model = tmp_path / "model"
    for sub in ("unet", "text_encoder", "vae"):
        (model / sub).mkdir(parents=True)
        (model / sub / "config.json").write_text("{}")
    unet = {f"{ATT}.attn1.to_q.weight": rng.standard_normal((16, 16)).astype(np.float16),
            f"{ATT}.attn2.to_k.weight": rng.standard_normal((16, 768)).astype(np.float16),
            "mid_block.resnets.0.conv1.weight": rng.standard_normal((16, 16, 3, 3)).astype(np.float16),
            "mid_block.resnets.0.conv1.bias": np.zeros(16, np.float16)}
    te = {"text_model.encoder.layers.0.self_attn.q_proj.weight": rng.standard_normal((768, 768)).astype(np.float32)}
    save_safetensors(unet, str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    save_safetensors(te, str(model / "text_encoder" / "model.safetensors"))
    save_safetensors({"x": np.ones(2, np.float32)}, str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    state = sample_state()
    lora = save_lora_state(state, str(tmp_path / "l.safetensors"), format="kohya")
    out = tmp_path / "merged"
    assert run("merge", "--model", str(model), "--lora", lora, "--out", str(out), "--scale", "0.5") == 0
    assert "unet: 3 modules" in capsys.readouterr().out
    merged, dtypes, _ = read_safetensors(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(dtypes.values()) == {"F16"}
    for key, entry in state.modules.items():
        component, path = key.split(".", 1)
        src = unet if component == "unet" else te
        w = src[path + ".weight"]
        expected = (w.astype(np.float32) + 0.5 * entry.delta(w.shape)).astype(w.dtype)
        got = (merged if component == "unet" else
               read_safetensors(str(out / "text_encoder" / "model.safetensors"))[0])[path + ".weight"]
        np.testing.assert_array_equal(got, expected)
    assert os.path.isfile(out / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileExistsError):
        run("merge", "--model", str(model), "--lora", lora, "--out", str(out))
