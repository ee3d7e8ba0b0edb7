"""Where an image's denoising starts: noise (text-to-image) or, through img2img at a `strength`, a start
built from the style's reference images (`<root>/<NN>/images/*`):

    reference  one of the references (chosen by the image's seed)
    flat       a flat image of the references' mean colour
    blur       the pixel-wise mean of the references, heavily blurred (their colour layout)
    latents    latents drawn per channel from the references' latents: mean + spread * N(0, 1)

Published 2024 style-track solutions started from the style's mean colour (hist 0.44 -> 0.78 reported)
or img2img at strength 0.8-0.95 from a style-coloured start.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageFilter

from ..image_files import list_images

START_KINDS = ("noise", "reference", "flat", "blur", "latents")


def reference_paths(data_root: str, style: str) -> List[str]:
    paths = list_images(os.path.join(data_root, style, "images"))
    if not paths:
        raise FileNotFoundError(f"style {style}: no reference images in {os.path.join(data_root, style, 'images')}")
    return paths


def _load(path: str, size: Tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)  # (H, W, 3)


def flat_image(paths: List[str], size: Tuple[int, int]) -> Image.Image:
    """The references' mean colour, everywhere."""
    mean = np.mean([_load(p, size).reshape(-1, 3).mean(0) for p in paths], axis=0)
    return Image.fromarray(np.broadcast_to(mean.round().astype(np.uint8), (size[1], size[0], 3)).copy())


def blurred_image(paths: List[str], size: Tuple[int, int]) -> Image.Image:
    """The references averaged pixel by pixel, then a Gaussian blur of radius size/8."""
    mean = np.mean([_load(p, size) for p in paths], axis=0)
    image = Image.fromarray(mean.round().clip(0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=max(size) / 8))


class StartMaker:
    """Builds start images / latents per style (references read once per style and cached)."""

    def __init__(self, kind: str, data_root: str, pipe, size: Tuple[int, int]):
        if kind not in START_KINDS:
            raise ValueError(f"start must be one of {START_KINDS}, got {kind!r}")
        if kind != "noise" and not data_root:
            raise ValueError(f"start={kind!r} needs the dataset root with <NN>/images (--data)")
        self.kind, self.root, self.pipe, self.size = kind, data_root, pipe, size
        self._cache: Dict[str, object] = {}

    def __call__(self, style: str, seed: int):
        """A PIL start image, or scaled latents (1, 4, h, w) for kind "latents"."""
        paths = reference_paths(self.root, style)
        if self.kind == "reference":
            with Image.open(paths[int(np.random.default_rng([seed, 17]).integers(len(paths)))]) as im:
                return im.convert("RGB").resize(self.size, Image.LANCZOS)
        if self.kind not in self._cache:
            self._cache[self.kind] = {}
        cache = self._cache[self.kind]
        if style not in cache:
            cache[style] = {"flat": flat_image, "blur": blurred_image,
                            "latents": self.latent_stats}[self.kind](paths, self.size)
        if self.kind != "latents":
            return cache[style]
        mean, std = cache[style]                                            # (4, 1, 1) each
        h, w = self.size[1] // self.pipe.vae_scale_factor, self.size[0] // self.pipe.vae_scale_factor
        noise = np.random.default_rng([seed, 23]).standard_normal((mean.shape[0], h, w), dtype=np.float32)
        return (mean + std * noise)[None].astype(np.float32)

    def latent_stats(self, paths: List[str], size: Tuple[int, int]):
        """Per-channel mean and spread of the references' scaled latents (posterior means) -> (4, 1, 1) each."""
        from .._runtime import jt

        pixels = np.stack([_load(p, size) for p in paths]).transpose(0, 3, 1, 2) / 127.5 - 1.0
        with jt.no_grad():
            z = self.pipe.vae.encode(jt.array(pixels.astype(np.float32))).latent_dist.mean.numpy()
        z = z * self.pipe.vae.config.scaling_factor                           # (n, 4, h, w)
        return z.mean(axis=(0, 2, 3))[:, None, None], z.std(axis=(0, 2, 3))[:, None, None]
