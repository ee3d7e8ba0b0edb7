"""Pipelines: `StableDiffusionPipeline` (text to image, diffusers surface) and `load_pipeline`."""
from .stable_diffusion import StableDiffusionOutput, StableDiffusionPipeline, load_pipeline

__all__ = ["StableDiffusionPipeline", "StableDiffusionOutput", "load_pipeline"]
