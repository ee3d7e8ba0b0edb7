"""What a run shows while it trains: sample images (a labelled grid every `sample_every` steps), their
scores from the local scorer (`sample_scores`), and the loss curve.

    path = sample_images(trainer, step)     # samples/step_000200.png, logged to TensorBoard, maybe scored
    path = plot_loss(trainer)               # loss_curve.png (train and validation loss)
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..image_files import save_png
from .logging import image_grid, plot_curves

if TYPE_CHECKING:
    from .trainer import Trainer


def sample_prompts(c, data) -> List[Tuple[str, Optional[str], Optional[str]]]:
    """(prompt, style name, object) per sample image; style and object are known for the default
    prompts (one per style: trigger, style tags, its first prompt) and None for user prompts."""
    prompts = [(p, None, None) for p in c.sample_prompts]
    if c.sample_prompts_file:
        with open(c.sample_prompts_file, encoding="utf-8") as f:
            prompts += [(line.strip(), None, None) for line in f if line.strip() and not line.startswith("#")]
    if not prompts:
        for style in data.styles:
            first = next(iter(style.prompts.values()), None) or (style.images[0].stem if style.images else "")
            text = ",".join([t for t in [style.trigger, *style.style_tags, first] if t])
            prompts.append((text, style.name, first))
    return prompts


def sample_images(t: "Trainer", step: int) -> str:
    """Generate one image per sample prompt with the current LoRA; write and log the grid, score it."""
    c = t.c
    items = sample_prompts(c, t.data)
    prompts = [p for p, _, _ in items]
    if getattr(t, "ti", None) is not None:
        t.ti.write_back()   # the pipeline samples with the current token vectors
    with t.evaluating():
        t.pipe.set_progress_bar_config(disable=True)
        out = t.pipe(prompts, num_inference_steps=c.sample_steps, guidance_scale=c.sample_guidance,
                     seed=[c.sample_seed + i for i in range(len(prompts))], height=c.resolution,
                     width=c.resolution)
    labels = [f"{p} (seed {s})" for p, s in zip(prompts, out.seeds)]
    grid = image_grid(out.images, labels, columns=min(4, len(prompts)), title=f"step {step}")
    path = os.path.join(c.output_dir, "samples", f"step_{step:06d}.png")
    save_png(grid, path)
    t.metrics.add_image(step, "samples", grid)
    score_samples(t, step, items, out.images)
    return path


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
