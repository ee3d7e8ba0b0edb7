"""Textual Inversion training pieces (train/textual_inversion.py) on the built-in model."""
import numpy as np
import pytest

from helpers import max_abs_diff

from jdiffusion_lora._runtime import jt
from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
from jdiffusion_lora.pipelines.textual_inversion import TextualInversionError
from jdiffusion_lora.tiny import tiny_model_path
from jdiffusion_lora.train.textual_inversion import TokenEmbeddings


@pytest.fixture()
def pipe():
    p = StableDiffusionPipeline.from_pretrained(tiny_model_path())
    p.set_progress_bar_config(disable=True)
    return p


def ids_of(pipe, texts):
    texts = pipe.maybe_convert_prompt(list(texts))
    return pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]


@pytest.mark.slow
def test_new_tokens_start_from_the_init_word_and_only_they_learn(pipe):
    table_before = pipe.text_encoder.get_input_embeddings().weight.numpy().copy()
    ti = TokenEmbeddings.add(pipe, ["style_00", "style_01"], num_vectors=2, init_word="painting")
    assert ti.tokens == {"style_00": ["style_00", "style_00_1"], "style_01": ["style_01", "style_01_1"]}
    assert pipe.maybe_convert_prompt("style_01, a circle") == "style_01 style_01_1, a circle"
    init = table_before[pipe.tokenizer.tokenize_ids("painting")].mean(0)
    assert np.allclose(ti.vectors.numpy(), np.repeat(init[None], 4, 0))

    ids = ids_of(pipe, ["style_00, a red circle", "style_01 square"])
    target = jt.array(np.random.default_rng(0).standard_normal((2, 77, 32)).astype(np.float32))
    optimizer = jt.optim.Adam([ti.vectors], lr=0.05)
    losses = []
    for _ in range(15):
        hidden = pipe.text_encoder(ids, inputs_embeds=ti.embed(ids)).last_hidden_state
        loss = ((hidden - target) ** 2).mean()
        optimizer.step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    # the old vocabulary did not move; the two styles' vectors did, and differently
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.is_stop_grad() and np.array_equal(table.numpy()[:49408], table_before)
    emb = ti.embeddings()
    assert emb["style_00"].shape == (2, 32) and max_abs_diff(emb["style_00"], emb["style_01"]) > 1e-4
    # after write_back the pipeline's plain encoder gives what training saw
    ti.write_back()
    with jt.no_grad():
        trained = pipe.text_encoder(ids, inputs_embeds=ti.embed(ids)).last_hidden_state.numpy()
    assert max_abs_diff(pipe.encode_prompt(["style_00, a red circle", "style_01 square"]).numpy(), trained) <= 1e-5
    assert pipe.textual_inversion_embeddings()["style_01"] == pytest.approx(emb["style_01"])


def test_bad_tokens_and_init_words(pipe):
    with pytest.raises(TextualInversionError, match="already in the tokenizer's vocabulary"):
        TokenEmbeddings.add(pipe, ["cat</w>"], init_word="cat")
    with pytest.raises(ValueError, match="has no tokens"):
        TokenEmbeddings.add(pipe, ["style_00"], init_word=" ")
    with pytest.raises(ValueError, match="num_vectors"):
        TokenEmbeddings.add(pipe, ["style_00"], num_vectors=0)
