"""`txt2img`: generate images for one prompt with a model folder (default: the built-in tiny model)."""
from __future__ import annotations

import argparse
import os
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("txt2img", help="generate images from a prompt",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="diffusers folder, single-file checkpoint (.safetensors/.ckpt) or org/name in the "
                        "HF cache (default: the built-in tiny model)")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--scheduler", default=None,
                   help="DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, ... (default: the model's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA file(s) to apply")
    p.add_argument("--low-memory", action="store_true",
                   help="bf16 weights computed in fp32, text encoder / UNet / VAE loaded one at a time, tiled VAE "
                        "(about half the memory of the weights in fp32); no --lora with it")
    p.add_argument("--out", default="outputs/txt2img", help="output folder")
    p.set_defaults(func=run)
    from ..train.config import accept_negative_numbers
    accept_negative_numbers(p)


def check_arguments(args) -> None:
    """Numeric options in range (ConfigError naming the option and the range)."""
    from ..configuration import AT_LEAST_1, GUIDANCE, PIXELS, SEED_RANGE, check_ranges
    check_ranges(vars(args), {"steps": AT_LEAST_1, "guidance": GUIDANCE, "num_images": AT_LEAST_1,
                              "height": PIXELS, "width": PIXELS, "seed": SEED_RANGE})


def run(args) -> int:
    from .._runtime import announce_device
    from ..image_files import save_png
    from ..pipelines import load_pipeline
    from ..tiny import tiny_model_path

    check_arguments(args)
    announce_device()
    model = args.model or tiny_model_path()
    if args.low_memory and args.lora:
        raise ValueError("--low-memory loads the base model only: it cannot apply --lora")
    pipe = load_pipeline(model, scheduler=args.scheduler, low_memory=args.low_memory)
    for i, spec in enumerate(args.lora):
        path, _, scale = spec.partition(":")
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    if args.lora:
        pipe.set_adapters([f"lora{i}" for i in range(len(args.lora))],
                          [float(s.partition(":")[2] or 1.0) for s in args.lora])
    start = time.time()
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
               guidance_scale=args.guidance, num_images_per_prompt=args.num_images, height=args.height,
               width=args.width, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    for image, seed in zip(out.images, out.seeds):
        save_png(image, os.path.join(args.out, f"seed{seed}.png"))
    print(f"model: {model}")
    print(f"wrote {len(out.images)} image(s) of {out.images[0].size[0]}x{out.images[0].size[1]} to {args.out}/ "
          f"in {time.time() - start:.1f}s")
    return 0
