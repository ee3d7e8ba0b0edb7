"""benchmarks/gpu_check.py runs on CPU in its dry mode: the same checks (parity, bf16 step, real-size) and table."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_prints_its_table():
    env = dict(os.environ, PYTHONPATH=REPO, JDIFFUSION_DEVICE="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
            for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    for name in ("parity text_encoder", "parity unet", "parity vae", "train step bf16"):
        assert rows[name] == "ok", proc.stdout
    assert rows["real-size benchmark"] == "skipped"
    assert "unet bfloat16, LoRA float32" in proc.stdout


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    env = dict(os.environ, PYTHONPATH=REPO, JDIFFUSION_DEVICE="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
