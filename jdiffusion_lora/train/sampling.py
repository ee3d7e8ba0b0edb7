"""What a run shows while it trains: sample images (a labelled grid every `sample_every` steps), their
scores from the local scorer (`sample_scores`), the loss curve and the validation loss.

    path = sample_images(trainer, step)     # samples/step_000200.png, logged to TensorBoard, maybe scored
                                            # (prompts: sample_prompts.py, kohya's prompt files included)
    path = plot_loss(trainer)               # loss_curve.png (train and validation loss)
    loss = validation_loss(trainer)         # mean loss on the held-out images, noise and timesteps fixed
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Optional

from ..image_files import save_png
from .logging import image_grid, plot_curves
from .sample_prompts import sample_prompts

if TYPE_CHECKING:
    from .trainer import Trainer


def sample_images(t: "Trainer", step: int) -> str:
    """Generate one image per sample prompt (sample_prompts.py) with the current LoRA, each with its own
    size, seed, guidance, steps and negative prompt (prompts that share those are one batch); write and
    log the grid, score it."""
    c = t.c
    items = sample_prompts(c, t.data)
    settings = [(p.width or c.resolution, p.height or c.resolution, p.steps or c.sample_steps,
                 c.sample_guidance if p.guidance_scale is None else p.guidance_scale) for p in items]
    seeds = [c.sample_seed + i if p.seed is None else p.seed for i, p in enumerate(items)]
    images = [None] * len(items)
    if getattr(t, "ti", None) is not None:
        t.ti.write_back()   # the pipeline samples with the current token vectors
    with t.evaluating():
        t.pipe.set_progress_bar_config(disable=True)
        for key in dict.fromkeys(settings):
            idx = [i for i, s in enumerate(settings) if s == key]
            width, height, steps, guidance = key
            out = t.pipe([items[i].prompt for i in idx], negative_prompt=[items[i].negative_prompt for i in idx],
                         num_inference_steps=steps, guidance_scale=guidance, seed=[seeds[i] for i in idx],
                         height=height, width=width)
            for i, image in zip(idx, out.images):
                images[i] = image
    labels = [f"{p.prompt} (seed {s})" for p, s in zip(items, seeds)]
    grid = image_grid(same_cells(images), labels, columns=min(4, len(items)), title=f"step {step}")
    path = os.path.join(c.output_dir, "samples", f"step_{step:06d}.png")
    save_png(grid, path)
    t.metrics.add_image(step, "samples", grid)
    score_samples(t, step, [(p.prompt, p.style, p.object) for p in items], images)
    return path


def same_cells(images):
    """Images of different sizes centred on white cells of the largest size (for one grid)."""
    from PIL import Image
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    if all(im.size == (w, h) for im in images):
        return list(images)
    out = []
    for im in images:
        cell = Image.new("RGB", (w, h), "white")
        cell.paste(im, ((w - im.size[0]) // 2, (h - im.size[1]) // 2))
        out.append(cell)
    return out


def score_samples(t: "Trainer", step: int, items, images) -> Optional[Dict[str, float]]:
    """Score one sample round with the local scorer and log `score/<metric>`.

    Runs when `sample_scores` is set, the prompts are the default per-style ones and the data is in
    the competition layout (`<data_root>/<NN>/images`): the images are written as a one-image
    submission per style (`samples/step_N/<NN>/<object>.png`) and scored against the references.
    The scorer (its networks) is built on the first scored round and kept on the trainer.
    """
    c = t.c
    if not c.sample_scores or any(style is None for _, style, _ in items):
        return None
    if not all(os.path.isdir(os.path.join(c.data_root, style, "images")) for _, style, _ in items):
        return None
    from ..metrics.evaluate import Scorer, evaluate_folder

    folder = os.path.join(c.output_dir, "samples", f"step_{step:06d}")
    for (_, style, obj), image in zip(items, images):
        save_png(image, os.path.join(folder, style, f"{obj or 'sample'}.png"))
    if t.scorer is None:
        t.scorer = Scorer(c.score_weights or None, metrics=c.sample_scores)
    scores = evaluate_folder(folder, c.data_root, styles=sorted({s for _, s, _ in items}), scorer=t.scorer)
    values = {f"score/{k}": float(v) for k, v in scores["overall"].items() if isinstance(v, (int, float))}
    if values:
        t.metrics.log(step, values)
        t.print(f"step {step} sample scores: " + ", ".join(f"{k[6:]} {v:.4f}" for k, v in values.items()))
    return values


def plot_loss(t: "Trainer") -> str:
    """loss_curve.png: the training loss and, when there is one, the validation loss."""
    path = os.path.join(t.c.output_dir, "loss_curve.png")
    series = {"train loss": t.metrics.series("loss")}
    val = t.metrics.series("val/loss")
    if val:
        series["validation loss"] = val
    plot_curves(series, path, title="loss")
    return path


def validation_loss(t: "Trainer") -> float:
    """Mean loss on the held-out images (see `fixed_loss`)."""
    return fixed_loss(t, t.data.validation, t.c.validation_seed)


def fixed_loss(t: "Trainer", records, seed: int, repeats: int = 1) -> float:
    """Mean loss over `records` (each `repeats` times) with noise, timesteps and captions fixed by
    `seed`, centre crops, no flip, no dropout: comparable between calls."""
    from .._runtime import jt
    t.setup()
    total, n = 0.0, 0
    with t.evaluating():
        for sample in t.batches.fixed(records, seed, repeats):
            with jt.no_grad():
                loss, _ = t.loss([sample])
                total += float(loss.item())
                n += 1
    return total / max(1, n)
