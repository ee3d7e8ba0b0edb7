"""Set up Jittor before anything imports it.

Jittor reads its configuration from environment variables at import time. On a
machine that has `nvcc` but no working CUDA driver/runtime (a common CI image),
`import jittor` fails unless `nvcc_path=""` is set. We detect a usable GPU
ourselves and only let Jittor look for CUDA when one exists.

Override with `JDIFFUSION_DEVICE=cpu` or `JDIFFUSION_DEVICE=cuda`.
"""
from __future__ import annotations

import ctypes
import os
import shutil


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports, 0 when there is no usable driver/runtime."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if libcuda.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
    except AttributeError:
        return 0
    # Jittor also needs the runtime library to compile and launch kernels.
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
        try:
            ctypes.CDLL(name)
            return count.value
        except OSError:
            continue
    return 0


def gpu_available() -> bool:
    """True when CUDA can really be used: nvcc, a driver, a runtime and at least one device."""
    if shutil.which("nvcc") is None and not os.environ.get("nvcc_path"):
        return False
    return _cuda_device_count() > 0


def configure_environment() -> str:
    """Decide the device and set Jittor's environment variables; returns "cuda" or "cpu".

    Must run before the first `import jittor` in the process.
    """
    wanted = os.environ.get("JDIFFUSION_DEVICE", "auto").lower()
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"JDIFFUSION_DEVICE must be auto, cpu or cuda, got {wanted!r}")
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and gpu_available()) else "cpu"
    if device == "cpu":
        os.environ["nvcc_path"] = ""
    # Jittor imports torch when it is installed unless told not to; torch is test-only here.
    os.environ.setdefault("FIX_TORCH_ERROR", "0")
    # Jittor's info/warning chatter (compiler paths, cache dirs); errors still print.
    # Set log_silent=0 to see it.
    os.environ.setdefault("log_silent", "1")
    return device


DEVICE = configure_environment()

import jittor as jt  # noqa: E402  (must follow the environment set-up above)

if DEVICE == "cuda":
    jt.flags.use_cuda = 1

__all__ = ["jt", "DEVICE", "gpu_available", "configure_environment"]
