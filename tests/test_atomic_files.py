"""The atomic writer: a killed write leaves only a `.tmp-<pid>-...` file that the next train / generate
removes, and written files get the usual permissions (0666 & ~umask), not mkstemp's 0600."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from jdiffusion_lora.weights import TEMP_PREFIX, atomic_write_bytes, remove_stale_temp_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_WRITER = textwrap.dedent("""
    import sys, time
    from jdiffusion_lora.weights import atomic_write_bytes
    def chunks():
        yield b"half of the data"
        print("writing", flush=True)
        time.sleep(60)
        yield b"never written"
    atomic_write_bytes(sys.argv[1], chunks())
""")
# Jittor (imported by this test process) exits on SIGCHLD from a child killed by SIGKILL, so a
# middle process without Jittor starts the writer, kills it mid-write, and reports its pid.
_KILLER = textwrap.dedent("""
    import subprocess, sys
    proc = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    print(proc.pid)
""")


def killed_write(folder):
    """A process writes `folder/target.bin` atomically and is SIGKILLed mid-write; returns the temp file left."""
    out = subprocess.run([sys.executable, "-c", _KILLER, _WRITER, os.path.join(folder, "target.bin")], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    left = [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    assert len(left) == 1 and not os.path.exists(os.path.join(folder, "target.bin"))
    assert left[0].startswith(f"{TEMP_PREFIX}{pid}-")
    return os.path.join(folder, left[0])


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = killed_write(str(tmp_path / "sub"))
    legacy = tmp_path / ".tmp-k2j3h4g5"                    # the writer's name before it carried a pid
    mine = tmp_path / f".tmp-{os.getpid()}-abcd1234"       # this process is alive: maybe mid-write
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".tmp-{sleeper.pid}-zzzz"
    others = [tmp_path / "notes.tmp-1", tmp_path / ".tmpfile", tmp_path / "image.png"]
    for p in [legacy, mine, live, *others]:
        p.write_bytes(b"x")
    try:
        removed = remove_stale_temp_files(str(tmp_path))
    finally:
        sleeper.terminate()   # SIGTERM: Jittor's SIGCHLD handler tolerates it (SIGKILL would end pytest)
        sleeper.wait()
    assert sorted(removed) == sorted([stale, str(legacy)])
    assert mine.exists() and live.exists() and all(p.exists() for p in others)
    assert remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_generate_removes_a_killed_runs_temp_files(tmp_path):
    """`generate` (run_job) cleans <out>/NN/ before it starts: nothing of a killed write is left after the rerun."""
    from jdiffusion_lora.generate import GenerateSettings, run_job
    from jdiffusion_lora.tiny import tiny_model_path

    out = tmp_path / "submit"
    (out / "00").mkdir(parents=True)
    stale = killed_write(str(out / "00"))
    result = run_job([], GenerateSettings(model=tiny_model_path()), str(out), progress=False)
    assert not os.path.exists(stale) and os.path.isfile(result.manifest)
    assert [n for _, _, fs in os.walk(out) for n in fs if n.startswith(TEMP_PREFIX)] == []


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writer_applies_the_umask(tmp_path, mask, expected):
    old = os.umask(mask)
    try:
        atomic_write_bytes(str(tmp_path / "a.bin"), [b"data"])
        with open(tmp_path / "direct.bin", "wb") as f:
            f.write(b"data")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == expected == _mode(tmp_path / "direct.bin")


def test_training_outputs_and_stale_temp_files(tmp_path, umask_022):
    """A short run (after a killed one left a temp file): LoRA files, config.toml, loss_curve.png, sample
    PNGs and checkpoints get 0644 / 0755, and the killed write's temp file is gone."""
    import jdiffusion_lora  # noqa: F401  (configures Jittor first)
    from jdiffusion_lora.train.trainer import Trainer

    from train_fixtures import config, tiny_pipeline

    c = config(tmp_path, max_train_steps=1, sample_every=1, sample_steps=1, save_formats=["diffusers", "kohya"])
    os.makedirs(c.output_dir)
    stale = killed_write(c.output_dir)
    result = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None).run()
    assert not os.path.exists(stale)
    files = [*result.lora_files, os.path.join(c.output_dir, "config.toml"), result.loss_curve, result.samples[0]]
    assert len(result.lora_files) == 2
    for path in files:
        assert os.path.isfile(path) and _mode(path) == 0o644, (path, oct(_mode(path)))
    assert _mode(result.checkpoint) == 0o755
    for root, dirs, names in os.walk(c.output_dir):
        for n in names:
            assert _mode(os.path.join(root, n)) == 0o644, os.path.join(root, n)
            assert not n.startswith(TEMP_PREFIX), os.path.join(root, n)


def test_package_zip_and_sheets_modes(tmp_path, umask_022):
    import numpy as np
    from PIL import Image

    from jdiffusion_lora.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"00": ["Cat", "Dog"]}))
    out = tmp_path / "submit"
    (out / "00").mkdir(parents=True)
    for name in ("Cat", "Dog"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "00" / f"{name}.png")
    assert main(["package", "--out", str(out), "--prompts", str(prompts), "--size", "16", "--zip", "--sheets"]) == 0
    zip_path = str(out) + ".zip"
    sheets = str(out) + "_sheets"
    assert _mode(zip_path) == 0o644
    sheet_files = [os.path.join(sheets, f) for f in os.listdir(sheets)]
    assert sheet_files and all(_mode(f) == 0o644 for f in sheet_files)
    # --zip PATH and --sheets DIR still take a value
    assert main(["package", "--out", str(out), "--prompts", str(prompts), "--zip", str(tmp_path / "x.zip"),
                 "--sheets", str(tmp_path / "sh")]) == 0
    assert os.path.isfile(tmp_path / "x.zip") and os.listdir(tmp_path / "sh")
