"""Draw the bundled demo styles (`styles/`): 3 tiny styles, 3 images each, in the competition layout.

    python tools/make_demo_styles.py [--out styles] [--size 128]

Each style folder gets `images/<object>.png`, `prompt.json` (objects to generate) and `tag.json`
(style tags and per-image tags). Drawing is procedural and deterministic, so the files are
reproducible byte for byte.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os

from PIL import Image, ImageDraw

STYLES = {
    "00": {"tags": "purple, lineart, dark_background",
           "background": (18, 12, 28), "ink": (186, 110, 255), "fill": None, "pixel": 1},
    "01": {"tags": "pastel, flat_colors, cream_background",
           "background": (250, 240, 220), "ink": (120, 90, 80), "fill": (255, 170, 180), "pixel": 1},
    "02": {"tags": "pixel_art, green, checkerboard",
           "background": (30, 60, 30), "ink": (10, 20, 10), "fill": (120, 220, 90), "pixel": 8},
}
OBJECTS = {
    "00": [("ball", "circle, round"), ("mountain", "triangle, peak"), ("box", "square, container")],
    "01": [("star", "star, five_points"), ("house", "building, roof"), ("moon", "crescent, night")],
    "02": [("tree", "plant, trunk"), ("fish", "animal, water"), ("key", "metal, tool")],
}
PROMPTS = ["Cat", "Boat", "Cup", "Flower", "Bird"]


def shape_points(name: str, s: float):
    c = s / 2
    if name in ("ball", "moon"):
        return ("ellipse", [c - 0.32 * s, c - 0.32 * s, c + 0.32 * s, c + 0.32 * s])
    if name == "mountain":
        return ("polygon", [(0.12 * s, 0.82 * s), (0.5 * s, 0.16 * s), (0.88 * s, 0.82 * s)])
    if name == "box":
        return ("polygon", [(0.2 * s, 0.2 * s), (0.8 * s, 0.2 * s), (0.8 * s, 0.8 * s), (0.2 * s, 0.8 * s)])
    if name == "star":
        pts = []
        for k in range(10):
            r = (0.38 if k % 2 == 0 else 0.16) * s
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + r * math.cos(a), c + r * math.sin(a)))
        return ("polygon", pts)
    if name == "house":
        return ("polygon", [(0.2 * s, 0.85 * s), (0.2 * s, 0.45 * s), (0.5 * s, 0.15 * s), (0.8 * s, 0.45 * s),
                            (0.8 * s, 0.85 * s)])
    if name == "tree":
        return ("polygon", [(0.5 * s, 0.1 * s), (0.8 * s, 0.65 * s), (0.56 * s, 0.65 * s), (0.56 * s, 0.9 * s),
                            (0.44 * s, 0.9 * s), (0.44 * s, 0.65 * s), (0.2 * s, 0.65 * s)])
    if name == "fish":
        return ("polygon", [(0.15 * s, 0.5 * s), (0.45 * s, 0.3 * s), (0.7 * s, 0.45 * s), (0.88 * s, 0.3 * s),
                            (0.88 * s, 0.7 * s), (0.7 * s, 0.55 * s), (0.45 * s, 0.7 * s)])
    if name == "key":
        return ("polygon", [(0.15 * s, 0.4 * s), (0.35 * s, 0.4 * s), (0.35 * s, 0.46 * s), (0.85 * s, 0.46 * s),
                            (0.85 * s, 0.62 * s), (0.75 * s, 0.62 * s), (0.75 * s, 0.54 * s), (0.35 * s, 0.54 * s),
                            (0.35 * s, 0.6 * s), (0.15 * s, 0.6 * s)])
    raise KeyError(name)


def draw(style: dict, obj: str, size: int) -> Image.Image:
    px = style["pixel"]
    small = max(8, size // px)
    img = Image.new("RGB", (small, small), style["background"])
    d = ImageDraw.Draw(img)
    if px > 1:  # checkerboard background
        for y in range(0, small, 2):
            for x in range((y // 2) % 2 * 2, small, 4):
                d.rectangle([x, y, x + 1, y + 1], fill=tuple(min(255, v + 25) for v in style["background"]))
    kind, geom = shape_points(obj, small)
    width = max(1, small // 40)
    if obj == "moon":
        d.ellipse(geom, fill=style["fill"], outline=style["ink"], width=width)
        x0, y0, x1, y1 = geom
        off = 0.22 * small
        d.ellipse([x0 + off, y0 - off / 2, x1 + off, y1 - off / 2], fill=style["background"])
    elif kind == "ellipse":
        d.ellipse(geom, fill=style["fill"], outline=style["ink"], width=width * (2 if style["fill"] is None else 1))
    else:
        if style["fill"] is not None:
            d.polygon(geom, fill=style["fill"])
        d.line(list(geom) + [geom[0]], fill=style["ink"], width=width * (2 if style["fill"] is None else 1))
    if style["fill"] is None:  # lineart: a few hatching strokes
        for k in range(3):
            y = small * (0.88 + 0.03 * k)
            d.line([(small * 0.2, y), (small * 0.8, y)], fill=style["ink"], width=1)
    return img.resize((size, size), Image.NEAREST) if px > 1 else img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "styles"))
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    for sid, style in STYLES.items():
        folder = os.path.join(args.out, sid)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        items = {}
        for obj, tags in OBJECTS[sid]:
            with open(os.path.join(folder, "images", f"{obj}.png"), "wb") as f:
                f.write(png(draw(style, obj, args.size)))
            items[obj] = tags
        with open(os.path.join(folder, "prompt.json"), "w") as f:
            json.dump({str(i): p for i, p in enumerate(PROMPTS)}, f, indent=4)
            f.write("\n")
        with open(os.path.join(folder, "tag.json"), "w") as f:
            json.dump({"style": style["tags"], "item": items}, f, indent=4)
            f.write("\n")
    print(f"wrote {len(STYLES)} demo styles to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
