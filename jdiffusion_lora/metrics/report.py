"""Presenting scores: terminal table, scores.json, per-style bar charts (Pillow), side-by-side comparison."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..image_files import save_png
from ..weights import atomic_write_bytes
from .score import FID_CLIP, HIGHER_IS_BETTER, METRICS

COLUMNS = METRICS + ("total",)


def _fmt(value, width: int = 8) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-".rjust(width)
    return f"{value:.4f}".rjust(width)


def format_table(scores: Dict[str, object]) -> str:
    """Styles as rows, sub-scores and total as columns, overall last; then what was not computed."""
    cols = [c for c in COLUMNS if c not in scores.get("not_computed", {})]
    lines = ["style  " + "".join(c.rjust(9) for c in cols) + "   n_gen n_ref"]
    for style, s in scores["styles"].items():
        lines.append(f"{style:<7}" + "".join(" " + _fmt(s.get(c)) for c in cols)
                     + f"   {s.get('n_generated', ''):>5} {s.get('n_references', ''):>5}")
    lines.append("overall" + "".join(" " + _fmt(scores["overall"].get(c)) for c in cols))
    for metric, reason in scores.get("not_computed", {}).items():
        lines.append(f"{metric}: {reason}")
    if scores["overall"].get("total") is None:
        lines.append("total: not computed (needs all six sub-scores)")
    for style, reason in scores.get("skipped_styles", {}).items():
        lines.append(f"style {style} skipped: {reason}")
    return "\n".join(lines)


def _finite(obj):
    """Replace NaN / inf by None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_scores_json(scores: Dict[str, object], path: str) -> None:
    """scores.json, written atomically; not-computed metrics carry their reason instead of a number."""
    data = _finite(dict(scores))
    data["overall"] = {**{m: r for m, r in scores.get("not_computed", {}).items()}, **data["overall"]}
    if data["overall"].get("total") is None:
        data["overall"]["total"] = "not computed (needs all six sub-scores)"
    atomic_write_bytes(path, [json.dumps(data, indent=2, sort_keys=False, allow_nan=False,
                                         default=lambda v: None).encode("utf-8")])


def read_scores_json(path: str) -> Dict[str, object]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- charts

def bar_values(sub: Dict[str, object]) -> Dict[str, Optional[float]]:
    """Each metric as a bar in [0, 1] where higher is better (lpips -> 1 - lpips, fid -> its share of the formula)."""
    def num(key):
        v = sub.get(key)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    fid = num("fid")
    lpips = num("lpips")
    return {
        "dino": num("dino"), "hist": num("hist"),
        "1-lpips": None if lpips is None else 1.0 - lpips,
        "fid term": None if fid is None else (FID_CLIP - min(fid, FID_CLIP)) / FID_CLIP,
        "clip_iqa": num("clip_iqa"), "clip_r": num("clip_r"), "total": num("total"),
    }


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def style_chart(style: str, sub: Dict[str, object], overall: Dict[str, object], width: int = 640,
                height: int = 360) -> Image.Image:
    """Bars for one style's metrics (all in [0, 1], higher is better); a black tick marks the overall mean.

    Bars under the overall mean are red, the others green, so weak metrics stand out.
    """
    values, means = bar_values(sub), bar_values(overall)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title_font, font = _font(16), _font(12)
    total = sub.get("total")
    title = f"style {style}   total {total:.4f}" if isinstance(total, float) else f"style {style}   total: not computed"
    draw.text((12, 8), title, fill="black", font=title_font)
    left, right, top, bottom = 50, width - 12, 40, height - 40
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", fill="gray", font=font)
    names = list(values)
    slot = (right - left) / len(names)
    for i, name in enumerate(names):
        x0 = left + i * slot + slot * 0.18
        x1 = left + (i + 1) * slot - slot * 0.18
        v, m = values[name], means.get(name)
        if v is None:
            draw.text((x0, bottom - 16), "n/a", fill="gray", font=font)
        else:
            y = bottom - max(0.0, min(1.0, v)) * (bottom - top)
            colour = (214, 69, 65) if m is not None and v < m - 1e-9 else (70, 160, 90)
            draw.rectangle([x0, y, x1, bottom], fill=colour)
            draw.text((x0, y - 14), f"{v:.3f}", fill="black", font=font)
        if m is not None:
            ym = bottom - max(0.0, min(1.0, m)) * (bottom - top)
            draw.line([(x0 - 4, ym), (x1 + 4, ym)], fill="black", width=2)
        draw.text((x0, bottom + 6), name, fill="black", font=font)
    draw.text((left, height - 16), "bar: this style   black tick: mean over styles   red: below the mean",
              fill="gray", font=font)
    return img


def overview_chart(scores: Dict[str, object], width: int = 900, height: int = 320) -> Image.Image:
    """Total per style, sorted low to high, with the overall total as a line."""
    styles = [(s, v.get("total")) for s, v in scores["styles"].items() if isinstance(v.get("total"), float)]
    styles.sort(key=lambda kv: kv[1])
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 8), "total per style (lowest first)", fill="black", font=_font(16))
    if not styles:
        draw.text((12, 40), "total not computed", fill="gray", font=_font(12))
        return img
    left, right, top, bottom = 50, width - 12, 40, height - 30
    vmax = max(0.6, max(v for _, v in styles) * 1.1)
    slot = (right - left) / len(styles)
    overall = scores["overall"].get("total")
    for i, (s, v) in enumerate(styles):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        y = bottom - v / vmax * (bottom - top)
        below = isinstance(overall, float) and v < overall
        draw.rectangle([x0, y, x1, bottom], fill=(214, 69, 65) if below else (70, 160, 90))
        draw.text((x0, bottom + 6), s, fill="black", font=_font(11))
        if slot >= 28:
            draw.text((x0, y - 12), f"{v:.3f}"[1:] if v < 1 else f"{v:.2f}", fill="black", font=_font(10))
    if isinstance(overall, float):
        y = bottom - overall / vmax * (bottom - top)
        draw.line([(left, y), (right, y)], fill="black", width=2)
        draw.text((left + 4, y - 14), f"overall {overall:.4f}", fill="black", font=_font(12))
    return img


def write_charts(scores: Dict[str, object], folder: str) -> List[str]:
    """`style_<NN>.png` per style and `overview.png`; returns the paths written."""
    paths = []
    for style, sub in scores["styles"].items():
        path = os.path.join(folder, f"style_{style}.png")
        save_png(style_chart(style, sub, scores["overall"]), path)
        paths.append(path)
    path = os.path.join(folder, "overview.png")
    save_png(overview_chart(scores), path)
    return paths + [path]


# --------------------------------------------------------------------------- comparison

def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def format_comparison(a: Dict[str, object], b: Dict[str, object], name_a: str = "A", name_b: str = "B") -> str:
    """Two scores.json side by side: overall per metric, then total per style, with B - A.

    A difference is marked "+" when B is better (a higher score, or a lower fid / lpips) and "-" when worse.
    """
    lines = [f"A: {name_a}", f"B: {name_b}", "", f"{'overall':<10}{'A':>10}{'B':>10}{'B - A':>11}"]

    def row(label, va, vb, metric):
        va, vb = _number(va), _number(vb)
        if va is None or vb is None:
            diff = ""
        else:
            d = vb - va
            better = d > 0 if HIGHER_IS_BETTER.get(metric, True) else d < 0
            diff = f"{d:+.4f} " + ("+" if better and abs(d) > 1e-12 else ("-" if abs(d) > 1e-12 else "="))
        return f"{label:<10}" + (f"{va:10.4f}" if va is not None else f"{'-':>10}") + \
            (f"{vb:10.4f}" if vb is not None else f"{'-':>10}") + f"{diff:>13}"

    for m in COLUMNS:
        lines.append(row(m, a.get("overall", {}).get(m), b.get("overall", {}).get(m), m))
    styles = sorted(set(a.get("styles", {})) | set(b.get("styles", {})))
    if styles:
        lines += ["", f"{'style':<10}{'total A':>10}{'total B':>10}{'B - A':>11}"]
        for s in styles:
            lines.append(row(s, a.get("styles", {}).get(s, {}).get("total"),
                             b.get("styles", {}).get(s, {}).get("total"), "total"))
    return "\n".join(lines)


def compare_files(path_a: str, path_b: str) -> str:
    return format_comparison(read_scores_json(path_a), read_scores_json(path_b), path_a, path_b)


def summarize_metrics(scores: Dict[str, object], metrics: Sequence[str] = COLUMNS) -> Dict[str, float]:
    """The overall numbers that were computed, e.g. for a training log."""
    return {m: scores["overall"][m] for m in metrics if isinstance(scores["overall"].get(m), float)}
