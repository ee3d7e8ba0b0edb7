"""Real-size benchmark: SD 1.5 / SD 2.1 (published config.json values, random weights, nothing downloaded),
jdiffusion-lora (Jittor) vs diffusers + PEFT (PyTorch), each side in its own process, one after the other.

    flock /tmp/jdl-bigmem.lock python benchmarks/real_size.py [--model sd15 sd21] [--work load train generate]
        [--rank 4 896] [--size 512 768] [--steps 20] [--train-steps 2] [--side ours diffusers] [--low-memory]
        [--gradient-checkpointing]

Work items (batch 1):
- load: build the pipeline from the folder; peak resident memory while loading and what stays after.
- train: one LoRA training step (UNet to_q/k/v/out.0 + text q/k/v, rank r, alpha r) at 512 px: text encoder
  with its LoRA, UNet forward, MSE, backward, clipping, AdamW. The first step (Jittor compiles its kernels)
  is reported apart; s/step is the median of the following `--train-steps`.
- generate: a `--steps`-step DDIM generation with CFG 7.5 at each `--size` (one warm-up step first, which
  pays Jittor's compilation); s/image. `--low-memory` adds our low-memory mode as a third side.
Peak memory is the process's peak RSS (getrusage), so it includes the framework (about 0.4 GB for torch).
It prints a ready-to-paste markdown table with the date and the machine's load average.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215)

# runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 config.json values
MODELS = {
    "sd15": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), down_block_types=_DOWN, up_block_types=_UP,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True,
                  freq_shift=0, act_fn="silu", norm_eps=1e-5),
        vae=dict(_VAE, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        label="SD 1.5 (UNet 860M, CLIP ViT-L/14 text 123M)"),
    "sd21": dict(
        unet=dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), down_block_types=_DOWN, up_block_types=_UP,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  upcast_attention=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
                  norm_eps=1e-5),
        vae=dict(_VAE, sample_size=768),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512),
        label="SD 2.1 (UNet 866M, OpenCLIP ViT-H text 340M)"),
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj"]
PROMPT = "style_00,purple,lineart,dark_background,apple,fruit,apple"


def build_model(name: str, folder: str) -> None:
    """Random-weight diffusers pipeline with the published configs, saved as safetensors (fp32)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jdiffusion_lora.tiny import write_byte_level_tokenizer

    spec = MODELS[name]
    torch.manual_seed(0)
    tok_dir = os.path.join(folder, "_tok")
    write_byte_level_tokenizer(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513, **spec["text"]))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel(**spec["unet"]),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# --------------------------------------------------------------------------- one side, in its own process

def run_ours(args) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import jdiffusion_lora  # noqa: F401
    from jdiffusion_lora._runtime import jt

    if args.work == "train":
        from train_step import our_trainer
        t0 = time.perf_counter()
        trainer = our_trainer(args.folder, args.data, args.rank, 1, 64, args.gradient_checkpointing)
        load_s = time.perf_counter() - t0
        step = iter(range(10 ** 9))
        return timed_steps(lambda: trainer.train_step(next(step)), args.train_steps, load_s)

    from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
    t0 = time.perf_counter()
    if args.work == "load":
        pipe = StableDiffusionPipeline.from_pretrained(args.folder)
        jt.sync_all()
        return {"load_s": time.perf_counter() - t0, "peak_mb": peak_rss_mb(), "after_mb": rss_mb()}
    low = args.side == "ours-low-memory"
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, low_memory=low)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=args.size, width=args.size, guidance_scale=7.5, output_type="np")
    pipe(PROMPT, num_inference_steps=1, seed=0, **kw)                         # warm-up: compilation
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(PROMPT, num_inference_steps=args.steps, seed=1, **kw)
    return {"s": time.perf_counter() - t0, "first_s": warm, "peak_mb": peak_rss_mb()}


def run_diffusers(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None, requires_safety_checker=False)
    if args.work == "load":
        return {"load_s": time.perf_counter() - t0, "peak_mb": peak_rss_mb(), "after_mb": rss_mb()}
    if args.work == "train":
        from train_step import torch_step_fn
        step, _ = torch_step_fn(pipe, args.rank, 1, 64, args.gradient_checkpointing)
        return timed_steps(step, args.train_steps, time.perf_counter() - t0)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=args.size, width=args.size, guidance_scale=7.5, output_type="np")
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kw)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(1), **kw)
    return {"s": time.perf_counter() - t0, "first_s": warm, "peak_mb": peak_rss_mb()}


def timed_steps(step, n: int, load_s: float) -> dict:
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"s": times[len(times) // 2] if times else first, "first_s": first, "load_s": load_s, "peak_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- driver

def side_process(args, side: str, work: str, folder: str, data: str, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--work", work, "--folder", folder,
           "--data", data, "--threads", str(args.threads), "--steps", str(args.steps),
           "--train-steps", str(args.train_steps)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, FIX_TORCH_ERROR="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{side} {work} {extra} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"failed": f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["sd21"], choices=sorted(MODELS))
    ap.add_argument("--work", nargs="+", default=["load", "train", "generate"], choices=["load", "train", "generate"])
    ap.add_argument("--rank", nargs="+", type=int, default=[4, 896])
    ap.add_argument("--size", nargs="+", type=int, default=None, help="generation sizes (default 512, and 768 for sd21)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of a generation")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps after the first")
    ap.add_argument("--side", nargs="+", default=["diffusers", "ours"],
                    help="diffusers, ours, ours-low-memory (internal: one side when --folder is given)")
    ap.add_argument("--low-memory", action="store_true", help="also run our --low-memory generation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train with gradient checkpointing on both sides (UNet and text encoder)")
    ap.add_argument("--workdir", default=None, help="where the random models are written (default: a temp dir)")
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.folder:                                  # one side, one work item, in this process
        args.side, args.work = args.side[0], args.work[0]
        args.rank, args.size = args.rank[0], (args.size or [512])[0]
        result = run_diffusers(args) if args.side == "diffusers" else run_ours(args)
        print("RESULT " + json.dumps(result))
        return 0

    sides = list(args.side) + (["ours-low-memory"] if args.low_memory else [])
    rows = []
    tmp = args.workdir or tempfile.mkdtemp(prefix="jdl-real-size-")
    try:
        data = os.path.join(tmp, "data")
        os.makedirs(os.path.join(data, "00", "images"), exist_ok=True)
        import numpy as np
        from PIL import Image
        img = os.path.join(data, "00", "images", "apple.png")
        if not os.path.exists(img):
            Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)).save(img)
        for name in args.model:
            folder = os.path.join(tmp, name)
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                print(f"building random {name} in {folder} ...", flush=True)
                subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {[HERE, os.path.dirname(HERE)]!r}; "
                                f"import real_size; real_size.build_model({name!r}, {folder!r})"], check=True,
                               env=dict(os.environ, FIX_TORCH_ERROR="0"))
            for work in args.work:
                variants = ([("rank", r) for r in args.rank] if work == "train" else
                            [("size", s) for s in (args.size or ([512, 768] if name == "sd21" else [512]))]
                            if work == "generate" else [(None, None)])
                for key, value in variants:
                    results = {}
                    for side in sides:
                        if side == "ours-low-memory" and work != "generate":
                            continue
                        extra = {key: value} if key else {}
                        print(f"{name} {work} {extra} {side} ...", flush=True)
                        results[side] = side_process(args, side, work, folder, data, **extra)
                        print(f"  {results[side]}", flush=True)
                    rows.append((name, work, key, value, results))
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, args)
    return 0


def print_table(rows, args) -> None:
    import platform
    load1, load5, _ = os.getloadavg()
    print()
    print(f"{date.today().isoformat()}, {os.cpu_count()} CPU(s), {args.threads} threads per side, "
          f"load average {load1:.1f} (5 min {load5:.1f}); {platform.processor() or platform.machine()}. "
          f"Each side in its own process, one at a time (timings compare only on a quiet machine: load average "
          f"at most the threads per side).")
    print()
    print("| model | work | diffusers + PEFT | ours | time ratio | diffusers peak | ours peak | memory ratio | ours first (compile) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, work, key, value, results in rows:
        ref = results.get("diffusers", {})
        for side, res in results.items():
            if side == "diffusers":
                continue
            what = {"train": f"LoRA step rank {value}, 512 px", "generate": f"{args.steps}-step CFG, {value} px",
                    "load": "load pipeline"}[work]
            if work == "train" and args.gradient_checkpointing:
                what += ", checkpointing"
            if side != "ours":
                what += f" ({side[5:]})"
            unit = {"train": "s/step", "generate": "s/image", "load": "s"}[work]
            key_t = "load_s" if work == "load" else "s"

            def fmt(r, k, f="{:.1f}"):
                return f.format(r[k]) if k in r else r.get("failed", "-")

            t_ratio = (f"{res[key_t] / ref[key_t]:.2f}x" if key_t in res and key_t in ref else "-")
            m_ratio = (f"{res['peak_mb'] / ref['peak_mb']:.2f}x" if "peak_mb" in res and "peak_mb" in ref else "-")
            peak = lambda r: (f"{r['peak_mb'] / 1024:.1f} GB" + (f" (after {r['after_mb'] / 1024:.1f})"
                                                                  if "after_mb" in r else "")) if "peak_mb" in r else r.get("failed", "-")
            print(f"| {name} | {what} | {fmt(ref, key_t)} {unit} | {fmt(res, key_t)} {unit} | {t_ratio} | "
                  f"{peak(ref)} | {peak(res)} | {m_ratio} | {fmt(res, 'first_s')} |")


if __name__ == "__main__":
    sys.exit(main())
