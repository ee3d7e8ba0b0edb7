"""Which style technique helps? One fixed step budget and seed, the demo styles, the built-in model.

    python benchmarks/techniques.py                               # hist only, 300 steps, demo style 01
    python benchmarks/techniques.py --steps 600 --styles 00,01,02 --score-weights WEIGHTS --clip CLIP

Variants (each trained / generated from scratch with the same seed, prompts and sampling settings):

    LoRA                     the demo config's LoRA (configs/demo.toml) for --steps steps
    TI                       Textual Inversion alone: one new token per style (its trigger), no LoRA, no
                             caption dropout
    TI + LoRA                both in one run (separate learning rates); one file with LoRA + bundle_emb
    LoRA + img2img s         img2img from the blurred mean of the style's references at strength s (2 values)
    LoRA + colour latents    start latents drawn from the references' latent mean and spread (strength 0.9)
    LoRA + PEZ               PEZ hard prompt per style in the template (needs --clip, a CLIPModel folder)
    base                     the base model, no training (the reference row)

Prints the local score of each variant (hist always; dino, lpips, fid, clip_iqa, clip_r and the total when
--score-weights holds their weight files) and writes one picture per variant to <out>/<variant>.png.
Timings are not the point here; the machine's load average is printed for the record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TEMPLATE = "{trigger},{style_tags},{prompt}"     # the trainer's sample prompt form (train/compare.py)


def train(name: str, args, **overrides) -> dict:
    """Train one variant with the demo config; returns {"lora": file or None, "embeddings": file or None}."""
    from jdiffusion_lora.train.config import build_config
    from jdiffusion_lora.train.trainer import Trainer

    out = os.path.join(args.out, "runs", name)
    c = build_config(os.path.join(REPO, "configs", "demo.toml"), dict(
        output_dir=out, data_root=args.data, styles=args.styles.split(","), max_train_steps=args.steps,
        seed=args.seed, sample_every=0, save_every=0, save_formats=["diffusers"], progress_bar=False,
        tensorboard=False, before_after=False, overwrite=True, **overrides))
    t0 = time.time()
    result = Trainer(c, printer=lambda s: None).run()
    print(f"  trained {name}: {result.step} steps in {time.time() - t0:.0f}s, last loss {result.last_loss:.4f}")
    return {"lora": next((f for f in result.lora_files if f.endswith(".safetensors")), None)}


def generate(name: str, args, lora=None, start="noise", strength=0.8, template=TEMPLATE, pez=None) -> str:
    """Generate the styles' prompts for one variant into <out>/images/<name>; returns that folder."""
    from jdiffusion_lora.generate import GenerateSettings, LoraSpec, build_items, read_inputs, run_job
    from jdiffusion_lora.tiny import tiny_model_path

    inputs, llm = read_inputs(args.data, None, args.styles.split(","))
    items = build_items(inputs, llm, template=template, base_seed=args.seed, pez=pez)
    settings = GenerateSettings(model=tiny_model_path(), loras=[LoraSpec(lora)] if lora else [], steps=args.sample_steps,
                                guidance=args.guidance, height=args.resolution, width=args.resolution, start=start,
                                strength=strength, data_root=args.data)
    folder = os.path.join(args.out, "images", name)
    run_job(items, settings, folder, workers=1, overwrite=True, progress=False)
    return folder


def score(folder: str, args) -> dict:
    from jdiffusion_lora.metrics.evaluate import evaluate_folder

    scores = evaluate_folder(folder, args.data, weights=args.score_weights, styles=args.styles.split(","))
    return {k: v for k, v in scores["overall"].items() if isinstance(v, (int, float))}


def picture(name: str, folder: str, args, scores: dict) -> str:
    from PIL import Image

    from jdiffusion_lora.image_files import save_png
    from jdiffusion_lora.train.logging import image_grid

    tiles, labels = [], []
    for style in args.styles.split(","):
        for f in sorted(os.listdir(os.path.join(folder, style))):
            if f.endswith(".png"):
                tiles.append(Image.open(os.path.join(folder, style, f)).convert("RGB"))
                labels.append(f"{style} {f[:-4]}")
    path = os.path.join(args.out, f"{name.replace(' ', '_').replace('+', 'plus')}.png")
    save_png(image_grid(tiles, labels, columns=len(tiles), title=f"{name}: hist {scores.get('hist', float('nan')):.3f}"),
             path)
    return path


def run_pez(args) -> dict:
    from jdiffusion_lora.generate.pez import optimize_prompt
    from jdiffusion_lora.generate.start import reference_paths
    from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer
    from jdiffusion_lora.models.clip_vision import CLIPModel

    clip, tok = CLIPModel.from_pretrained(args.clip), CLIPTokenizer.from_pretrained(args.clip)
    clip.eval()
    out = {}
    for style in args.styles.split(","):
        r = optimize_prompt(clip, tok, reference_paths(args.data, style), num_tokens=8, steps=args.pez_steps,
                            seed=args.seed)
        print(f"  PEZ {style}: {r.prompt!r} (CLIP {r.start_similarity:.3f} -> {r.similarity:.3f})")
        out[style] = r.prompt
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "styles"))
    p.add_argument("--styles", default="01")
    p.add_argument("--steps", type=int, default=300, help="training steps of every trained variant")
    p.add_argument("--seed", type=int, default=123456)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--strengths", default="0.6,0.8", help="the two img2img strengths")
    p.add_argument("--score-weights", default=None, help="folder with the scorer's weight files (else hist only)")
    p.add_argument("--clip", default=None, help="CLIPModel folder for the PEZ variant (skipped without it)")
    p.add_argument("--pez-steps", type=int, default=300)
    p.add_argument("--ti-lr", type=float, default=0.05, help="Textual Inversion learning rate")
    p.add_argument("--ti-vectors", type=int, default=2, help="vectors per style token")
    p.add_argument("--ti-init", default="white", help="the word the token vectors start from (the tiny model knows "
                   "colour words; 'white' is the nearest to the demo styles' light backgrounds)")
    p.add_argument("--lora", default=None, help="reuse this LoRA file (trained with the same --steps and seed)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "techniques"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"techniques: styles {args.styles}, {args.steps} training steps, seed {args.seed}, load average "
          f"{os.getloadavg()[0]:.1f} (shared machine: timings are noisy)")

    s1, s2 = (float(s) for s in args.strengths.split(","))
    ti = dict(textual_inversion=True, ti_learning_rate=args.ti_lr, ti_num_vectors=args.ti_vectors,
              ti_init_word=args.ti_init)
    trained = {}

    def lora():
        if "lora" not in trained and args.lora:
            trained["lora"] = args.lora
        if "lora" not in trained:
            trained["lora"] = train("lora", args)["lora"]
        return trained["lora"]

    variants = {
        "base": lambda: generate("base", args),
        "LoRA": lambda: generate("LoRA", args, lora=lora()),
        # TI alone: no caption dropout (an empty caption has no trigger, so those steps would teach nothing)
        "TI": lambda: generate("TI", args, lora=train("ti", args, unet_targets=[], text_encoder_targets=[],
                                                      caption_dropout_rate=0.0, **ti)["lora"]),
        "TI + LoRA": lambda: generate("TI + LoRA", args, lora=train("ti_lora", args, **ti)["lora"]),
        f"LoRA + img2img {s1}": lambda: generate(f"LoRA + img2img {s1}", args, lora=lora(), start="blur", strength=s1),
        f"LoRA + img2img {s2}": lambda: generate(f"LoRA + img2img {s2}", args, lora=lora(), start="blur", strength=s2),
        "LoRA + colour latents": lambda: generate("LoRA + colour latents", args, lora=lora(), start="latents",
                                                  strength=0.9),
        "LoRA + PEZ": lambda: generate("LoRA + PEZ", args, lora=lora(), template="{trigger},{pez},{style_tags},{prompt}",
                                       pez=run_pez(args)) if args.clip else None,
    }
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, make in variants.items():
        if only and name not in only:
            continue
        print(f"{name} ...")
        t0 = time.time()
        try:
            folder = make()
        except Exception as e:  # one failing variant must not lose the others' rows
            print(f"  {name} failed: {type(e).__name__}: {e}")
            rows.append({"variant": name, "note": f"failed: {e}"})
            continue
        if folder is None:
            rows.append({"variant": name, "note": "skipped: needs --clip"})
            continue
        scores = score(folder, args)
        rows.append({"variant": name, **scores, "png": picture(name, folder, args, scores),
                     "seconds": round(time.time() - t0)})

    metrics = [m for m in ("hist", "dino", "lpips", "fid", "clip_iqa", "clip_r", "total") if any(m in r for r in rows)]
    head = f"| variant | {' | '.join(metrics)} |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for r in rows:
        cells = [f"{r[m]:.3f}" if m in r else r.get("note", "-") for m in metrics]
        lines.append(f"| {r['variant']} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "techniques.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "techniques.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
