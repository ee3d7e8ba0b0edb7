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


# --------------------------------------------------------------------------- device search and report

def test_nvcc_found_where_jittor_looks_not_only_on_path(tmp_path, monkeypatch):
    """nvcc off PATH in Jittor's own CUDA folder (~/.cache/jittor/jtcuda/<ver>/bin) is found, first."""
    nvcc = tmp_path / ".cache" / "jittor" / "jtcuda" / "cuda12.2_cudnn8_linux" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("nvcc_path", raising=False)
    cands = _runtime.nvcc_candidates()
    assert cands[0] == str(nvcc) and "/usr/local/cuda/bin/nvcc" in cands
    assert _runtime.find_nvcc() == str(nvcc)


def test_gpu_visible_but_unusable_warns_why(monkeypatch):
    monkeypatch.delenv("JDIFFUSION_DEVICE", raising=False)
    monkeypatch.setattr(_runtime, "_cuda_devices", lambda: [("NVIDIA H200", 141 * 2 ** 30)])
    monkeypatch.setattr(_runtime, "find_nvcc", lambda: None)
    probe = _runtime.probe_gpu()
    assert not probe.usable
    lines = _runtime.device_report("cpu", probe)
    assert lines[0].startswith("device: CPU, ") and lines[0].endswith(" threads")
    assert lines[1].startswith("warning: a CUDA GPU is visible (NVIDIA H200) but unusable, running on CPU: no nvcc")
    assert "/usr/local/cuda/bin/nvcc" in lines[1]
    # nvcc found, runtime library missing
    monkeypatch.setattr(_runtime, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(_runtime, "_runtime_library", lambda nvcc: None)
    lines = _runtime.device_report("cpu", _runtime.probe_gpu())
    assert "nvcc is at /opt/cuda/bin/nvcc but no CUDA runtime library" in lines[1]


def test_device_line_for_gpu_cpu_and_forced(monkeypatch):
    monkeypatch.delenv("JDIFFUSION_DEVICE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _runtime.device_report("cpu", _runtime.GpuProbe([], None, None)) == ["device: CPU, 3 threads"]
    probe = _runtime.GpuProbe([("NVIDIA H200", 140 * 2 ** 30)], "/usr/local/cuda/bin/nvcc", "libcudart.so")
    assert probe.usable
    assert _runtime.device_report("cuda", probe) == ["device: GPU 0 NVIDIA H200, 140.0 GiB"]
    monkeypatch.setenv("JDIFFUSION_DEVICE", "cpu")
    assert _runtime.device_report("cpu", _runtime.GpuProbe([], None, None)) == \
        ["device: CPU, 3 threads (JDIFFUSION_DEVICE)"]


def test_configure_environment_uses_the_checked_nvcc_and_honours_the_override(monkeypatch):
    monkeypatch.setattr(_runtime, "PROBE", _runtime.PROBE)  # restored afterwards
    monkeypatch.setattr(_runtime, "probe_gpu", lambda: _runtime.GpuProbe([("G", 2 ** 30)], "/x/bin/nvcc", "rt"))
    monkeypatch.delenv("nvcc_path", raising=False)
    monkeypatch.setenv("JDIFFUSION_DEVICE", "auto")
    assert _runtime.configure_environment() == "cuda" and os.environ["nvcc_path"] == "/x/bin/nvcc"
    monkeypatch.setenv("JDIFFUSION_DEVICE", "cpu")
    assert _runtime.configure_environment() == "cpu" and os.environ["nvcc_path"] == ""
    monkeypatch.setattr(_runtime, "probe_gpu", lambda: _runtime.GpuProbe([], None, None))
    monkeypatch.setenv("JDIFFUSION_DEVICE", "cuda")
    assert _runtime.configure_environment() == "cuda"


def test_commands_print_the_device_first(tmp_path, capsys):
    from jdiffusion_lora.cli import main
    assert main(["txt2img", "--steps", "1", "--num-images", "1", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("device: CPU, ")


def test_training_keeps_freed_memory_instead_of_faulting_it_in_again():
    """After keep_freed_memory, a large buffer freed and allocated again reuses the same pages (no page faults):
    what oneDNN's per-convolution weight buffers need. JDIFFUSION_MALLOC=system leaves glibc alone."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert _runtime.keep_freed_memory({"JDIFFUSION_MALLOC": "system"}) is False
    code = ("import ctypes, resource, sys\n"
            "from jdiffusion_lora import _runtime\n"
            "if sys.argv[1] == 'keep': assert _runtime.keep_freed_memory({})\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
            "n = 64 << 20\n"
            "def touch():\n"
            "    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
            "touch()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "touch()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("keep", "system")}
    pages = (64 << 20) // 4096
    assert faults["system"] >= pages // 2          # glibc maps a 64 MB buffer afresh: every page faults again
    assert faults["keep"] < pages // 20            # kept: the second buffer is the first one's pages
