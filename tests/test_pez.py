"""PEZ hard-prompt search on a small random CLIP built here (Jittor, no weights downloaded)."""
import numpy as np
import pytest
from PIL import Image

from jdiffusion_lora.generate.pez import optimize_prompt, text_similarity, image_features
from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer
from jdiffusion_lora.metrics.nets.clip_vision import CLIPConfig, CLIPModel
from jdiffusion_lora.tiny import write_byte_level_tokenizer

# PEZ's optimisation compiles kernels no other test needs: slow set (CI runs it).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip_and_tokenizer(tmp_path_factory):
    from jdiffusion_lora._runtime import jt

    folder = str(tmp_path_factory.mktemp("tok"))
    write_byte_level_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    jt.set_global_seed(0)
    np.random.seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7),
        projection_dim=16)
    clip = CLIPModel(config)
    clip.eval()
    return clip, tokenizer


def references():
    rng = np.random.default_rng(3)
    base = np.array([200, 60, 40], np.float32)
    return [Image.fromarray(np.clip(base + rng.normal(0, 30, (28, 28, 3)), 0, 255).astype(np.uint8))
            for _ in range(3)]


def test_pez_prompt_is_closer_to_the_references_than_the_start(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    refs = references()
    result = optimize_prompt(clip, tokenizer, refs, num_tokens=4, steps=15, lr=0.1, seed=1,
                             init_prompt="a photo")
    assert result.start_prompt == "a photo"
    feats = image_features(clip, refs)
    # the reported numbers are what CLIP says about the returned text
    assert result.similarity == pytest.approx(text_similarity(clip, tokenizer, result.prompt, feats), abs=1e-6)
    assert result.start_similarity == pytest.approx(text_similarity(clip, tokenizer, "a photo", feats), abs=1e-6)
    assert result.similarity > result.start_similarity
    assert result.prompt != "a photo" and len(result.token_ids) == 4 and len(result.history) == 15
    assert not set(result.token_ids) & tokenizer.special_ids

    again = optimize_prompt(clip, tokenizer, refs, num_tokens=4, steps=15, lr=0.1, seed=1, init_prompt="a photo")
    assert (again.prompt, again.token_ids) == (result.prompt, result.token_ids)
    assert again.history == pytest.approx(result.history, abs=1e-6)


def test_pez_random_start_depends_on_seed_and_bad_input(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    refs = references()
    a = optimize_prompt(clip, tokenizer, refs, num_tokens=3, steps=0, seed=1)
    b = optimize_prompt(clip, tokenizer, refs, num_tokens=3, steps=0, seed=2)
    assert a.start_prompt != b.start_prompt and a.prompt == a.start_prompt
    with pytest.raises(ValueError, match="num_tokens"):
        optimize_prompt(clip, tokenizer, refs, num_tokens=15)
    with pytest.raises(ValueError, match="at least one reference"):
        optimize_prompt(clip, tokenizer, [], num_tokens=2)


def test_pez_command_writes_prompts_the_generate_template_uses(clip_and_tokenizer, tmp_path):
    import json

    from jdiffusion_lora.cli import main
    from jdiffusion_lora.generate.plan import PlanError, StyleInput, build_items

    clip, tokenizer = clip_and_tokenizer
    clip.save_pretrained(str(tmp_path / "clip"))
    tokenizer.save_pretrained(str(tmp_path / "clip"))
    for style in ("00", "01"):
        (tmp_path / "data" / style / "images").mkdir(parents=True)
        for i, im in enumerate(references()):
            im.save(tmp_path / "data" / style / "images" / f"obj{i}.png")
    out = tmp_path / "pez.json"
    assert main(["pez", "--data", str(tmp_path / "data"), "--clip", str(tmp_path / "clip"), "--tokens", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    prompts = {k: v["prompt"] for k, v in json.loads(out.read_text()).items()}
    assert sorted(prompts) == ["00", "01"] and all(prompts.values())

    inputs = [StyleInput("00", [("0", "Cat")], ""), StyleInput("01", [("0", "Dog")], "")]
    items = build_items(inputs, {}, template="{trigger},{pez},{prompt}", pez=prompts)
    assert items[0].text == ",".join(["style_00", prompts["00"].strip(), "Cat"])
    with pytest.raises(PlanError, match=r"styles \['01'\] have no PEZ prompt"):
        build_items(inputs, {}, template="{pez},{prompt}", pez={"00": "x"})
