"""Image preprocessing of the scoring networks, numpy + Pillow only.

`clip_pixels` / `dinov2_pixels` reproduce transformers' PIL image processors (CLIPImageProcessor,
BitImageProcessor as configured by facebook/dinov2-base): resize the shortest edge with PIL
bicubic, centre crop, scale to [0, 1], normalise per channel.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(path_or_image) -> Image.Image:
    """Path or PIL image -> RGB PIL image (the file is read now and closed)."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    with Image.open(path_or_image) as im:
        return im.convert("RGB")


def resize_shortest_edge(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Scale so the shorter side is `size` (the longer one rounds down, as transformers)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), resample=resample)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) centre crop; top/left offsets round down."""
    h, w = array.shape[:2]
    if h < height or w < width:
        raise ValueError(f"image {w}x{h} is smaller than the {width}x{height} crop")
    top, left = (h - height) // 2, (w - width) // 2
    return array[top:top + height, left:left + width]


def normalize(array_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: x / 255, then (x - mean) / std per channel."""
    x = (array_uint8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def processor_pixels(image, shortest_edge: int, crop: Tuple[int, int], mean, std) -> np.ndarray:
    img = resize_shortest_edge(load_rgb(image), shortest_edge)
    return normalize(center_crop(np.asarray(img), *crop), mean, std)


def clip_pixels(image, size: int = 224) -> np.ndarray:
    """CLIPImageProcessor: shortest edge `size` bicubic, centre crop size x size, CLIP mean/std -> (3, size, size)."""
    return processor_pixels(image, size, (size, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def dinov2_pixels(image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """facebook/dinov2 processor: shortest edge 256 bicubic, centre crop 224, ImageNet mean/std -> (3, 224, 224)."""
    return processor_pixels(image, resize, (crop, crop), IMAGENET_MEAN, IMAGENET_STD)


def unit_pixels(image, size=None, resample=Image.BILINEAR) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] (torchvision ToTensor), optionally resized to size x size first."""
    img = load_rgb(image)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), resample=resample)
    return np.ascontiguousarray((np.asarray(img, np.float32) / 255.0).transpose(2, 0, 1))
