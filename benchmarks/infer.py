"""Inference benchmark: jdiffusion-lora (Jittor) vs diffusers (PyTorch) on the same model folder,
steps, batch and scheduler. Seconds per image (steady state, after one warm-up batch that also
pays Jittor's kernel compilation) and peak resident memory, each side in its own subprocess.

    python benchmarks/infer.py [--model DIR | --config tiny|small] [--steps 20] [--batch 2] [--images 4]
                               [--scheduler DDIMScheduler] [--threads 2] [--size N]

Rows: "ours exact" renders one image per UNet call (the generate command's default, exact bytes
whatever the batch); "ours batched" sends the whole batch through the UNet at once, as diffusers does.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# "small": a bigger random UNet than the random tiny model (SD-2-like layout, 32x32 latents = 256 px)
SMALL_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128, 128],
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
                  attention_head_dim=[2, 4, 4], norm_num_groups=32, use_linear_projection=True)


def build_model(config: str, folder: str) -> str:
    """A model folder for the benchmark: the random tiny model, or it with the "small" UNet."""
    import jdiffusion_lora  # noqa: F401
    from jdiffusion_lora.tiny import build_tiny_pipeline, random_tiny_model_path

    if config == "tiny":
        return random_tiny_model_path()
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel

    pipe = build_tiny_pipeline()
    jt.set_global_seed(1)
    pipe.unet = UNet2DConditionModel.from_config(dict(SMALL_UNET))
    pipe.unet.eval()
    pipe.save_pretrained(folder)
    return folder


def run_side(args) -> dict:
    """In a fresh process: load, warm up with one batch, time `images` images; report s/image and peak RSS."""
    prompts = [f"a test prompt number {i}" for i in range(args.images)]
    size = dict(height=args.size, width=args.size) if args.size else {}
    if args.side == "diffusers":
        import torch
        import diffusers

        torch.set_num_threads(args.threads)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                                 requires_safety_checker=False)
        if args.scheduler:
            pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def render(batch, seed):
            g = [torch.Generator().manual_seed(seed + i) for i in range(len(batch))]
            with torch.no_grad():
                pipe(batch, num_inference_steps=args.steps, guidance_scale=7.5, generator=g, output_type="np", **size)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        import jdiffusion_lora  # noqa: F401
        from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
        from jdiffusion_lora.schedulers import SCHEDULERS

        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        if args.scheduler:
            pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def render(batch, seed):
            kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np", **size)
            if args.side == "ours-exact":
                for i, p in enumerate(batch):
                    pipe([p], seed=[seed + i], **kw)
            else:
                pipe(batch, seed=[seed + i for i in range(len(batch))], **kw)

    t0 = time.perf_counter()
    render(prompts[:args.batch], 0)                   # warm-up (and Jittor's compilation)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, args.images, args.batch):
        render(prompts[start:start + args.batch], 100 + start)
    per_image = (time.perf_counter() - t0) / args.images
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"side": args.side, "s_per_image": per_image, "warmup_s": warm, "peak_rss_mb": peak_mb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers-layout model folder (default: built from --config)")
    ap.add_argument("--config", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="timed images (after one warm-up batch)")
    ap.add_argument("--scheduler", default="DDIMScheduler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(args.config, os.path.join(tmp, "model"))
        rows = []
        for side in ("diffusers", "ours-exact", "ours-batched"):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", model,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--images", str(args.images),
                   "--scheduler", args.scheduler, "--threads", str(args.threads)]
            if args.size:
                cmd += ["--size", str(args.size)]
            env = dict(os.environ, FIX_TORCH_ERROR="0")
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                print(f"{side} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(line[-1][len("RESULT "):]))
    print(f"model {args.model or args.config}, {args.scheduler}, {args.steps} steps, batch {args.batch}, "
          f"{args.images} timed images, {args.threads} thread(s), CFG 7.5; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings are only comparable on an idle machine)")
    print(f"{'side':<14}{'s/image':>10}{'vs diffusers':>14}{'warm-up s':>11}{'peak RSS MB':>13}")
    base = rows[0]["s_per_image"]
    for r in rows:
        print(f"{r['side']:<14}{r['s_per_image']:>10.3f}{r['s_per_image'] / base:>13.2f}x{r['warmup_s']:>11.1f}"
              f"{r['peak_rss_mb']:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
