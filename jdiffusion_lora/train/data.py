"""Training data: find the styles and images, check them, load and augment one image.

Layouts (`data_root`):

    competition   <root>/<NN>/images/*.png, <root>/<NN>/prompt.json, optional <root>/<NN>/tag.json
                  ({"style": "a, b", "item": {"<stem>": "c, d"}}) and optional <root>/llm_prompt.json
    plain folder  <root>/<name>/*.png with optional <image>.txt captions (or <root>/*.png: one style)

Each folder is one style; `styles` picks the pack (default: all). The trigger token of a style is
`trigger_template.format(style=<folder name>)`, e.g. `style_00`.

Bad input policy (documented in the README of the trainer):
- unreadable, zero-byte or truncated image files: `bad_image_policy = "skip"` (default) warns and
  leaves the file out; "error" refuses to start. Either way the message names the file.
- grayscale, palette, CMYK, 16-bit and RGBA images are converted to 8-bit RGB (alpha composited on
  `alpha_background`).
- images smaller than `resolution` on their short side: `small_image_policy = "upscale"` (default,
  with a warning), "skip" or "error".
- a style folder left without usable images, a pack naming a style that is not there, a corrupt
  prompt.json / tag.json: the run refuses to start. A missing prompt.json only warns (training does
  not need it; generating the style's prompts does).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from ..image_files import list_images



class DataError(ValueError):
    """The training data cannot be used as given; the message names the file or folder."""


@dataclass
class ImageRecord:
    path: str
    style: str                    # style (folder) name, e.g. "00"
    stem: str                     # file name without extension; names the object
    size: Tuple[int, int]         # (width, height) as stored
    item_tags: List[str] = field(default_factory=list)
    caption: Optional[str] = None  # plain layout: the .txt caption (None: none given)


@dataclass
class Style:
    name: str
    folder: str
    layout: str                   # competition | folder
    trigger: str
    style_tags: List[str] = field(default_factory=list)
    prompts: Dict[str, str] = field(default_factory=dict)
    images: List[ImageRecord] = field(default_factory=list)


@dataclass
class TrainingData:
    styles: List[Style]
    records: List[ImageRecord]    # training images of every style, in a fixed order
    validation: List[ImageRecord]
    warnings: List[str]

    def style(self, name: str) -> Style:
        return next(s for s in self.styles if s.name == name)


# ---------------------------------------------------------------------------- discovery

def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from None


def _style_folders(root: str) -> Dict[str, Tuple[str, str]]:
    """name -> (folder, layout) for every style folder under `root` (or `root` itself)."""
    if not os.path.isdir(root):
        raise DataError(f"data_root not found: {root}")
    if os.path.isdir(os.path.join(root, "images")):
        return {os.path.basename(os.path.abspath(root)): (root, "competition")}
    if list_images(root):
        return {os.path.basename(os.path.abspath(root)): (root, "folder")}
    found = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        if os.path.isdir(os.path.join(folder, "images")):
            found[name] = (folder, "competition")
        elif list_images(folder) or os.path.isfile(os.path.join(folder, "prompt.json")):
            found[name] = (folder, "folder")
    return found


def check_image(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height), None) for a usable image file, (None, reason) otherwise."""
    try:
        if os.path.getsize(path) == 0:
            return None, "the file is empty (0 bytes)"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable; reopen and decode it all
            im.load()
            size = ImageOps.exif_transpose(im).size
        return size, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"cannot be read as an image ({type(e).__name__}: {e})"


def discover(c) -> TrainingData:
    """Resolve `c.data_root` / `c.styles` into checked image records (see the module docstring)."""
    folders = _style_folders(c.data_root)
    if not folders:
        raise DataError(f"no style folders under {c.data_root} (expected <root>/<NN>/images/*.png "
                        f"or folders of images)")
    names = list(c.styles) or list(folders)
    missing = [n for n in names if n not in folders]
    if missing:
        raise DataError(f"the pack names style(s) {', '.join(missing)} that do not exist under {c.data_root} "
                        f"(found: {', '.join(folders) or 'none'})")
    if len(set(names)) != len(names):
        raise DataError(f"the pack names a style twice: {names}")
    notes: List[str] = []
    llm = {}
    llm_path = os.path.join(c.data_root, "llm_prompt.json")
    if os.path.isfile(llm_path):
        llm = {k.lower(): v for k, v in _read_json(llm_path, "llm_prompt.json").items()}
    styles = [_load_style(name, *folders[name], c, llm, notes) for name in names]

    held_out = set(c.validation_images)
    records, validation = [], []
    for style in styles:
        for rec in style.images:
            key = f"{style.name}/{os.path.basename(rec.path)}"
            (validation if key in held_out else records).append(rec)
    unknown = held_out - {f"{r.style}/{os.path.basename(r.path)}" for r in records + validation}
    if unknown:
        raise DataError(f"validation_images not found among the training images: {sorted(unknown)}")
    for style in styles:
        if not any(r.style == style.name for r in records):
            raise DataError(f"style {style.name} has no training image left after holding out validation images")
    # The notes are returned, not warned: the trainer and the dry run print each one once.
    return TrainingData(styles=styles, records=records, validation=validation, warnings=notes)


def _load_style(name: str, folder: str, layout: str, c, llm: dict, notes: List[str]) -> Style:
    trigger = c.trigger_template.format(style=name) if c.trigger_template else ""
    style = Style(name=name, folder=folder, layout=layout, trigger=trigger)
    image_folder = os.path.join(folder, "images") if layout == "competition" else folder

    prompt_path = os.path.join(folder, "prompt.json")
    if os.path.isfile(prompt_path):
        prompts = _read_json(prompt_path, "prompt.json")
        if not isinstance(prompts, dict):
            raise DataError(f"{prompt_path}: expected an object {{\"0\": \"Ring\", ...}}")
        style.prompts = {str(k): str(v) for k, v in prompts.items()}
    elif layout == "competition":
        notes.append(f"{prompt_path} is missing: training goes on, but generating style {name} needs it")

    item_tags: Dict[str, str] = {}
    tag_path = os.path.join(folder, "tag.json")
    if os.path.isfile(tag_path):
        tags = _read_json(tag_path, "tag.json")
        if not isinstance(tags, dict):
            raise DataError(f"{tag_path}: expected an object with 'style' and 'item'")
        style.style_tags = _split(tags.get("style", "")) if c.use_style_tags else []
        item_tags = tags.get("item", {}) or {}
        if not isinstance(item_tags, dict):
            raise DataError(f"{tag_path}: 'item' must map image stems to tags")

    paths = list_images(image_folder)
    if not paths:
        raise DataError(f"style {name} has no images in {image_folder}")
    for path in paths:
        size, problem = check_image(path)
        if problem:
            message = f"{path}: {problem}"
            if c.bad_image_policy == "error":
                raise DataError(message + " (bad_image_policy = 'error')")
            notes.append(message + "; skipped")
            continue
        small = (size[0] * size[1] < c.resolution ** 2 and not c.bucket_no_upscale) if c.enable_bucket \
            else min(size) < c.resolution
        if small:
            message = f"{path}: {size[0]}x{size[1]} is smaller than the training resolution {c.resolution}" + \
                (" (area, with buckets)" if c.enable_bucket else "")
            if c.small_image_policy == "error":
                raise DataError(message + " (small_image_policy = 'error')")
            if c.small_image_policy == "skip":
                notes.append(message + "; skipped")
                continue
            notes.append(message + "; upscaled")
        stem = os.path.splitext(os.path.basename(path))[0]
        rec = ImageRecord(path=path, style=name, stem=stem, size=size)
        if layout == "competition":
            tags = _split(item_tags.get(stem, "")) if c.use_item_tags else []
            if c.use_llm_hypernyms:
                tags += [h for h in (llm.get(stem.lower(), {}) or {}).get("hypernyms", []) if h not in tags]
            rec.item_tags = tags
        else:
            txt = os.path.splitext(path)[0] + c.caption_extension
            if os.path.isfile(txt):
                with open(txt, encoding="utf-8") as f:
                    rec.caption = f.read().strip()
        style.images.append(rec)
    if not style.images:
        raise DataError(f"style {name} has no usable images in {image_folder} (all were skipped, see above)")
    return style


def _split(text) -> List[str]:
    from .captions import split_tags
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    return split_tags(str(text))


# ---------------------------------------------------------------------------- loading one image

def load_rgb(path: str, background: str = "white") -> Image.Image:
    """Any PIL-readable image -> 8-bit RGB (EXIF rotation applied, 16-bit scaled, alpha composited)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        fill = (255, 255, 255, 255) if background == "white" else (0, 0, 0, 255)
        canvas = Image.new("RGBA", im.size, fill)
        canvas.alpha_composite(im.convert("RGBA"))
        im = canvas
    return im.convert("RGB") if im.mode != "RGB" else im


def resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """(width, height) after scaling the short side to `size`."""
    if min(width, height) == size:
        return width, height
    if width <= height:
        return size, max(size, int(size * height / width))
    return max(size, int(size * width / height)), size


def crop_box(width: int, height: int, size, mode: str, rng: np.random.Generator) -> Tuple[int, int]:
    """(left, top) of a crop of `size` (an int: square, or (W, H): a bucket) from a (width, height) image.

    "random" draws two integers from `rng`; "center" draws them too (and ignores them) so that
    the other draws of a sample do not depend on the crop mode.
    """
    sw, sh = (size, size) if isinstance(size, int) else size
    rx = int(rng.integers(0, width - sw + 1))
    ry = int(rng.integers(0, height - sh + 1))
    if mode == "center":
        return int(round((width - sw) / 2.0)), int(round((height - sh) / 2.0))
    return rx, ry


def pixels(im: Image.Image, size, box: Tuple[int, int], flip: bool, resized=None) -> np.ndarray:
    """RGB image -> resized, cropped at `box`, maybe flipped: (3, H, W) float32 in [-1, 1].

    size: an int (resize the short side to it, square crop) or (W, H) with `resized` = (w, h), the size
    to resize to before the crop (a bucket, see buckets.py)."""
    if isinstance(size, int):
        sw, sh = size, size
        w, h = resized_size(im.size[0], im.size[1], size)
    else:
        (sw, sh), (w, h) = size, resized
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BILINEAR)   # antialiased, like torchvision's Resize on PIL images
    left, top = box
    arr = np.asarray(im, dtype=np.float32)[top:top + sh, left:left + sw]   # (H, W, 3)
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1))


# ---------------------------------------------------------------------------- order and randomness

# Purposes of the per-sample random streams (part of the Generator's seed).
STREAM_ORDER, STREAM_DATA, STREAM_NOISE, STREAM_VAE, STREAM_CLASS, STREAM_VALIDATION = range(6)


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream of one training sample: a function of (seed, sample index, purpose) only.

    So a sample's crop, flip, caption, noise and timestep do not depend on the batch it lands in,
    on gradient accumulation, or on whether the run was resumed.
    """
    return np.random.default_rng([int(seed), int(index), int(stream)])


class SampleOrder:
    """Sampling without replacement: pass p visits all N items in a permutation drawn for p."""

    def __init__(self, n_items: int, seed: int, stream: int = STREAM_ORDER):
        if n_items < 1:
            raise DataError("no training images")
        self.n, self.seed, self.stream = n_items, seed, stream
        self._pass, self._perm = -1, None

    def permutation(self, pass_index: int) -> np.ndarray:
        if pass_index != self._pass:
            rng = np.random.default_rng([int(self.seed), int(self.stream), int(pass_index)])
            self._pass, self._perm = pass_index, rng.permutation(self.n)
        return self._perm

    def __call__(self, index: int) -> Tuple[int, int]:
        """Global sample index -> (pass number from 0, item index)."""
        p, pos = divmod(int(index), self.n)
        return p, int(self.permutation(p)[pos])
