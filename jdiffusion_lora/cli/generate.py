"""`generate`: make the images of a submission (every style's prompt.json) with a model and LoRA(s).

    python -m jdiffusion_lora.cli generate --data styles --lora my_lora.safetensors --out outputs/sub
    python -m jdiffusion_lora.cli generate ... --workers 2          # sharded (also: python run_parallel.py)
    mpirun -np 4 python infer.py ...                                 # one rank per GPU / machine slot

Resumable: images already made with the same settings are skipped (checked against their records);
`--overwrite` redoes them. See jdiffusion_lora/generate/ for the details.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings


def add_arguments(p: argparse.ArgumentParser, default_workers="1") -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--model", default=None, help="diffusers folder, single-file checkpoint or org/name in the HF cache "
                   "(default: the built-in tiny model)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA file or folder, any supported format; repeat for several")
    g.add_argument("--data", default=None, help="dataset root with <NN>/prompt.json (and tag.json, llm_prompt.json)")
    g.add_argument("--prompts", default=None,
                   help='prompt file instead of / on top of --data: JSON {"NN": ["Cat", ...]} or {"NN": {"0": "Cat"}}')
    g.add_argument("--styles", default=None, help="comma-separated style ids (default: all)")
    g.add_argument("--out", default="outputs/generate", help="output root: <out>/<NN>/<prompt>.png")
    t = p.add_argument_group("prompt")
    t.add_argument("--template", default="challenge",
                   help="preset (challenge, trigger, plain) or a template with {trigger} {style} {style_tags} {prompt} "
                        "{hypernyms}, {field*N} repeats: challenge = '{trigger},{style_tags},{prompt*4},{hypernyms}'")
    t.add_argument("--negative-template", default=None, help="negative prompt template (default: none)")
    t.add_argument("--trigger-format", default="style_{style}", help="the {trigger} field")
    t.add_argument("--pez", default=None, metavar="FILE",
                   help="JSON {style: prompt} written by the `pez` command, for the {pez} template field")
    t.add_argument("--dedupe", action="store_true", help="keep the first of duplicate prompts instead of stopping")
    s = p.add_argument_group("sampling")
    s.add_argument("--scheduler", default=None, help="DDIMScheduler, DPMSolverMultistepScheduler, ... "
                                                     "(default: the model's)")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--size", type=int, default=None, help="height and width (default: the model's)")
    s.add_argument("--height", type=int, default=None)
    s.add_argument("--width", type=int, default=None)
    s.add_argument("--seed", type=int, default=114514, help="base seed")
    s.add_argument("--seed-mode", choices=["hash", "fixed"], default="hash",
                   help="hash: each image's seed = hash(seed, style, prompt); fixed: every image uses --seed")
    s.add_argument("--batch-size", type=int, default=1, help="images a worker takes at a time")
    s.add_argument("--batch-mode", choices=["exact", "batched"], default="exact",
                   help="exact: one image per UNet call, bytes independent of batch size; batched: one UNet "
                        "call per batch (faster on GPU, last-bit differences between batch sizes)")
    s.add_argument("--start", choices=["noise", "reference", "flat", "blur", "latents"], default="noise",
                   help="start from noise, or (img2img at --strength) from a reference image, a flat image of the "
                        "style's mean colour, a blurred mean of its references, or latents with their mean and spread")
    s.add_argument("--strength", type=float, default=0.8, help="img2img strength in (0, 1] for --start")
    m = p.add_argument_group("speed and memory")
    m.add_argument("--fuse-lora", action="store_true", help="fold the LoRA(s) into the weights (faster)")
    m.add_argument("--attention-slicing", action="store_true",
                   help="accepted for diffusers parity; a no-op: attention always splits its queries into chunks "
                        "sized from the free memory")
    m.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    m.add_argument("--vae-tiling", action="store_true", help="decode large images in overlapping tiles")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations; fp16 on CUDA only; bf16 on CPU saves memory but Jittor's CPU "
                        "bf16 products are inexact (see train/precision.py)")
    m.add_argument("--low-memory", action="store_true",
                   help="bf16 weights computed in fp32, text encoder / UNet / VAE loaded in turn, tiled VAE: "
                        "about half the weights' memory (slower: the models are reloaded for every image)")
    r = p.add_argument_group("running")
    r.add_argument("--workers", default=default_workers,
                   help="worker processes: a number, or 'auto' (one per GPU, else 2 CPU processes)")
    r.add_argument("--overwrite", action="store_true", help="redo images that already exist")
    r.add_argument("--no-progress", action="store_true")
    from ..train.config import accept_negative_numbers
    accept_negative_numbers(p)


def check_arguments(args) -> None:
    """Numeric options in range (ConfigError naming the option and the range)."""
    from ..configuration import AT_LEAST_1, GUIDANCE, PIXELS, SEED_RANGE, check_ranges
    check_ranges(vars(args), {"steps": AT_LEAST_1, "guidance": GUIDANCE, "size": PIXELS, "height": PIXELS,
                              "width": PIXELS, "seed": SEED_RANGE, "batch_size": AT_LEAST_1})


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate a submission's images (resumable, parallel)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def resolve_workers(value) -> int:
    if str(value) == "auto":
        from ..generate.parallel import gpu_count
        return gpu_count() or 2
    n = int(value)
    if n < 1:
        raise ValueError(f"--workers must be at least 1 or 'auto', got {value}")
    return n


def read_pez_file(path: str) -> dict:
    import json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PEZ prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, (str, dict)) for v in data.values()):
        raise ValueError(f"{path}: expected {{style: prompt}}")
    return {k: v["prompt"] if isinstance(v, dict) else v for k, v in data.items()}


def run(args) -> int:
    from .._runtime import announce_device
    from ..generate import GenerateSettings, LoraSpec, build_items, read_inputs, run_job
    from ..tiny import tiny_model_path

    check_arguments(args)
    announce_device()

    styles = [s for s in args.styles.split(",") if s.strip()] if args.styles else None
    if not args.data and not args.prompts:
        raise ValueError("give --data (dataset root with <NN>/prompt.json) or --prompts FILE")
    inputs, llm = read_inputs(args.data, args.prompts, styles)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = build_items(inputs, llm, template=args.template, negative_template=args.negative_template,
                            base_seed=args.seed, seed_mode=args.seed_mode, trigger_format=args.trigger_format,
                            dedupe=args.dedupe, pez=read_pez_file(args.pez) if args.pez else None)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    settings = GenerateSettings(
        model=args.model or tiny_model_path(), loras=[LoraSpec.parse(s) for s in args.lora],
        scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
        height=args.height or args.size, width=args.width or args.size, batch_size=args.batch_size,
        batch_mode=args.batch_mode, fuse_lora=args.fuse_lora, attention_slicing=args.attention_slicing,
        vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling, dtype=args.dtype, start=args.start,
        strength=args.strength, data_root=args.data, low_memory=args.low_memory)
    from ..train import distributed as dist
    # Under mpirun each rank is one worker (it makes every N-th item): --workers is not used.
    workers = 1 if dist.active() else resolve_workers(args.workers)
    result = run_job(items, settings, args.out, workers=workers, overwrite=args.overwrite,
                     progress=not args.no_progress)
    if not dist.is_writer():
        return 1 if result.missing else 0
    print(f"{result.total} image(s) in {len(inputs)} style(s): {result.skipped} already done, "
          f"{result.generated} generated by {result.workers} worker(s) in {result.seconds:.1f}s -> {args.out}/")
    print(f"manifest: {result.manifest}")
    if result.missing:
        print(f"error: {len(result.missing)} image(s) still missing (a worker failed); run the same command "
              f"again to finish: " + ", ".join(result.missing[:10]), file=sys.stderr)
        return 1
    return 0
