"""Numeric options are checked at config time: one ConfigError naming the option and its allowed range."""
import dataclasses

import pytest

from jdiffusion_lora.cli import build_parser, main
from jdiffusion_lora.train.config import RANGES, ConfigError, FIELD_TYPES, TrainConfig, build_config


def test_every_numeric_train_option_has_a_range():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if FIELD_TYPES[f.name] in (int, float)}
    assert numeric - set(RANGES) == set(), "add a Range for these options in train/config.py"
    assert set(RANGES) - numeric == set()
    defaults = dataclasses.asdict(TrainConfig())
    for name, rule in RANGES.items():   # the defaults are in range
        assert rule.allows(defaults[name]), name


def _outside(rule):
    """Values just outside each bound of a rule."""
    if rule.lo is not None:
        yield rule.lo if rule.lo_open else rule.lo - 1
    if rule.hi is not None:
        yield rule.hi if rule.hi_open else rule.hi + 1
    if rule.multiple_of:
        yield max(rule.lo or 0, 0) + rule.multiple_of + 1
    yield float("nan")


@pytest.mark.parametrize("name", sorted(RANGES))
def test_each_option_refuses_values_outside_its_range(name):
    for bad in _outside(RANGES[name]):
        if FIELD_TYPES[name] is int and bad != bad:   # nan is no int: coerce() refuses it with a type error
            continue
        value = FIELD_TYPES[name](bad) if FIELD_TYPES[name] is float else bad
        with pytest.raises(ConfigError, match=rf"^{name} \(--{name.replace('_', '-')}\) must be "
                                              rf"{_re(RANGES[name].describe())}, got "):
            build_config(None, {name: value})


def _re(text):
    import re
    return re.escape(text)


@pytest.mark.parametrize("name, value, message", [
    ("learning_rate", -1e-3, r"learning_rate \(--learning-rate\) must be > 0, got -0.001"),
    ("learning_rate", 0.0, r"must be > 0"),
    ("rank", 0, r"rank \(--rank\) must be >= 1, got 0"),
    ("lora_dropout", 1.0, r"lora_dropout \(--lora-dropout\) must be in \[0, 1\), got 1.0"),
    ("max_train_steps", 0, r"max_train_steps \(--max-train-steps\) must be >= 1"),
    ("resolution", 500, r"resolution \(--resolution\) must be a multiple of 8 >= 8, got 500"),
    ("sample_guidance", -1.0, r"sample_guidance \(--sample-guidance\) must be >= 0"),
    ("adam_beta2", 1.0, r"in \[0, 1\)"),
    ("seed", -5, r"seed \(--seed\) must be in \[0, 4294967295\]"),
    ("learning_rate", float("inf"), r"must be > 0, got inf"),
])
def test_range_messages(name, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, {name: value})


def test_boundaries_inside_the_range_are_accepted():
    c = build_config(None, {"lora_dropout": 0.0, "flip_p": 1.0, "ema_decay": 0.999, "resolution": 8,
                            "keep_last": 0, "sample_guidance": 0.0})
    assert c.lora_dropout == 0.0 and c.resolution == 8


def test_negative_learning_rate_in_toml_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlearning_rate = -1e-3\n")
    with pytest.raises(ConfigError, match=r"learning_rate \(--learning-rate\) must be > 0, got -0.001"):
        build_config(str(path))


@pytest.mark.parametrize("form", [["--learning-rate", "-1e-3"], ["--learning-rate=-1e-3"], ["--learning-rate", "-.5"],
                                  ["--learning-rate", "-2"]])
def test_negative_number_parses_in_both_forms(form, capsys):
    args = build_parser().parse_args(["train", *form])
    assert float(args.cfg_learning_rate) < 0
    assert main(["train", *form, "--dry-run"]) == 2
    assert "error: learning_rate (--learning-rate) must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["txt2img", "--guidance", "-1"], r"guidance \(--guidance\) must be >= 0, got -1.0"),
    (["txt2img", "--steps", "0"], r"steps \(--steps\) must be >= 1, got 0"),
    (["txt2img", "--height", "60"], r"height \(--height\) must be a multiple of 8 >= 8, got 60"),
    (["txt2img", "--num-images", "0"], r"num_images \(--num-images\) must be >= 1"),
    (["txt2img", "--seed", "-3"], r"seed \(--seed\) must be in \[0, 4294967295\]"),
    (["generate", "--data", "styles", "--steps", "0"], r"steps \(--steps\) must be >= 1"),
    (["generate", "--data", "styles", "--guidance", "-7.5"], r"guidance \(--guidance\) must be >= 0"),
    (["generate", "--data", "styles", "--size", "100"], r"size \(--size\) must be a multiple of 8"),
    (["generate", "--data", "styles", "--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1"),
])
def test_sampling_command_ranges(argv, message, capsys):
    assert main(argv) == 2
    import re
    err = capsys.readouterr().err
    assert re.search("error: " + message, err), err
