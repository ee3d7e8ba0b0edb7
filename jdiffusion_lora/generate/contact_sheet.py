"""Contact sheets: one PNG per style, the reference images in the first row, generated images below,
each labelled (reference: its file stem; generated: its prompt)."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..image_files import is_image_name, save_png

THUMB = 128
LABEL_H = 16
COLUMNS = 6


def _tile(path: Optional[str], label: str, thumb: int):
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (thumb, thumb + LABEL_H), (255, 255, 255))
    if path is not None:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = thumb / max(im.size)  # fit the tile: shrink big images, enlarge small ones
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.LANCZOS if scale < 1 else Image.NEAREST)
                tile.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
        except Exception:  # noqa: BLE001  (an unreadable image shows as a blank tile)
            path = None
    draw = ImageDraw.Draw(tile)
    if path is None:
        draw.line([(0, 0), (thumb, thumb)], fill=(200, 0, 0))
        draw.line([(0, thumb), (thumb, 0)], fill=(200, 0, 0))
    text = label if len(label) <= thumb // 6 else label[:thumb // 6 - 1] + "~"
    draw.text((2, thumb + 2), text, fill=(0, 0, 0))
    return tile


def contact_sheet(references: List[Tuple[str, str]], generated: List[Tuple[Optional[str], str]],
                  title: str = "", thumb: int = THUMB, columns: int = COLUMNS):
    """references/generated: [(image path or None, label)] -> a PIL image."""
    from PIL import Image, ImageDraw

    cols = max(columns, len(references), 1)
    gen_rows = (len(generated) + cols - 1) // cols
    cell_h = thumb + LABEL_H
    top = LABEL_H + 4
    sheet = Image.new("RGB", (cols * thumb, top + (1 + gen_rows) * cell_h + 4), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 2), title, fill=(0, 0, 0))
    for i, (path, label) in enumerate(references):
        sheet.paste(_tile(path, "ref: " + label, thumb), (i * thumb, top))
    y0 = top + cell_h + 4
    draw.line([(0, y0 - 2), (sheet.width, y0 - 2)], fill=(0, 0, 0))
    for i, (path, label) in enumerate(generated):
        sheet.paste(_tile(path, label, thumb), ((i % cols) * thumb, y0 + (i // cols) * cell_h))
    return sheet


def write_contact_sheets(out_dir: str, expected, sheets_dir: str, dataset_root: Optional[str] = None,
                         thumb: int = THUMB) -> List[str]:
    """One `<sheets_dir>/<NN>.png` per style; returns the paths written."""
    written = []
    for style in sorted(expected):
        refs = []
        ref_dir = os.path.join(dataset_root, style, "images") if dataset_root else None
        if ref_dir and os.path.isdir(ref_dir):
            refs = [(os.path.join(ref_dir, f), os.path.splitext(f)[0]) for f in sorted(os.listdir(ref_dir))
                    if is_image_name(f)]
        gen = []
        for prompt, stem in expected[style]:
            path = os.path.join(out_dir, style, f"{stem}.png")
            gen.append((path if os.path.isfile(path) else None, prompt))
        sheet = contact_sheet(refs, gen, title=f"style {style}: {len(refs)} reference(s), {len(gen)} prompt(s)",
                              thumb=thumb)
        written.append(save_png(sheet, os.path.join(sheets_dir, f"{style}.png")))
    return written
