"""CLIPTextModel parity with transformers 5.24 on tiny random models."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.models.clip import CLIPTextConfig, CLIPTextModel
from jdiffusion_lora.models.modeling import ConfigError
from jdiffusion_lora.weights import WeightsError, load_weights, save_safetensors

from helpers import max_abs_diff, to_numpy

VOCAB = 1000
BOS, EOS = VOCAB - 2, VOCAB - 1  # CLIP's special tokens are the two highest ids
TOL = 1e-4


def reference_model(hidden_act="quick_gelu", eos_token_id=EOS, layers=3, seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=BOS if eos_token_id != 2 else 0, eos_token_id=eos_token_id, pad_token_id=1)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # random LayerNorm affine too, so that the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def prompt_ids(lengths, pad_id, rng, total=77):
    """Rows like the tokenizer's: bos, content, eos, then padding; plus the attention mask."""
    ids = np.full((len(lengths), total), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, 0] = BOS
        ids[b, 1:n + 1] = rng.integers(2, BOS, n)
        ids[b, n + 1] = EOS
        mask[b, : n + 2] = 1
    return ids, mask


def run_reference(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                    output_hidden_states=True)
    return out


def assert_same(ref, ours):
    assert len(ours.hidden_states) == len(ref.hidden_states)
    assert max_abs_diff(to_numpy(ref.last_hidden_state), to_numpy(ours.last_hidden_state)) <= TOL
    assert max_abs_diff(to_numpy(ref.pooler_output), to_numpy(ours.pooler_output)) <= TOL
    for r, o in zip(ref.hidden_states, ours.hidden_states):
        assert max_abs_diff(to_numpy(r), to_numpy(o)) <= TOL


# SD-1: quick_gelu, padded with <|endoftext|>. SD-2: gelu, padded with "!" (id 0).
# eos_token_id=2 is what SD configs say: transformers then pools at the highest id (argmax).
@pytest.mark.parametrize("hidden_act,eos_token_id,pad_id", [
    ("quick_gelu", EOS, EOS), ("quick_gelu", 2, EOS), ("gelu", 2, 0), ("gelu", EOS, 0)])
@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_matches_transformers(tmp_path, rng, hidden_act, eos_token_id, pad_id):
    ref = reference_model(hidden_act, eos_token_id)
    ref.save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(str(tmp_path))
    assert ours.config.hidden_act == hidden_act and ours.config.eos_token_id == eos_token_id

    ids, mask = prompt_ids([5, 40, 75], pad_id, rng)
    assert_same(run_reference(ref, ids), ours(ids, output_hidden_states=True))
    assert_same(run_reference(ref, ids, mask), ours(ids, attention_mask=mask, output_hidden_states=True))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_masks_and_inputs(tmp_path, rng):
    ref = reference_model()
    ref.save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(str(tmp_path))
    ids, mask = prompt_ids([3, 20], EOS, rng, total=30)  # shorter than max_position_embeddings

    # Left padding leaves some queries with no key at all: SDPA (transformers' default) gives them zeros.
    left_ids, left_mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
    left_ids[:, -1] = EOS
    assert_same(run_reference(ref, left_ids, left_mask),
                ours(left_ids, attention_mask=left_mask, output_hidden_states=True))

    # jt.Var ids and a 1-D prompt work; outputs index like transformers' ModelOutput.
    out = ours(jt.array(ids), attention_mask=jt.array(mask), output_hidden_states=True)
    ref_out = run_reference(ref, ids, mask)
    assert_same(ref_out, out)
    assert max_abs_diff(to_numpy(out[0]), to_numpy(ref_out[0])) <= TOL
    assert len(out[-1]) == 4 and out[-1] is out.hidden_states
    single = ours(ids[1])
    assert single.last_hidden_state.shape == (1, 30, 32) and single.hidden_states is None
    assert max_abs_diff(to_numpy(single.pooler_output)[0], to_numpy(ref_out.pooler_output)[1]) <= TOL
    assert np.isfinite(to_numpy(out.last_hidden_state)).all()

    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(np.zeros((1, 78), dtype=np.int64))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_old_checkpoint_layouts(tmp_path, rng):
    """transformers-4 names (`text_model.` prefix, `position_ids` buffer) in .bin and .safetensors."""
    ref = reference_model(layers=2)
    ref.save_pretrained(tmp_path / "new")
    ids, mask = prompt_ids([4, 9], EOS, rng)
    expected = run_reference(ref, ids, mask)

    state = {"text_model." + k: v for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    os.makedirs(tmp_path / "bin")
    os.makedirs(tmp_path / "st")
    for folder in ("bin", "st"):
        with open(tmp_path / "new" / "config.json") as f:
            config = json.load(f)
        # Keys of an SD-1 text_encoder/config.json written by transformers 4.
        config.update({"_name_or_path": "openai/clip-vit-large-patch14", "torch_dtype": "float32",
                       "transformers_version": "4.22.0.dev0", "dropout": 0.0, "architectures": ["CLIPTextModel"]})
        with open(tmp_path / folder / "config.json", "w") as f:
            json.dump(config, f)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    save_safetensors({k: v.numpy() for k, v in state.items()}, str(tmp_path / "st" / "model.safetensors"))

    for folder in ("bin", "st"):
        ours = CLIPTextModel.from_pretrained(str(tmp_path), subfolder=folder)
        assert_same(expected, ours(ids, attention_mask=mask, output_hidden_states=True))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_save_pretrained_round_trip(tmp_path, rng):
    ref = reference_model(hidden_act="gelu", layers=2)
    ref.save_pretrained(tmp_path / "ref")
    ours = CLIPTextModel.from_pretrained(str(tmp_path / "ref"))
    ours.save_pretrained(str(tmp_path / "ours"))
    names = set(load_weights(str(tmp_path / "ours" / "model.safetensors")))
    assert "text_model.embeddings.token_embedding.weight" in names
    assert "text_model.encoder.layers.1.self_attn.out_proj.bias" in names
    assert "text_model.final_layer_norm.weight" in names and len(names) == 4 + 16 * 2

    ids, mask = prompt_ids([6, 30], 0, rng)
    back = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert_same(run_reference(back, ids, mask), ours(ids, attention_mask=mask, output_hidden_states=True))


def test_bad_files_name_the_problem(tmp_path):
    ref = reference_model(layers=2)
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        CLIPTextModel.from_pretrained(str(tmp_path))

    path.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(WeightsError, match=r"text_model\.encoder\.layers\.0\.mlp\.fc1\.weight: expected \(48, 32\), found \(64, 32\)"):
        CLIPTextModel.from_pretrained(str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps({**config, "use_fancy_rope": True}))
    with pytest.raises(ConfigError, match="use_fancy_rope"):
        CLIPTextModel.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextModel(CLIPTextConfig(hidden_act="swish"))


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_gradients_match(tmp_path, rng):
    """Text-encoder LoRA training backpropagates through the whole model, mask and pooling included."""
    ref = reference_model(layers=2)
    ref.save_pretrained(tmp_path)
    # Jittor's eval() (which from_pretrained calls) stops the gradients of all parameters; train() restores them.
    ours = CLIPTextModel.from_pretrained(str(tmp_path)).train()
    ids, mask = prompt_ids([8, 30], EOS, rng)

    out = ours(ids, attention_mask=mask)
    loss = (out.last_hidden_state ** 2).mean() + out.pooler_output.sum()
    layer = ours.text_model.encoder.layers[0]
    grads = jt.grad(loss, [layer.self_attn.q_proj.weight, layer.mlp.fc1.weight, ours.text_model.final_layer_norm.bias])

    ref_out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ((ref_out.last_hidden_state ** 2).mean() + ref_out.pooler_output.sum()).backward()
    ref_layer = ref.encoder.layers[0]
    for g, p in zip(grads, [ref_layer.self_attn.q_proj.weight, ref_layer.mlp.fc1.weight, ref.final_layer_norm.bias]):
        assert max_abs_diff(to_numpy(p.grad), to_numpy(g)) <= TOL
