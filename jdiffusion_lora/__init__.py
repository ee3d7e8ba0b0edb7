"""jdiffusion-lora: Stable Diffusion LoRA fine-tuning and generation on Jittor.

Importing the package configures Jittor first (CPU unless a usable CUDA GPU is present).
"""
from ._runtime import DEVICE, jt  # noqa: F401  (must come first: sets Jittor's environment)

__version__ = "0.1.0"

from .models.autoencoder_kl import AutoencoderKL  # noqa: E402
from .models.clip import CLIPTextModel  # noqa: E402
from .models.clip_tokenizer import CLIPTokenizer  # noqa: E402
from .models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from .pipelines.img2img import StableDiffusionImg2ImgPipeline  # noqa: E402
from .pipelines.stable_diffusion import StableDiffusionPipeline  # noqa: E402
from .schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                         EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

__all__ = [
    "DEVICE", "jt", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer", "UNet2DConditionModel",
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "DDIMScheduler", "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "PNDMScheduler",
]
