"""Small datasets and configs for the trainer tests (no model weights; tiny random models)."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from jdiffusion_lora.train.config import build_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_STYLES = os.path.join(REPO, "styles")

# The seed's B_dataset/00 (tags as in the seed's tag.json; images replaced by random ones).
SEED_STYLE_00 = {"style": "purple, lineart, dark_background",
                 "item": {"apple": "apple, fruit", "ball": "ball, round", "glasses": "glasses, equipment"}}


def random_image(path: str, size=(48, 48), seed: int = 0, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def make_competition_style(root: str, name: str, stems, tags=None, prompts=("Cat", "Dog"), size=(48, 48),
                           seed: int = 0) -> str:
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i, stem in enumerate(stems):
        random_image(os.path.join(folder, "images", f"{stem}.png"), size, seed + i)
    if prompts is not None:
        with open(os.path.join(folder, "prompt.json"), "w") as f:
            json.dump({str(i): p for i, p in enumerate(prompts)}, f)
    if tags is not None:
        with open(os.path.join(folder, "tag.json"), "w") as f:
            json.dump(tags, f)
    return folder


def config(tmp_path, **overrides):
    """A fast config: demo style 00, 32x32, attention LoRA, no progress bar / TensorBoard."""
    base = dict(output_dir=str(tmp_path / "run"), data_root=DEMO_STYLES, styles=["00"], resolution=32,
                max_train_steps=4, learning_rate=1e-3, progress_bar=False, tensorboard=False,
                cache_latents="memory", seed=7)
    base.update(overrides)
    return build_config(None, base)


def tiny_pipeline():
    from jdiffusion_lora.tiny import build_tiny_pipeline
    return build_tiny_pipeline()
