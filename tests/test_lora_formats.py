"""LoRA file formats without models: detection, name mapping, round trips, metadata, bad input."""
import json
import os
import warnings

import numpy as np
import pytest

from jdiffusion_lora.lora import (LoraError, LoraState, ModuleLora, detect_format, kohya_name_table, load_lora_state,
                                  parse_lora_state_dict, read_lora_file, save_lora_state)
from jdiffusion_lora.lora.formats import standard_name_tables
from jdiffusion_lora.lora.writing import convert_lora_file
from jdiffusion_lora.weights import WeightsError, read_safetensors, save_safetensors

ATT = "down_blocks.0.attentions.0.transformer_blocks.0"
TE = "text_model.encoder.layers.0"


def _r(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def lora_state(seed=0, dora=False) -> LoraState:
    """SD1-like widths (768 text) so the base model guess is sd_v1."""
    rng = np.random.default_rng(seed)
    m = {
        f"unet.{ATT}.attn1.to_q": ModuleLora("lora", {"down": _r(rng, 4, 32), "up": _r(rng, 32, 4)}, 8.0),
        f"unet.{ATT}.attn1.to_out.0": ModuleLora("lora", {"down": _r(rng, 4, 32), "up": _r(rng, 32, 4)}),
        f"unet.{ATT}.attn2.to_k": ModuleLora("lora", {"down": _r(rng, 2, 768), "up": _r(rng, 32, 2)}, 1.0),
        f"unet.{ATT}.ff.net.0.proj": ModuleLora("lora", {"down": _r(rng, 4, 32), "up": _r(rng, 256, 4)}, 4.0),
        "unet.down_blocks.0.attentions.0.proj_in": ModuleLora("lora", {"down": _r(rng, 4, 32, 1, 1),
                                                                      "up": _r(rng, 32, 4, 1, 1)}, 2.0),
        "unet.down_blocks.0.resnets.0.conv1": ModuleLora("lora", {"down": _r(rng, 2, 32, 3, 3),
                                                                 "up": _r(rng, 32, 2, 1, 1)}, 1.0),
        f"text_encoder.{TE}.self_attn.q_proj": ModuleLora("lora", {"down": _r(rng, 4, 768), "up": _r(rng, 768, 4)}, 4.0),
        f"text_encoder.{TE}.self_attn.out_proj": ModuleLora("lora", {"down": _r(rng, 8, 768), "up": _r(rng, 768, 8)}),
        f"text_encoder.{TE}.mlp.fc1": ModuleLora("lora", {"down": _r(rng, 4, 768), "up": _r(rng, 3072, 4)}, 2.0),
    }
    if dora:
        for key, e in m.items():
            shape = (e.tensors["up"].shape[0],) + (1,) * (e.tensors["up"].ndim - 1)
            e.tensors["magnitude"] = np.abs(_r(rng, *shape)) + 1
    return LoraState(m)


def lycoris_state(seed=0) -> LoraState:
    rng = np.random.default_rng(seed)
    return LoraState({
        f"unet.{ATT}.attn1.to_q": ModuleLora("loha", {"w1_a": _r(rng, 32, 2), "w1_b": _r(rng, 2, 32),
                                                      "w2_a": _r(rng, 32, 2), "w2_b": _r(rng, 2, 32)}, 1.0),
        "unet.down_blocks.0.resnets.0.conv1": ModuleLora("loha", {
            "t1": _r(rng, 2, 2, 3, 3), "w1_a": _r(rng, 2, 32), "w1_b": _r(rng, 2, 32),
            "t2": _r(rng, 2, 2, 3, 3), "w2_a": _r(rng, 2, 32), "w2_b": _r(rng, 2, 32)}, 2.0),
        f"unet.{ATT}.attn1.to_k": ModuleLora("lokr", {"w1": _r(rng, 4, 4), "w2_a": _r(rng, 8, 2),
                                                      "w2_b": _r(rng, 2, 8)}, 1.0),
        f"unet.{ATT}.attn1.to_v": ModuleLora("lokr", {"w1": _r(rng, 4, 4), "w2": _r(rng, 8, 8)}),
        "unet.down_blocks.0.resnets.0.conv2": ModuleLora("lokr", {"w1_a": _r(rng, 4, 1), "w1_b": _r(rng, 1, 4),
                                                                 "w2_a": _r(rng, 8, 1), "w2_b": _r(rng, 1, 72)}, 0.5),
        "unet.down_blocks.0.resnets.0.conv_shortcut": ModuleLora("lora", {
            "down": _r(rng, 2, 32, 1, 1), "mid": _r(rng, 2, 2, 3, 3), "up": _r(rng, 32, 2, 1, 1)}, 1.0),
        f"unet.{ATT}.attn2.to_q": ModuleLora("lora", {"down": _r(rng, 2, 32), "up": _r(rng, 32, 2),
                                                      "magnitude": np.abs(_r(rng, 1, 32)) + 1}, 2.0),
    })


def assert_same_state(a: LoraState, b: LoraState, exact=True):
    assert sorted(a.modules) == sorted(b.modules)
    for key in a.modules:
        ea, eb = a.modules[key], b.modules[key]
        assert ea.kind == eb.kind, key
        assert sorted(ea.tensors) == sorted(eb.tensors), key
        assert ea.scale == pytest.approx(eb.scale, rel=1e-7), key
        for t in ea.tensors:
            x, y = ea.tensors[t], eb.tensors[t]
            if t == "magnitude":
                x, y = x.reshape(-1), y.reshape(-1)
            if exact:
                assert x.shape == y.shape and np.array_equal(x.astype(np.float32), y.astype(np.float32)), (key, t)
            else:
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt,dora", [("diffusers", False), ("diffusers", True), ("kohya", False), ("kohya", True)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_bit_identical(tmp_path, fmt, dora, dtype):
    state = lora_state(dora=dora)
    first = save_lora_state(state, str(tmp_path / "a.safetensors"), format=fmt, dtype=dtype)
    loaded = load_lora_state(first)
    assert loaded.source_format == ("diffusers" if fmt == "diffusers" else ("lycoris" if dora else "kohya"))
    assert_same_state(state, loaded, exact=(dtype == "fp32"))
    second = save_lora_state(loaded, str(tmp_path / "b.safetensors"), format=fmt, dtype=dtype)
    assert_same_state(loaded, load_lora_state(second))
    assert open(first, "rb").read() == open(second, "rb").read()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lycoris_round_trip(tmp_path, dtype):
    state = lycoris_state()
    path = save_lora_state(state, str(tmp_path / "ly.safetensors"), format="kohya", dtype=dtype)
    tensors, meta = read_lora_file(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a",
            "lora_unet_down_blocks_0_resnets_0_conv1.hada_t1",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lokr_w2_b",
            "lora_unet_down_blocks_0_resnets_0_conv2.lokr_w1_a",
            "lora_unet_down_blocks_0_resnets_0_conv_shortcut.lora_mid.weight",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.dora_scale"} <= set(tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.alpha" not in tensors
    loaded = load_lora_state(path)
    assert loaded.source_format == "lycoris"
    assert_same_state(state, loaded, exact=(dtype == "fp32"))
    again = save_lora_state(loaded, str(tmp_path / "ly2.safetensors"), format="kohya", dtype=dtype)
    assert open(path, "rb").read() == open(again, "rb").read()
    with pytest.raises(LoraError, match="save with format='kohya'"):
        save_lora_state(state, str(tmp_path / "x.safetensors"), format="diffusers")


def test_convert_between_formats(tmp_path):
    state = lora_state()
    src = save_lora_state(state, str(tmp_path / "k.safetensors"), format="kohya",
                          metadata={"ss_learning_rate": "1e-05", "ss_seed": "123456"})
    dst = str(tmp_path / "d")
    convert_lora_file(src, dst, to="diffusers")
    assert_same_state(state, load_lora_state(dst))           # a folder: pytorch_lora_weights.safetensors
    back = str(tmp_path / "k2.safetensors")
    convert_lora_file(os.path.join(dst, "pytorch_lora_weights.safetensors"), back, to="kohya")
    assert_same_state(state, load_lora_state(back))


# --------------------------------------------------------------------------- what is written

def test_kohya_names_and_ss_metadata(tmp_path):
    path = save_lora_state(lora_state(), str(tmp_path / "k.safetensors"), format="kohya",
                           metadata={"ss_learning_rate": "1e-05", "ss_max_train_steps": "40000"})
    tensors, dtypes, meta = read_safetensors(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in tensors
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"] == 4.0  # = rank
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_learning_rate"] == "1e-05" and meta["ss_max_train_steps"] == "40000"


def test_diffusers_metadata_alphas(tmp_path):
    path = save_lora_state(lora_state(), str(tmp_path / "d.safetensors"), format="diffusers")
    tensors, meta = read_lora_file(path)
    assert f"unet.{ATT}.attn1.to_out.0.lora_A.weight" in tensors
    assert f"text_encoder.{TE}.self_attn.q_proj.lora_B.weight" in tensors
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 1   # ties: smallest
    assert cfg["unet.alpha_pattern"][f"{ATT}.attn1.to_q"] == 8
    assert cfg["unet.rank_pattern"] == {f"{ATT}.attn2.to_k": 2, "down_blocks.0.resnets.0.conv1": 2}
    # text targets without `text_model.` match transformers 4 and 5 CLIP module names
    assert "encoder.layers.0.self_attn.q_proj" in cfg["text_encoder.target_modules"]
    # PEFT's rslora scale alpha / sqrt(r) is honoured when reading
    meta2 = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True})}
    st = parse_lora_state_dict({k: v for k, v in tensors.items() if k.startswith("unet.") and "to_q" in k}, meta2)
    assert st.modules[f"unet.{ATT}.attn1.to_q"].scale == pytest.approx(8 / 2)


# --------------------------------------------------------------------------- reading other writers' names

def test_legacy_and_jdiffusion_names(tmp_path):
    import torch
    rng = np.random.default_rng(0)
    d, u = _r(rng, 2, 32), _r(rng, 32, 2)
    legacy = {
        f"unet.{ATT}.attn1.processor.to_out_lora.down.weight": d, f"unet.{ATT}.attn1.processor.to_out_lora.up.weight": u,
        f"unet.{ATT}.attn1.to_q.lora.down.weight": d, f"unet.{ATT}.attn1.to_q.lora.up.weight": u,
        f"{ATT.replace('down_blocks.0', 'down_blocks.1')}.attn2.processor.to_k_lora.down.weight": d,
        f"{ATT.replace('down_blocks.0', 'down_blocks.1')}.attn2.processor.to_k_lora.up.weight": u,
        f"text_encoder.{TE}.self_attn.to_q_lora.down.weight": d, f"text_encoder.{TE}.self_attn.to_q_lora.up.weight": u,
        f"text_encoder.{TE}.mlp.fc1.lora_linear_layer.down.weight": d,
        f"text_encoder.{TE}.mlp.fc1.lora_linear_layer.up.weight": u,
    }
    assert detect_format(legacy) == "diffusers-legacy"
    st = parse_lora_state_dict(legacy)
    assert sorted(st.modules) == sorted([
        f"unet.{ATT}.attn1.to_out.0", f"unet.{ATT}.attn1.to_q", f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        f"text_encoder.{TE}.self_attn.q_proj", f"text_encoder.{TE}.mlp.fc1"])
    assert np.array_equal(st.modules[f"unet.{ATT}.attn1.to_out.0"].tensors["up"], u)

    # JDiffusion: a torch pickle, PEFT wrapper prefix on the text encoder, legacy + PEFT names mixed
    jd = {f"unet.{ATT}.attn1.to_q.lora.down.weight": d, f"unet.{ATT}.attn1.to_q.lora.up.weight": u,
          f"unet.{ATT}.ff.net.2.lora_A.weight": d, f"unet.{ATT}.ff.net.2.lora_B.weight": u,
          f"text_encoder.base_model.model.{TE}.self_attn.out_proj.lora_A.weight": d,
          f"text_encoder.base_model.model.{TE}.self_attn.out_proj.lora_B.weight": u}
    folder = tmp_path / "jd"
    folder.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in jd.items()}, folder / "pytorch_lora_weights.bin")
    st = load_lora_state(str(folder))
    assert st.source_format == "jdiffusion"
    assert sorted(st.modules) == sorted([f"unet.{ATT}.attn1.to_q", f"unet.{ATT}.ff.net.2",
                                         f"text_encoder.{TE}.self_attn.out_proj"])


def test_kohya_names_come_from_the_module_table():
    table = standard_name_tables()["unet"]
    for path in (f"{ATT}.attn1.to_out.0", f"{ATT}.ff.net.0.proj", "down_blocks.0.attentions.0.proj_in",
                 "up_blocks.1.resnets.2.conv_shortcut", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"):
        assert table[path.replace(".", "_")] == path
    # two real names with the same kohya spelling are refused, not guessed
    amb = kohya_name_table(["a_b.c", "a.b_c", "x.y"], "unet")
    assert amb["a_b_c"] is None and amb["x_y"] == "x.y"
    sd = {"lora_unet_a_b_c.lora_down.weight": np.ones((1, 2), np.float32),
          "lora_unet_a_b_c.lora_up.weight": np.ones((2, 1), np.float32)}
    with pytest.raises(LoraError, match="ambiguous"):
        parse_lora_state_dict(sd, name_tables={"unet": amb})
    # flattened (transformers 5) CLIP names still map kohya's text_model_ names
    te = kohya_name_table(["encoder.layers.0.self_attn.q_proj"], "text_encoder")
    assert te["text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"


# --------------------------------------------------------------------------- bad input

def test_truncated_and_mixed_files(tmp_path):
    path = save_lora_state(lora_state(), str(tmp_path / "a.safetensors"), format="kohya")
    data = open(path, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_lora_state(str(bad))
    bin_bad = tmp_path / "cut.bin"
    bin_bad.write_bytes(b"PK\x03\x04" + b"\0" * 10)
    with pytest.raises(WeightsError):
        load_lora_state(str(bin_bad))
    tensors, _ = read_lora_file(path)
    mixed = dict(tensors)
    mixed[f"unet.{ATT}.attn1.to_v.lora_A.weight"] = np.ones((2, 32), np.float32)
    with pytest.raises(LoraError, match="mixes kohya keys"):
        parse_lora_state_dict(mixed)


def test_leftover_keys_are_named_or_listed():
    tensors, meta = read_lora_file_for(lora_state())
    extra = {
        "lora_unet_down_blocks_0_attentions_0_nonexistent.lora_down.weight": np.ones((2, 4), np.float32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_weird": np.ones(3, np.float32),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": np.ones((2, 768), np.float32),
    }
    with pytest.raises(LoraError) as e:
        parse_lora_state_dict({**tensors, **extra}, meta)
    msg = str(e.value)
    assert "nonexistent" in msg and "lora_weird" in msg and "k_proj: lora adapter is missing tensors ['up']" in msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        st = parse_lora_state_dict({**tensors, **extra}, meta, strict=False)
    text = " ".join(str(x.message) for x in w)
    assert "3 key(s)/module(s)" in text and all(k.split(".")[0] in text for k in extra)
    assert len(st.modules) == len(lora_state().modules)
    with pytest.raises(LoraError, match="not a LoRA tensor name"):
        parse_lora_state_dict({f"unet.{ATT}.attn1.to_q.weight": np.ones((2, 2), np.float32),
                               f"unet.{ATT}.attn1.to_v.lora_A.weight": np.ones((2, 2), np.float32),
                               f"unet.{ATT}.attn1.to_v.lora_B.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(LoraError, match="alpha without adapter weights"):
        parse_lora_state_dict({"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.float32(2)})


def read_lora_file_for(state):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = save_lora_state(state, os.path.join(d, "k.safetensors"), format="kohya")
        return read_lora_file(path)


def test_detect_format():
    assert detect_format(["lora_unet_x.lora_down.weight"]) == "kohya"
    assert detect_format(["lora_te1_x.hada_w1_a"]) == "lycoris"
    assert detect_format(["unet.x.lora_A.weight"]) == "diffusers"
    assert detect_format(["unet.x.lora.down.weight"]) == "diffusers-legacy"
    assert detect_format(["text_encoder.base_model.model.x.lora_A.weight"]) == "jdiffusion"
    assert detect_format(["lora_unet_x.lora_down.weight", "unet.x.lora_A.weight"]) == "mixed"
    with pytest.raises(LoraError, match="no tensors"):
        parse_lora_state_dict({})
    save_safetensors({"w": np.ones(2, np.float32)}, "/tmp/_jdl_not_lora.safetensors")
    with pytest.raises(LoraError, match="not a LoRA file"):
        load_lora_state("/tmp/_jdl_not_lora.safetensors")


def test_standard_names_cover_sd15_sd21_sdxl():
    """Every Linear/Conv2d of the real SD 1.5 / 2.1 / XL UNets and CLIP text encoders (built on
    torch's meta device: no memory, no weights) is in the table used when no model is at hand."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from jdiffusion_lora.lora.formats import standard_module_names
    sd15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
    sd21 = dict(sd15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    sdxl = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    unet_names = set(standard_module_names("unet"))
    for cfg in (sd15, sd21, sdxl):
        with torch.device("meta"):
            m = TorchUNet(**cfg)
        names = [n for n, mod in m.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
        assert names and [n for n in names if n not in unet_names] == []
    text_names = set(standard_module_names("text_encoder"))
    for hidden, layers in ((768, 12), (1024, 23), (1280, 32)):
        with torch.device("meta"):
            m = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers,
                                                           intermediate_size=4 * hidden, num_attention_heads=16))
        names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        assert [n for n in names if n not in text_names and "text_model." + n not in text_names] == []
