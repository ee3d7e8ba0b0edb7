"""Messages users see when something is wrong: they say what is wrong, where, and what to do."""
import os
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from jdiffusion_lora.generate.plan import MAX_STEM_BYTES, PlanError, StyleInput, build_items
from jdiffusion_lora.train.checkpoint import (CheckpointError, latest_checkpoint, load_training_state,
                                              save_training_state, write_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "jdiffusion_lora.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)


def test_long_prompt_says_the_limit_and_how_to_fix_it():
    prompt = ("a lighthouse on a cliff at dusk, " * 10)[:300]
    assert len(prompt) == 300
    with pytest.raises(PlanError) as info:
        build_items([StyleInput("00", [("0", "Cat"), ("1", prompt)])], {})
    msg = str(info.value)
    assert f"at most {MAX_STEM_BYTES} bytes" in msg and "300 bytes" in msg
    assert "shorten it in prompt.json" in msg and '--prompts file ({"00": {"1": "short name"}})' in msg
    assert "--dedupe" not in msg


def test_duplicate_prompt_still_offers_dedupe():
    with pytest.raises(PlanError, match=r"duplicate prompt 'cat' .*pass --dedupe"):
        build_items([StyleInput("00", [("0", "Cat"), ("1", "cat")])], {})


def test_each_data_warning_is_printed_once(tmp_path):
    from train_fixtures import make_competition_style

    root = tmp_path / "data"
    make_competition_style(str(root), "00", ["good", "other"], prompts=None)
    (root / "00" / "images" / "empty.png").write_bytes(b"")
    out = _run_cli("train", "--config", "configs/demo.toml", "--data-root", str(root), "--styles", "00",
                   "--resolution", "32", "--output-dir", str(tmp_path / "run"), "--dry-run")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count("empty.png: the file is empty") == 1, text
    assert text.count("prompt.json is missing") == 1, text
    assert "UserWarning" not in text


def _write_state(step):
    def write(folder):
        save_training_state(folder, {"step": step, "optimizer_steps": step}, {"w": np.full(3, step, np.float32)},
                            {}, {})
    return write


@pytest.mark.parametrize("damage", ["truncated_adapter", "bad_state_json"])
def test_damaged_latest_checkpoint_names_the_previous_good_one(tmp_path, damage):
    out = str(tmp_path / "run")
    for step in (10, 20, 30):
        write_checkpoint(out, step, _write_state(step), keep_last=3)
    latest = latest_checkpoint(out)
    good = os.path.join(os.path.dirname(latest), "checkpoint-000020")
    if damage == "truncated_adapter":
        path = os.path.join(latest, "training_state", "adapter.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:
        open(os.path.join(latest, "training_state", "state.json"), "w").write('{"step": 3')
    with pytest.raises(CheckpointError) as info:
        load_training_state(latest)
    msg = str(info.value)
    assert msg.startswith(f"cannot resume from {latest}: it is damaged (")
    assert f"the previous checkpoint {good} is complete: resume from it with --resume {good}" in msg
    assert load_training_state(good)[0]["step"] == 20     # the offered one does load


def test_damaged_only_checkpoint_suggests_starting_again(tmp_path):
    out = str(tmp_path / "run")
    write_checkpoint(out, 5, _write_state(5), keep_last=3)
    latest = latest_checkpoint(out)
    os.remove(os.path.join(latest, "training_state", "optimizer.safetensors"))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing.*no earlier complete checkpoint: "
                                              "start again with --overwrite"):
        load_training_state(latest)


def test_train_command_offers_the_previous_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    for step in (1, 2):
        write_checkpoint(out, step, _write_state(step), keep_last=3)
    latest = latest_checkpoint(out)
    open(os.path.join(latest, "training_state", "extra.safetensors"), "wb").write(b"\x08" + b"\0" * 7 + b"{")
    r = _run_cli("train", "--config", "configs/demo.toml", "--output-dir", out, "--resume", "latest",
                 "--no-progress-bar", "--no-before-after")
    assert r.returncode == 2, r.stderr[-3000:]
    good = os.path.join(os.path.dirname(latest), "checkpoint-000001")
    assert re.search(r"error: cannot resume from .*checkpoint-000002: it is damaged \(.*extra\.safetensors", r.stderr)
    assert f"resume from it with --resume {good}" in r.stderr


def test_train_sh_header_names_the_style_the_demo_trains():
    with open(os.path.join(ROOT, "configs", "demo.toml"), "rb") as f:
        styles = tomllib.load(f)["data"]["styles"]
    header = open(os.path.join(ROOT, "train.sh")).read().split("set -euo")[0]
    assert styles == ["01"]
    assert f"demo style {styles[0]} " in header and "demo style 00" not in header
