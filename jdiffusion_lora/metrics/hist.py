"""Colour-histogram similarity ("hist" sub-score), numpy only.

Per image two histograms are taken:
- RGB: joint 16 x 16 x 16 histogram of the 8-bit channels (bin = value // 16, as OpenCV's
  `calcHist([img], [0, 1, 2], None, [16]*3, [0, 256]*3)`);
- HSV: OpenCV's 8-bit HSV (`cvtColor(..., COLOR_RGB2HSV)`: H in [0, 180) = degrees / 2,
  S and V in [0, 255]) quantised to 72 colours, 8 hues x 3 saturations x 3 values:
      H (degrees): (315, 360) u [0, 20] -> 0, (20, 40] -> 1, (40, 75] -> 2, (75, 155] -> 3,
                   (155, 190] -> 4, (190, 270] -> 5, (270, 295] -> 6, (295, 315] -> 7
      S, V (in [0, 1]): [0, 0.2] -> 0, (0.2, 0.7] -> 1, (0.7, 1] -> 2
      colour index = 9 H + 3 S + V.

Histograms are normalised to sum 1. The reference histogram of a style is the mean of its
references' histograms; each generated image scores
    (correl(rgb, ref_rgb) + correl(hsv72, ref_hsv72)) / 2
with OpenCV's HISTCMP_CORREL (Pearson correlation over the bins, histograms flattened: OpenCV's
Python binding reads an unflattened (16, 16, 16) array as a 16-channel image and returns nonsense),
and a style's hist is the mean over its generated images.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import numpy as np

RGB_BINS = 16
HUE_EDGES_DEG = np.array([20, 40, 75, 155, 190, 270, 295, 315], dtype=np.float64)
SV_EDGES = np.array([0.2, 0.7], dtype=np.float64)
HSV_BINS = 72
# np.finfo(np.float64).eps, written out: np.finfo warns about subnormals once Jittor has set flush-to-zero.
FLOAT64_EPS = 2.220446049250313e-16

# OpenCV's fixed-point tables for 8-bit RGB -> HSV (imgproc/src/color_hsv.simd.hpp).
_HSV_SHIFT = 12
_DIV = np.arange(256, dtype=np.float64)
_DIV[0] = np.inf  # entry 0 is 0 in OpenCV
_SDIV_TABLE = np.round((255 << _HSV_SHIFT) / _DIV).astype(np.int64)
_HDIV_TABLE_180 = np.round((180 << _HSV_SHIFT) / (6.0 * _DIV)).astype(np.int64)


def as_rgb_uint8(image) -> np.ndarray:
    """PIL image or (H, W, 3) array -> (H, W, 3) uint8 RGB array."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    return arr


def rgb_to_hsv_opencv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> uint8 HSV exactly as OpenCV's `cvtColor(COLOR_RGB2HSV)` (8-bit path).

    H = hue / 2 in [0, 180), S = 255 (max - min) / max, V = max, all rounded with OpenCV's
    12-bit fixed-point arithmetic.
    """
    rgb = as_rgb_uint8(rgb).astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    diff = v - vmin
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV_TABLE[v] + half) >> _HSV_SHIFT
    # Hue sector: max is red -> g - b; max is green -> b - r + 2 diff; else r - g + 4 diff (units of diff/60 deg).
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV_TABLE_180[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in C
    h = np.where(h < 0, h + 180, h)
    return np.stack([np.clip(h, 0, 255), s, v], axis=-1).astype(np.uint8)


def hsv72_index(hsv: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit HSV (H, W, 3) -> colour index in [0, 72) per pixel (see module docstring)."""
    hsv = np.asarray(hsv)
    hue_deg = hsv[..., 0].astype(np.float64) * 2.0
    sat = hsv[..., 1].astype(np.float64) / 255.0
    val = hsv[..., 2].astype(np.float64) / 255.0
    # side="left" counts the edges strictly below the value: intervals closed on the right.
    h_bin = np.searchsorted(HUE_EDGES_DEG, hue_deg, side="left") % 8   # above 315 wraps to red
    s_bin = np.searchsorted(SV_EDGES, sat, side="left")
    v_bin = np.searchsorted(SV_EDGES, val, side="left")
    return (9 * h_bin + 3 * s_bin + v_bin).astype(np.int64)


def rgb_histogram(image) -> np.ndarray:
    """Normalised joint RGB histogram, shape (16, 16, 16), float64 summing to 1."""
    rgb = as_rgb_uint8(image).reshape(-1, 3).astype(np.int64) // (256 // RGB_BINS)
    flat = (rgb[:, 0] * RGB_BINS + rgb[:, 1]) * RGB_BINS + rgb[:, 2]
    hist = np.bincount(flat, minlength=RGB_BINS ** 3).astype(np.float64)
    return (hist / hist.sum()).reshape(RGB_BINS, RGB_BINS, RGB_BINS)


def hsv72_histogram(image) -> np.ndarray:
    """Normalised 72-colour HSV histogram, shape (72,), float64 summing to 1."""
    index = hsv72_index(rgb_to_hsv_opencv(image)).ravel()
    hist = np.bincount(index, minlength=HSV_BINS).astype(np.float64)
    return hist / hist.sum()


def compare_correl(h1: np.ndarray, h2: np.ndarray) -> float:
    """OpenCV `compareHist(h1, h2, HISTCMP_CORREL)`: Pearson correlation over all bins.

    Like OpenCV, returns 1.0 when either histogram is constant (zero variance).
    """
    a = np.asarray(h1, dtype=np.float64).ravel()
    b = np.asarray(h2, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"histograms differ in size: {a.shape} vs {b.shape}")
    n = a.size
    s1, s2 = a.sum(), b.sum()
    num = (a * b).sum() - s1 * s2 / n
    denom2 = ((a * a).sum() - s1 * s1 / n) * ((b * b).sum() - s2 * s2 / n)
    return float(num / np.sqrt(denom2)) if abs(denom2) > FLOAT64_EPS else 1.0


def image_histograms(image) -> Tuple[np.ndarray, np.ndarray]:
    """(rgb 16x16x16, hsv 72) normalised histograms of one image."""
    return rgb_histogram(image), hsv72_histogram(image)


def reference_histograms(references: Iterable) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (rgb, hsv) histograms over a style's reference images."""
    pairs = [image_histograms(img) for img in references]
    if not pairs:
        raise ValueError("no reference images")
    return np.mean([p[0] for p in pairs], axis=0), np.mean([p[1] for p in pairs], axis=0)


def hist_similarity(image, reference: Tuple[np.ndarray, np.ndarray]) -> float:
    """(correl_rgb + correl_hsv72) / 2 of one image against a style's mean reference histograms."""
    rgb, hsv = image_histograms(image)
    return 0.5 * (compare_correl(rgb, reference[0]) + compare_correl(hsv, reference[1]))


def hist_scores(generated: Sequence, references: Sequence) -> np.ndarray:
    """Per-image hist scores of a style's generated images against its references."""
    ref = reference_histograms(references)
    return np.array([hist_similarity(img, ref) for img in generated], dtype=np.float64)
