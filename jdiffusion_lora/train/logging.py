"""Training metrics: JSON lines, TensorBoard scalars, a progress bar, a loss-curve PNG, labelled image grids."""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from ..image_files import png_bytes, save_png
from ..weights import atomic_write_bytes
from .tfevents import EventWriter


class MetricsLog:
    """`metrics.jsonl` (one object per logged step) and, optionally, a TensorBoard event file.

    Resuming at step s drops the JSONL lines after s, so the file always describes one run.
    `write=False` keeps the records in memory only (data-parallel ranks other than rank 0).
    """

    def __init__(self, folder: str, tensorboard: bool = True, resume_step: Optional[int] = None,
                 write: bool = True):
        self.path = os.path.join(folder, "metrics.jsonl")
        self.records: List[dict] = []
        self._f, self.tb = None, None
        if not write:
            return
        os.makedirs(folder, exist_ok=True)
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
            atomic_write_bytes(self.path, [("".join(json.dumps(r) + "\n" for r in self.records)).encode()])
        elif os.path.isfile(self.path):
            os.remove(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self.tb = EventWriter(os.path.join(folder, "tensorboard")) if tensorboard else None

    def log(self, step: int, values: Dict[str, float]) -> None:
        rec = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self.records.append(rec)
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        if self.tb is not None:
            self.tb.add_scalars(step, {f"train/{k}" if "/" not in k else k: v for k, v in values.items()})

    def add_image(self, step: int, tag: str, image: Image.Image) -> None:
        if self.tb is not None:
            self.tb.add_image(step, tag, png_bytes(image), image.size[1], image.size[0])

    def series(self, key: str) -> List[Tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if key in r]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, initial: int):
    """A tqdm bar over the optimizer steps (None when disabled), closed on the way out."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """TensorBoard-style exponential smoothing with bias correction."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def plot_curves(series: Dict[str, List[Tuple[int, float]]], path: str, title: str = "loss",
                size: Tuple[int, int] = (800, 450)) -> None:
    """Line chart of one or more (step, value) series (raw light, smoothed dark) as a PNG."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 8), title, fill="black", font=font)
    points = [(s, v) for pts in series.values() for s, v in pts if math.isfinite(v)]
    if not points:
        d.text((w // 2 - 40, h // 2), "no data yet", fill="gray", font=font)
        save_png(img, path)
        return
    s0, s1 = min(p[0] for p in points), max(p[0] for p in points)
    v0, v1 = min(p[1] for p in points), max(p[1] for p in points)
    if s1 == s0:
        s1 = s0 + 1
    if v1 == v0:
        v0, v1 = v0 - 0.5, v1 + 0.5
    pad = (v1 - v0) * 0.05
    v0, v1 = v0 - pad, v1 + pad

    def xy(s, v):
        return (left + (s - s0) / (s1 - s0) * (w - left - right), top + (v1 - v) / (v1 - v0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        v = v0 + (v1 - v0) * i / 4
        y = xy(s0, v)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
        s = s0 + (s1 - s0) * i / 4
        x = xy(s, v0)[0]
        d.line([x, h - bottom, x, h - bottom + 4], fill="black")
        d.text((x - 10, h - bottom + 8), f"{int(round(s))}", fill="black", font=font)
    d.text((w // 2 - 15, h - 14), "step", fill="black", font=font)
    colours = [((160, 190, 230), (20, 70, 160)), ((240, 180, 160), (190, 50, 20)), ((170, 220, 170), (30, 120, 30))]
    for k, (name, pts) in enumerate(series.items()):
        pts = [(s, v) for s, v in pts if math.isfinite(v)]
        if not pts:
            continue
        light, dark = colours[k % len(colours)]
        raw = [xy(s, v) for s, v in pts]
        if len(raw) > 1:
            d.line(raw, fill=light, width=1)
            d.line([xy(s, v) for (s, _), v in zip(pts, smooth([v for _, v in pts]))], fill=dark, width=2)
        else:
            x, y = raw[0]
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=dark)
        d.text((w - right - 150, top + 6 + 14 * k), name, fill=dark, font=font)
    save_png(img, path)


def image_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 4,
               title: str = "") -> Image.Image:
    """Images in a grid, each with its label (wrapped) underneath; an optional title on top."""
    font = ImageFont.load_default()
    if images[0].size[0] < 128:   # tiny images (the built-in model) are enlarged to be seen
        k = -(-128 // images[0].size[0])
        images = [im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST) for im in images]
    cw, ch = images[0].size
    cw = max(cw, 96)
    label_h = 28
    cols = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / cols)
    head = 16 if title else 0
    grid = Image.new("RGB", (cols * cw, head + rows * (ch + label_h)), "white")
    d = ImageDraw.Draw(grid)
    if title:
        d.text((4, 2), title, fill="black", font=font)
    for i, (im, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, cols)
        x, y = c * cw, head + r * (ch + label_h)
        grid.paste(im, (x + (cw - im.size[0]) // 2, y))
        per_line = max(8, cw // 6)
        text = label if len(label) <= 2 * per_line else label[:2 * per_line - 1] + "…"
        lines = [text[j:j + per_line] for j in range(0, len(text), per_line)][:2]
        for k, line in enumerate(lines):
            d.text((x + 2, y + ch + 2 + 12 * k), line, fill="black", font=font)
    return grid
