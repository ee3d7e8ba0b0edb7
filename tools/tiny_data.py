"""A procedural image-caption data set: one flat-coloured shape on a flat background, 64x64.

Used to pretrain the built-in tiny model (`python -m tools.pretrain_tiny`) and, in tests, to check what it
draws. Captions read "a red circle on a blue background". Everything is drawn from a numpy
`Generator`, so a seed fixes the data set exactly.

The shape is always near the centre (the centre 16x16 pixels lie inside every shape) and never
reaches the four 10x10 corner patches, which therefore show the background. `region_colours`
names the colour of those two regions, which is the pixel check the tests use.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64

# Well separated RGB colours, so a nearest-colour check is unambiguous.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: List[str] = ["circle", "square", "triangle"]

CENTRE = slice(24, 40)   # rows/cols of the centre patch, inside every shape
CORNER = 10              # side of each corner patch, outside every shape


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def render(colour: str, shape: str, background: str, cx: float = 32.0, cy: float = 32.0,
           radius: float = 20.0) -> np.ndarray:
    """Draw one image -> (64, 64, 3) uint8. `radius` is the half-width of the shape."""
    return draw_shape(shape, COLOURS[background], fill=COLOURS[colour], cx=cx, cy=cy, radius=radius)


def sample_item(rng: np.random.Generator) -> Tuple[np.ndarray, str, dict]:
    """One random (image, caption, meta) triple; foreground and background colours differ."""
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = colour
    while background == colour:
        background = names[rng.integers(len(names))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    cx, cy = 32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3)
    radius = rng.uniform(16, 20)
    meta = {"colour": colour, "shape": shape, "background": background}
    return render(colour, shape, background, cx, cy, radius), caption(colour, shape, background), meta


def make_dataset(n: int, seed: int = 0) -> Tuple[np.ndarray, List[str], List[dict]]:
    """`n` items from seed -> images (n, 64, 64, 3) uint8, captions, metas."""
    rng = np.random.default_rng(seed)
    items = [sample_item(rng) for _ in range(n)]
    return np.stack([it[0] for it in items]), [it[1] for it in items], [it[2] for it in items]


def nearest_colour(rgb) -> str:
    """Name of the palette colour closest (Euclidean, RGB) to `rgb`."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(np.sum((rgb - np.asarray(COLOURS[name])) ** 2)))


def region_colours(image) -> Tuple[str, str]:
    """(centre colour, corner colour) of a 64x64 RGB image (uint8 array or PIL image).

    Each is the nearest palette colour to the mean pixel of its region."""
    a = np.asarray(image, dtype=np.float64)[..., :3]
    if a.shape[:2] != (SIZE, SIZE):
        raise ValueError(f"expected a {SIZE}x{SIZE} image, got {a.shape[:2]}")
    centre = a[CENTRE, CENTRE].reshape(-1, 3).mean(0)
    c = CORNER
    corners = np.concatenate([a[:c, :c], a[:c, -c:], a[-c:, :c], a[-c:, -c:]]).reshape(-1, 3).mean(0)
    return nearest_colour(centre), nearest_colour(corners)


def matches(image, colour: str, background: str) -> bool:
    """The pixel check: the centre shows `colour` and the corners show `background`."""
    return region_colours(image) == (colour, background)


def draw_shape(shape: str, background, fill=None, outline=None, width: int = 0, stripes=None, cx: float = 32.0,
               cy: float = 32.0, radius: float = 20.0, size: int = SIZE) -> np.ndarray:
    """One shape in any RGB colours -> (size, size, 3) uint8: filled with `fill` and/or outlined `width` pixels
    wide in `outline`, on a flat `background` or one with horizontal `stripes` = (colour, band height).
    `radius` is the half-width of the shape; the triangle's centroid sits below (cx, cy), apex up."""
    image = Image.new("RGB", (size, size), tuple(background))
    draw = ImageDraw.Draw(image)
    if stripes is not None:
        colour, band = stripes
        for y in range(0, size, 2 * band):
            draw.rectangle([0, y, size - 1, y + band - 1], fill=tuple(colour))
    kw = dict(fill=None if fill is None else tuple(fill), outline=None if outline is None else tuple(outline),
              width=width)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], **kw)
    elif shape == "square":
        r = radius * 0.85
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], **kw)
    elif shape == "triangle":
        top, base = cy - radius * 1.05, cy + radius * 0.75
        draw.polygon([(cx, top), (cx - radius * 1.1, base), (cx + radius * 1.1, base)], **kw)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(image, dtype=np.uint8)


def make_colour_dataset(n: int, seed: int = 0) -> np.ndarray:
    """`n` uncaptioned images in arbitrary colours (uniform RGB), half of them outlines, a third on stripes:
    (n, 64, 64, 3) uint8. Teaches the VAE's decoder colours and looks beyond the six of the captioned set."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        fill, background, stripe = (rng.integers(0, 256, size=3) for _ in range(3))
        shape = SHAPES[rng.integers(len(SHAPES))]
        outline = int(rng.integers(2, 7)) if rng.random() < 0.5 else 0
        stripes = (stripe, int(rng.integers(3, 10))) if rng.random() < 1 / 3 else None
        cx, cy = 32 + rng.uniform(-6, 6), 32 + rng.uniform(-6, 6)
        colours = dict(outline=fill, width=outline) if outline else dict(fill=fill)
        out.append(draw_shape(shape, background, stripes=stripes, cx=cx, cy=cy, radius=rng.uniform(12, 24), **colours))
    return np.stack(out)
