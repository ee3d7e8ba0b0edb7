"""Scorer image preprocessing equals transformers' PIL image processors (CLIP, DINOv2)."""
import numpy as np
import pytest
from PIL import Image

from jdiffusion_lora.metrics.preprocess import clip_pixels, dinov2_pixels

transformers = pytest.importorskip("transformers")


def test_matches_transformers_pil_processors(rng):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil()
    # facebook/dinov2-base preprocessor_config.json
    dino = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                do_center_crop=True)
    for shape in [(512, 512), (300, 401), (401, 300), (225, 230)]:
        image = Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8))
        np.testing.assert_allclose(clip_pixels(image), clip(image, return_tensors="np")["pixel_values"][0], atol=1e-6)
        np.testing.assert_allclose(dinov2_pixels(image), dino(image, return_tensors="np")["pixel_values"][0], atol=1e-6)
