"""The competition's total score from its six sub-scores (4th Jittor AI Challenge, track 2).

    total = (0.2*dino + 0.4*hist + 0.4*(1 - lpips))
          * (0.5*clip_r + 0.4*(20 - min(fid, 20))/20 + 0.1*clip_iqa)

The first factor rewards looking like the style's references (higher dino and hist, lower
lpips); the second rewards showing the right object (clip_r), a feature distribution close to
the references (fid, clipped at 20) and image quality (clip_iqa).
"""
from __future__ import annotations

from typing import Mapping, Optional

# Sub-scores in the order the organisers print them, with the direction that is better.
METRICS = ("dino", "hist", "fid", "lpips", "clip_iqa", "clip_r")
HIGHER_IS_BETTER = {"dino": True, "hist": True, "fid": False, "lpips": False, "clip_iqa": True,
                    "clip_r": True, "total": True}
FID_CLIP = 20.0


def style_factor(dino: float, hist: float, lpips: float) -> float:
    """First factor: similarity to the style references, in [0, 1] for scores in their usual ranges."""
    return 0.2 * dino + 0.4 * hist + 0.4 * (1.0 - lpips)


def content_factor(clip_r: float, fid: float, clip_iqa: float) -> float:
    """Second factor: prompt retrieval, FID (clipped at 20) and CLIP-IQA quality."""
    return 0.5 * clip_r + 0.4 * (FID_CLIP - min(fid, FID_CLIP)) / FID_CLIP + 0.1 * clip_iqa


def total_score(dino: float, hist: float, fid: float, lpips: float, clip_iqa: float, clip_r: float) -> float:
    """The organisers' total (see module docstring)."""
    return style_factor(dino, hist, lpips) * content_factor(clip_r, fid, clip_iqa)


def total_from(scores: Mapping[str, Optional[float]]) -> Optional[float]:
    """Total from a dict of sub-scores; None when any of the six is missing (not computed)."""
    values = {name: scores.get(name) for name in METRICS}
    if any(not isinstance(v, (int, float)) for v in values.values()):
        return None
    return total_score(**{k: float(v) for k, v in values.items()})
