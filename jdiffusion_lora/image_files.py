"""Image files: the one list of extensions we read, listing a folder's images, writing PNGs.

PNGs are written without timestamps (the same image gives the same bytes) and atomically (a temporary
name, then a rename: a killed run never leaves half a file).
"""
from __future__ import annotations

import io
import os
from typing import List, Union

import numpy as np

from .weights import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """An image by its extension (case-insensitive); hidden files (".name") are not."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> List[str]:
    """Sorted paths of the image files directly in `folder` ([] when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if is_image_name(n) and os.path.isfile(os.path.join(folder, n)))


def png_bytes(image: Union["Image.Image", np.ndarray]) -> bytes:  # noqa: F821
    """A PIL image, or (H, W, 3) floats in [0, 1] (rounded like diffusers), as PNG bytes."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray((image * 255).round().astype("uint8"))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image, path: str) -> str:
    """Write `image` (see `png_bytes`) to `path` atomically; returns the path."""
    atomic_write_bytes(path, [png_bytes(image)])
    return path
