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

