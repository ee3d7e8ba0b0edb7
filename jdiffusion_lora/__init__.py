"""jdiffusion-lora: Stable Diffusion LoRA fine-tuning and generation on Jittor.

Importing the package configures Jittor first (CPU unless a usable CUDA GPU is present).
"""
from ._runtime import DEVICE, jt  # noqa: F401  (must come first: sets Jittor's environment)

__version__ = "0.1.0"
