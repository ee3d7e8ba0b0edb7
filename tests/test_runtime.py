"""The package configures Jittor itself: CPU on a machine with nvcc but no CUDA runtime."""
import os
import shutil
import subprocess
import sys

import pytest

from jdiffusion_lora import _runtime


def _env_without_jittor_flags():
    env = {k: v for k, v in os.environ.items() if k not in ("nvcc_path", "JDIFFUSION_DEVICE", "FIX_TORCH_ERROR")}
    return env


def test_import_on_machine_with_nvcc_but_no_cuda_runtime():
    if shutil.which("nvcc") is None:
        pytest.skip("this test needs a machine with nvcc on PATH")
    if _runtime.gpu_available():
        pytest.skip("this machine has a usable GPU")
    code = ("import os, jdiffusion_lora, sys; "
            "print(jdiffusion_lora.DEVICE, repr(os.environ['nvcc_path']), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env_without_jittor_flags(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["cpu", "''", "False"]


def test_device_override_is_validated():
    env = {**_env_without_jittor_flags(), "JDIFFUSION_DEVICE": "tpu"}
    out = subprocess.run([sys.executable, "-c", "import jdiffusion_lora"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode != 0
    assert "JDIFFUSION_DEVICE must be auto, cpu or cuda" in out.stderr


def test_gpu_detection_false_without_driver(monkeypatch):
    monkeypatch.setattr(_runtime, "_cuda_device_count", lambda: 0)
    assert _runtime.gpu_available() is False
