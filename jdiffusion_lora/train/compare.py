"""Before / after: what a trained style LoRA changes, in pictures and in the local hist score.

For every trained style and each of its prompts (`prompt.json`), three images from each of
`before_after_seeds` seeds:

    base        the base model alone, prompt with the trigger  (the "before")
    no trigger  base + LoRA, the same prompt without the trigger
    LoRA        base + LoRA, prompt with the trigger            (the "after")

The prompt with the trigger is the one the trainer samples with: "<trigger>,<style tags>,<object>".
Each image is scored with hist (colour-histogram similarity, `metrics/hist.py`) against the style's
reference images; a prompt's score in a column is the mean over its seeds. One image per prompt is a noisy
measure (on the demo, training that differed only in float rounding moved the single-seed gain from +0.33 to
+0.12), so the default is several seeds. Writes `before_after.png` (one row per style, prompt and seed: a
reference image, then the three columns, scores under each) and `before_after.json` into the run's output folder.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from ..metrics.hist import hist_scores
from ..weights import atomic_write_bytes
from .config import TrainConfig
from .data import discover, load_rgb
from ..image_files import save_png
from .logging import image_grid

COLUMNS = ("base", "no trigger", "LoRA")
ADAPTER = "before_after"
BATCH = 8   # images per pipeline call


def style_prompts(style, limit: int = 0) -> List[tuple]:
    """(object, prompt with trigger, prompt without trigger) for each of a style's prompts."""
    objects = list(style.prompts.values()) or [rec.stem for rec in style.images]
    if limit:
        objects = objects[:limit]
    join = lambda parts: ",".join(p for p in parts if p)  # noqa: E731
    return [(obj, join([style.trigger, *style.style_tags, obj]), join([*style.style_tags, obj])) for obj in objects]


def before_after(c: TrainConfig, lora: str, pipe=None, limit: int = 0,
                 printer: Callable[[str], None] = print) -> Dict:
    """Generate and score the three columns for every style of `c`; returns the result dict
    (also written to `<output_dir>/before_after.json`). `pipe`: the base pipeline (loaded from
    `c.base_model` when None); the LoRA is attached for the second pass and removed again."""
    from ..pipelines import load_pipeline

    data = discover(c)
    pipe = pipe or load_pipeline(c.base_model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [(style, obj, with_t, without_t) for style in data.styles
               for obj, with_t, without_t in style_prompts(style, limit)]
    n_seeds = c.before_after_seeds
    jobs = [p for p in prompts for _ in range(n_seeds)]       # image i: prompt i // n_seeds, its (i % n_seeds)-th seed
    seeds = [c.sample_seed + i for i in range(len(jobs))]

    def generate(texts: List[str]) -> list:
        return [image for at in range(0, len(texts), BATCH)
                for image in pipe(texts[at:at + BATCH], num_inference_steps=c.sample_steps,
                                  guidance_scale=c.sample_guidance, seed=seeds[at:at + BATCH],
                                  height=c.resolution, width=c.resolution).images]

    printer(f"before/after: {len(prompts)} prompt(s) x {n_seeds} seed(s) x {len(COLUMNS)} columns, "
            f"{c.sample_steps} steps each")
    images = {"base": generate([j[2] for j in jobs])}
    pipe.load_lora_weights(lora, adapter_name=ADAPTER)
    try:
        images["no trigger"] = generate([j[3] for j in jobs])
        images["LoRA"] = generate([j[2] for j in jobs])
    finally:
        if ADAPTER in pipe._all_adapters():   # a file of Textual Inversion embeddings only adds no adapter
            pipe.delete_adapters(ADAPTER)

    references = {style.name: [load_rgb(rec.path) for rec in style.images] for style in data.styles}
    scores = {col: np.zeros(len(jobs)) for col in COLUMNS}                  # one per image
    for style in data.styles:
        idx = [i for i, j in enumerate(jobs) if j[0] is style]
        for col in COLUMNS:
            scores[col][idx] = hist_scores([images[col][i] for i in idx], references[style.name])
    per_prompt = {col: scores[col].reshape(len(prompts), n_seeds) for col in COLUMNS}

    rows = [{"style": p[0].name, "object": p[1], "prompt": p[2], "prompt_without_trigger": p[3],
             "seeds": seeds[k * n_seeds:(k + 1) * n_seeds],
             **{col: round(float(per_prompt[col][k].mean()), 4) for col in COLUMNS},
             "per_seed": {col: [round(float(v), 4) for v in per_prompt[col][k]] for col in COLUMNS}}
            for k, p in enumerate(prompts)]
    result = {"metric": "hist", "lora": lora, "steps": c.sample_steps, "guidance": c.sample_guidance,
              "seeds_per_prompt": n_seeds, "rows": rows,
              "mean": {col: round(float(scores[col].mean()), 4) for col in COLUMNS}}

    tiles, labels = [], []
    for i, (style, obj, _, _) in enumerate(jobs):
        refs = references[style.name]
        tiles.append(refs[i % len(refs)].resize(images["base"][i].size))
        labels.append(f"style {style.name}: {obj}, seed {seeds[i]}")
        for col in COLUMNS:
            tiles.append(images[col][i])
            labels.append(f"{col} hist {scores[col][i]:+.2f}")
    result["png"] = os.path.join(c.output_dir, "before_after.png")
    result["json"] = os.path.join(c.output_dir, "before_after.json")
    save_png(image_grid(tiles, labels, columns=1 + len(COLUMNS),
                        title="reference | base model | LoRA without trigger | LoRA with trigger  (hist)"),
             result["png"])
    atomic_write_bytes(result["json"], [json.dumps(result, indent=1).encode()])
    return result


def format_table(result: Dict) -> str:
    """The before/after table as text: one line per style and prompt, then the means."""
    head = f"{'style':<6} {'prompt':<12}" + "".join(f"{col:>12}" for col in COLUMNS)
    n = result.get("seeds_per_prompt", 1)
    lines = [f"hist similarity to the style's references (higher = closer; {result['steps']} steps; "
             f"mean of {n} seed(s) per prompt)", head,
             "-" * len(head)]
    for row in result["rows"]:
        lines.append(f"{row['style']:<6} {row['object'][:12]:<12}" + "".join(f"{row[col]:>12.3f}" for col in COLUMNS))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<19}" + "".join(f"{result['mean'][col]:>12.3f}" for col in COLUMNS))
    gain = result["mean"]["LoRA"] - result["mean"]["base"]
    lines.append(f"LoRA with trigger vs base model: {gain:+.3f}")
    return "\n".join(lines)


def run_before_after(c: TrainConfig, lora_files: List[str], printer: Callable[[str], None] = print
                     ) -> Optional[Dict]:
    """The train command's end-of-run report (config `before_after`): table printed, PNG path shown."""
    lora = next((p for p in lora_files if p.endswith(".safetensors")), None)
    if lora is None:
        printer("before/after skipped: no .safetensors LoRA file was written")
        return None
    result = before_after(c, lora, printer=printer, limit=c.before_after_prompts)
    printer(format_table(result))
    printer(f"side by side: {result['png']}")
    return result
