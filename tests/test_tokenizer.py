"""CLIPTokenizer parity with transformers 5.24 on a small real-shaped BPE vocabulary."""
import json
import os

import numpy as np
import pytest
import transformers

from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer, normalize, pre_tokenize

from clip_fixtures import build_clip_vocab, write_tokenizer_folder

LONG = ("a highly detailed photograph of an astronaut riding a horse on the moon, " * 8).strip()

TRICKY = [
    "a photo of a cat",
    LONG,  # over 77 tokens: truncated to bos + 75 + eos
    "Hello, World! What's up?? (really) [yes] {no} <tag> #hash @at ~tilde",
    "UPPER lower MiXeD CaSe",
    "café crème brûlée, naïve über, señor jalapeño, Ångström",
    "e\u0301 combining accent, NFC makes it é",
    "1024x1024, 3.5, 12345, -7e10, $100, 50%, 4k 8K",
    "multiple   spaces\n\nnewlines\ttabs \r\n trailing   ",
    "  leading spaces",
    "emoji 🐱🚀 ❤️ 👨‍👩‍👧 🇫🇷",
    "CJK 日本語のテキスト 中文 한국어",
    "don't it's they're we've I'm you'll he'd DON'T IT'S",
    "'s 'tis rock'n'roll ''quoted''",
    "ΟΔΟΣ Σίσυφος İstanbul straße ﬁne",
    "½ ² ① ٣ ⅷ",
    "nbsp\xa0ideographic\u3000space zero\u200bwidth",
    "",
    "hello!! world! ok!",  # "!" is SD-2's pad token: transformers 5 cuts it out as a special token
    "a<|endoftext|>b <|startoftext|>c",
    "<|STARTOFTEXT|> upper-case special tokens <|EndOfText|>",
    "https://example.com/path?x=1&y=2#frag",
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def folder(request, tmp_path_factory):
    return write_tokenizer_folder(str(tmp_path_factory.mktemp("tok")), pad_token=request.param)


@pytest.fixture(scope="module")
def pair(folder):
    return transformers.CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)


def test_vocabulary_is_real_shaped():
    vocab, merges = build_clip_vocab()
    assert len(merges) > 300 and len(vocab) == 512 + len(merges) + 2  # the corpus runs out before 400
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer  # one (tokenizers-backed) class in v5


def test_special_tokens(pair):
    ref, ours = pair
    assert ours.model_max_length == ref.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours.pad_token == ref.pad_token
    assert ours.pad_token_id == (0 if ours.pad_token == "!" else ours.eos_token_id)


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches(pair, text):
    ref, ours = pair
    expected = ref(text)["input_ids"]
    assert ours.encode(text) == expected
    assert ours.decode(expected) == ref.decode(expected)
    assert ours.decode(expected, skip_special_tokens=True) == ref.decode(expected, skip_special_tokens=True)


def test_batch_padding_truncation(pair):
    ref, ours = pair
    for kwargs in ({}, {"max_length": 20}, {"padding": "longest"}):
        theirs = ref(TRICKY, return_tensors="np", truncation=True,
                     **{"padding": "max_length", "max_length": ref.model_max_length, **kwargs})
        mine = ours(TRICKY, return_tensors="np", **kwargs)
        assert mine["input_ids"].dtype == np.int64 and mine.input_ids.shape == theirs["input_ids"].shape
        np.testing.assert_array_equal(mine.input_ids, theirs["input_ids"])
        np.testing.assert_array_equal(mine.attention_mask, theirs["attention_mask"])
    long = ours(LONG).input_ids
    assert long.shape == (1, 77) and long[0, 0] == ours.bos_token_id and long[0, -1] == ours.eos_token_id
    short = ours("a cat").input_ids[0]
    assert (short[4:] == ours.pad_token_id).all() and short[3] == ours.eos_token_id
    assert len(ours.encode(LONG)) > 77  # encode does not truncate unless asked
    assert len(ours.encode(LONG, truncation=True)) == 77
    np.testing.assert_array_equal(ours("a cat").input_ids, ours("a cat", return_tensors="np").input_ids)
    for framework in ("pt", "tf", "jax"):    # diffusers' own call passes "pt": say what to do instead
        with pytest.raises(ValueError, match="NumPy arrays"):
            ours("a cat", return_tensors=framework)


def test_round_trip_lower_case(pair):
    _, ours = pair
    text = "the quick brown fox jumps over the lazy dog and a cat sits on the wooden table"
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
    assert ours.decode(ours.encode(text)) == f"<|startoftext|>{text} <|endoftext|>"


def test_fuzz_against_transformers(pair):
    """Random strings mixing ASCII, Latin-1, Greek, punctuation, CJK, emoji, combining marks and odd spaces."""
    ref, ours = pair
    rnd = np.random.default_rng(1)
    pool = [chr(c) for c in list(range(0x20, 0x250)) + list(range(0x370, 0x400)) + list(range(0x2000, 0x2070))
            + list(range(0x3000, 0x3040)) + [0x1F600, 0x1F431, 0x200D, 0xFE0F, 0x301, 0x308, 9, 10, 13, 0x1C, 0x85]]
    pool += list("abcdefghij     '!")
    for _ in range(200):
        text = "".join(rnd.choice(pool, size=rnd.integers(1, 40)))
        assert ours.encode(text) == ref(text)["input_ids"], repr(text)


def test_saved_by_transformers_5(pair, tmp_path):
    """transformers 5 saves only tokenizer.json + tokenizer_config.json."""
    ref, _ = pair
    ref.save_pretrained(str(tmp_path / "tokenizer"))
    assert not os.path.exists(tmp_path / "tokenizer" / "vocab.json")
    ours = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer")
    for text in TRICKY:
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.pad_token_id == ref.pad_token_id


def test_our_save_pretrained_round_trips_and_loads_in_transformers(pair, tmp_path):
    ref, ours = pair
    ours.save_pretrained(str(tmp_path / "tok"))
    again = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in TRICKY:
        assert again.encode(text) == ours.encode(text) == theirs(text)["input_ids"], text
    assert again.pad_token_id == theirs.pad_token_id == ref.pad_token_id


def test_config_with_added_tokens_decoder(folder, tmp_path):
    """Folders written by transformers >= 4.34 list the special tokens in `added_tokens_decoder`."""
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as src:
            (tmp_path / name).write_text(src.read(), encoding="utf-8")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    pad = json.loads(open(os.path.join(folder, "special_tokens_map.json")).read())["pad_token"]
    decoder = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": t != "!", "rstrip": False,
                               "single_word": False, "special": True}
               for t in {"<|startoftext|>", "<|endoftext|>", pad}}
    config = {"added_tokens_decoder": decoder, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": pad, "unk_token": "<|endoftext|>", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref, ours = transformers.CLIPTokenizer.from_pretrained(str(tmp_path)), CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in TRICKY:
        assert ours.encode(text) == ref(text)["input_ids"], repr(text)


def test_building_blocks():
    assert normalize("  A\t\nB\u3000C  ") == " a b c "
    assert normalize("ΟΔΟΣ") == "οδοσ"  # per-character lower-casing, no final sigma
    assert pre_tokenize("don't stop!! 42x") == ["don", "'t", "stop", "!!", "4", "2", "x"]
    assert pre_tokenize("<|endoftext|>!") == ["<|", "endoftext", "|>", "!"]
    with pytest.raises(FileNotFoundError):
        CLIPTokenizer.from_pretrained("/nonexistent/folder")


def test_shipped_real_clip_vocabulary():
    """The built-in model's tokenizer is CLIP's real 49408-token vocabulary (`python -m tools.clip_vocab`): the ids
    every CLIP user knows, and transformers reads the same folder to the same ids on every TRICKY text."""
    from jdiffusion_lora.tiny import tiny_model_path

    folder = os.path.join(tiny_model_path(), "tokenizer")
    ours = CLIPTokenizer.from_pretrained(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert len(ours.encoder) == 49408 and (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.encode("a red circle on a blue background")[1:-1] == [320, 736, 7117, 525, 320, 1746, 5994]
    for text in TRICKY:
        assert ours.encode(text) == ref(text)["input_ids"], text
