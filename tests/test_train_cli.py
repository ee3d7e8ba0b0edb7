"""The `train` command and the train.sh / train_pack.sh wrappers."""
import os
import subprocess

import pytest

from jdiffusion_lora.cli import main

from train_fixtures import REPO


def test_print_config_applies_file_and_overrides(tmp_path, capsys):
    assert main(["train", "--config", os.path.join(REPO, "configs", "jittor-2024-pack.toml"), "--rank", "8",
                 "--no-adaptive-lr", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "rank = 8\n" in out and "adaptive_lr = false\n" in out and "max_train_steps = 40000\n" in out
    assert 'text_encoder_targets = ["q_proj", "k_proj", "v_proj"]' in out and "lora_dropout = 0.1\n" in out
    # the config's old name still works, with a note
    assert main(["train", "--config", os.path.join(REPO, "configs", "seed.toml"), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "max_train_steps = 40000\n" in captured.out and "jittor-2024-pack.toml" in captured.err


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "data_root not found" in capsys.readouterr().err
    assert main(["train", "--data-root", os.path.join(REPO, "styles"), "--styles", "00,09", "--dry-run"]) == 2
    assert "style(s) 09 that do not exist" in capsys.readouterr().err
    assert main(["train", "--lr-scheduler", "cosine_restarts", "--dry-run"]) == 2
    assert "lr_scheduler must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_train_sh_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["bash", os.path.join(REPO, "train.sh"), "--max-train-steps", "3", "--save-every", "2",
                           "--sample-every", "3", "--sample-steps", "2", "--no-progress-bar",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "trained 3 step(s)" in text
    for line in ("LoRA:        " + str(out / "pytorch_lora_weights.safetensors"),
                 "LoRA:        " + str(out / "lora_kohya.safetensors"),
                 "samples:     " + str(out / "samples" / "step_000003.png"),
                 "loss curve:  " + str(out / "loss_curve.png")):
        assert line in text
        assert os.path.isfile(line.split(":", 1)[1].split("(")[0].strip())
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-000002", "checkpoint-000003", "latest"]
    # the demo config ends with the before/after report on the built-in model
    assert "LoRA with trigger vs base model" in text
    assert f"side by side: {out / 'before_after.png'}" in text
    assert os.path.isfile(out / "before_after.png") and os.path.isfile(out / "before_after.json")


def test_train_pack_sh_dry_run():
    proc = subprocess.run(["bash", os.path.join(REPO, "train_pack.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 style(s), 9 training image(s)" in proc.stdout
    assert "rank 12" in proc.stdout
    for style in ("00", "01", "02"):
        captions = [line for line in proc.stdout.splitlines() if line.strip().startswith(f"{style}/")]
        assert len(captions) == 3
        # the pack config drops 20% of captions (shown empty); every other one starts with the style's trigger
        assert all(f": style_{style}," in line or line.rstrip().endswith(":") for line in captions)
    assert sum(line.rstrip().endswith(":") for line in proc.stdout.splitlines() if "png" in line) < 9
