"""Test set-up shared by all parity tests.

The PyTorch / diffusers / transformers stack is only a reference here. Import our package
first so Jittor is configured (CPU on machines without a CUDA runtime) before torch loads.
"""
import os

os.environ.setdefault("FIX_TORCH_ERROR", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jdiffusion_lora  # noqa: E402,F401
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)



# `JDL_KERNEL_LOG=FILE python -m pytest ...` appends one line per test: the Jittor kernels it compiled (new files
# in the kernel cache) and its duration. On a cold cache this names the tests that cost compile time; the count
# does not depend on how busy the machine is, unlike the duration.
if os.environ.get("JDL_KERNEL_LOG"):
    import time

    from jdiffusion_lora._runtime import jt as _jt

    _JIT_DIR = os.path.join(_jt.flags.cache_path, "jit")

    def _kernels() -> int:
        return len(os.listdir(_JIT_DIR)) if os.path.isdir(_JIT_DIR) else 0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, start = _kernels(), time.time()
        yield
        with open(os.environ["JDL_KERNEL_LOG"], "a") as f:
            f.write(f"{_kernels() - before}\t{time.time() - start:.1f}\t{item.nodeid}\n")
