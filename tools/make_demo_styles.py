"""Draw the bundled demo styles (`styles/`): 3 tiny styles, 3 images each, in the competition layout.

    python -m tools.make_demo_styles [--out styles] [--size 128]

Each style folder gets `images/<object>.png`, `prompt.json` (objects to generate) and `tag.json`
(style tags and per-image tags). Drawing is procedural and deterministic, so the files are
reproducible byte for byte.
"""
from __future__ import annotations

import argparse
import io
import json
import os

from PIL import Image

from tools.tiny_data import draw_shape

# Three looks the built-in tiny model (flat primary-coloured shapes on flat backgrounds, 64x64) has never
# seen, each in a palette of its own, so a LoRA's effect shows in the pictures and in the hist score.
# Every channel value is the centre of one of hist's 16-level RGB bins (8 mod 16) and every colour sits
# well inside its HSV bin, so a few levels of error from the tiny VAE do not move a colour to another bin.
STYLES = {
    "00": {"tags": "purple_ink, outline, night_background",
           "background": (56, 40, 104), "ink": (200, 104, 248), "fill": None, "stripes": None},
    "01": {"tags": "pastel, flat_colors, cream_background",
           "background": (248, 216, 184), "ink": (152, 88, 72), "fill": (248, 152, 184), "stripes": None},
    "02": {"tags": "stripes, green, two_tone",
           "background": (40, 88, 56), "ink": None, "fill": (168, 232, 104), "stripes": (88, 152, 72)},
}
# Every style draws the three shapes, named as the base model knows them; the values are the item tags.
OBJECTS = [("circle", "round"), ("square", "box"), ("triangle", "peak")]
# What to generate in each style: the same shapes (prompts the built-in model understands).
PROMPTS = [name for name, _ in OBJECTS]


def draw(style: dict, shape: str, size: int) -> Image.Image:
    """One style image: `shape` centred, radius 0.3 * size, in the style's fill / outline / stripes."""
    stripes = (style["stripes"], size // 8) if style["stripes"] else None
    width = max(1, round(0.06 * size)) if style["ink"] else 0
    return Image.fromarray(draw_shape(shape, style["background"], fill=style["fill"], outline=style["ink"],
                                      width=width, stripes=stripes, cx=size / 2, cy=size / 2, radius=0.3 * size,
                                      size=size))


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
        for obj, tags in OBJECTS:
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
