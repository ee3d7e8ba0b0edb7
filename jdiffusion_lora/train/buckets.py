"""Aspect-ratio buckets (`enable_bucket`), as kohya's sd-scripts makes them.

The buckets are the sizes (W, H), multiples of `bucket_reso_steps`, between `min_bucket_reso` and
`max_bucket_reso`, with W * H <= resolution**2. Each image goes to the bucket whose aspect ratio is
closest to its own, is resized (keeping its aspect ratio) to just cover it and cropped to it (random or
centre crop, by `crop`). With `bucket_no_upscale` there is no fixed table: an image larger than
resolution**2 is scaled down to about that area, a smaller one keeps its size, and its bucket is that
size rounded down to the step.

Sampling (`BucketOrder`): pass p takes each bucket's images in a permutation drawn for (p, bucket),
cuts it into batches of `train_batch_size` (the last batch of a bucket is filled up from the start of
its permutation, so every batch is full and holds one bucket only), and shuffles the batches. Every pass
has the same length, so global sample index i still names one (image, augmentation) and owns the random
streams of data.sample_rng: a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

from .data import STREAM_ORDER, DataError

Size = Tuple[int, int]   # (width, height)


class Frame(NamedTuple):
    """How one image is brought to its training size: resized to `resized`, then cropped to `size`."""
    resized: Size
    size: Size


def bucket_resolutions(resolution: int, min_size: int, max_size: int, step: int) -> List[Size]:
    """kohya's fixed bucket table for a resolution x resolution area (sorted)."""
    area = resolution * resolution
    side = int(math.sqrt(area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def _round_to_step(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def cover(width: int, height: int, size: Size) -> Size:
    """(width, height) scaled, aspect kept, to the smallest size that covers `size`."""
    if width / height > size[0] / size[1]:        # wider than the bucket: match the height
        scale = size[1] / height
    else:
        scale = size[0] / width
    return max(size[0], int(width * scale + 0.5)), max(size[1], int(height * scale + 0.5))


def select_bucket(width: int, height: int, c, table: Sequence[Size]) -> Tuple[Frame, float]:
    """(frame, aspect-ratio error) of one image."""
    aspect = width / height
    step = c.bucket_reso_steps
    if not c.bucket_no_upscale:
        if (width, height) in table:
            size = (width, height)
        else:
            errors = np.abs(np.array([w / h for w, h in table]) - aspect)
            size = table[int(errors.argmin())]
        resized = cover(width, height, size)
    else:
        area = c.resolution * c.resolution
        if width * height > area:   # scale down to the area; round the side whose rounding keeps the aspect best
            rw = math.sqrt(area * aspect)
            rh = area / rw
            bw = _round_to_step(rw, step)
            bh_w = _round_to_step(bw / aspect, step)
            bh = _round_to_step(rh, step)
            bw_h = _round_to_step(bh * aspect, step)
            if bh_w and bh and abs(bw / bh_w - aspect) < abs(bw_h / bh - aspect):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        size = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(size) < step:
            raise DataError(f"a {width}x{height} image is too small for buckets of step {step}")
    return Frame(resized, size), size[0] / size[1] - aspect


@dataclass
class Buckets:
    sizes: List[Size]            # the buckets in use, sorted
    frames: List[Frame]          # per training record
    of_item: List[int]           # per training record: index into `sizes`
    ar_errors: List[float]
    fixed_table: List[Size]      # kohya's table ([] with bucket_no_upscale)
    config: object

    def frame_of(self, size: Size) -> Frame:
        """The frame of any image (a held-out one too) under these settings."""
        return select_bucket(size[0], size[1], self.config, self.fixed_table)[0]

    def items(self, bucket: int) -> List[int]:
        return [i for i, b in enumerate(self.of_item) if b == bucket]

    def info(self) -> Dict:
        """kohya's ss_bucket_info."""
        return {"buckets": {i: {"resolution": list(s), "count": len(self.items(i))} for i, s in enumerate(self.sizes)},
                "mean_img_ar_error": float(np.mean(np.abs(self.ar_errors))) if self.ar_errors else 0.0}

    def table(self, names: Sequence[str]) -> List[str]:
        """The dry run's bucket table: size, aspect ratio, image count, the images."""
        lines = []
        for i, (w, h) in enumerate(self.sizes):
            members = self.items(i)
            shown = ", ".join(names[j] for j in members[:6]) + (" ..." if len(members) > 6 else "")
            lines.append(f"  {w:>5} x {h:<5} aspect {w / h:5.2f}  {len(members):>4} image(s): {shown}")
        return lines


def make_buckets(sizes: Sequence[Size], c) -> Buckets:
    """Assign each image (by its (width, height)) to a bucket."""
    table = [] if c.bucket_no_upscale else bucket_resolutions(c.resolution, c.min_bucket_reso, c.max_bucket_reso,
                                                              c.bucket_reso_steps)
    picked = [select_bucket(w, h, c, table) for w, h in sizes]
    used = sorted({f.size for f, _ in picked})
    index = {s: i for i, s in enumerate(used)}
    return Buckets(sizes=used, frames=[f for f, _ in picked], of_item=[index[f.size] for f, _ in picked],
                   ar_errors=[e for _, e in picked], fixed_table=table, config=c)


class BucketOrder:
    """Global sample index -> (pass, item), batches of `batch_size` within one bucket (see the docstring)."""

    def __init__(self, buckets: Buckets, batch_size: int, seed: int, stream: int = STREAM_ORDER):
        self.members = [buckets.items(b) for b in range(len(buckets.sizes))]
        self.batch, self.seed, self.stream = batch_size, seed, stream
        self.pass_length = sum(-(-len(m) // batch_size) for m in self.members) * batch_size
        self._pass, self._items = -1, None

    def pass_items(self, pass_index: int) -> List[int]:
        if pass_index != self._pass:
            batches = []
            for b, members in enumerate(self.members):
                rng = np.random.default_rng([int(self.seed), int(self.stream), int(pass_index), b + 1])
                perm = [members[k] for k in rng.permutation(len(members))]
                n = -(-len(perm) // self.batch) * self.batch
                filled = [perm[k % len(perm)] for k in range(n)]
                batches += [filled[k:k + self.batch] for k in range(0, n, self.batch)]
            rng = np.random.default_rng([int(self.seed), int(self.stream), int(pass_index), 0])
            self._items = [item for k in rng.permutation(len(batches)) for item in batches[k]]
            self._pass = pass_index
        return self._items

    def __call__(self, index: int) -> Tuple[int, int]:
        p, pos = divmod(int(index), self.pass_length)
        return p, int(self.pass_items(p)[pos])
