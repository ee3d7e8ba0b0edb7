"""One LoRA training step: jdiffusion-lora's trainer (Jittor) vs diffusers + PEFT (PyTorch), same config.

    python benchmarks/train_step.py [--config small] [--rank 4] [--batch 1] [--latent 32] [--steps 5] [--threads 2]

Both sides: the same random UNet / CLIP text encoder (diffusers builds them, we load its folder), the
same LoRA rank, alpha and targets (UNet attention, text-encoder q/k/v), AdamW, batch and resolution.
A step = tokenise + text encoder (with its LoRA) + noise + UNet forward + MSE + backward + global-norm
clipping + AdamW. Latents are cached on both sides (ours: the trainer's cache, filled before timing).
Jittor compiles kernels on first use; the median excludes the warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("FIX_TORCH_ERROR", "0")
import jdiffusion_lora  # noqa: E402  (configures Jittor before torch is imported)
from jdiffusion_lora import jt  # noqa: E402
import numpy as np  # noqa: E402

from unet_configs import UNET_CONFIGS as CONFIGS  # noqa: E402  (benchmarks/ is on sys.path)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj"]
CAPTION = "style_00,purple,lineart,dark_background,apple,fruit,apple"


def build_reference(folder: str, unet_config: dict, latent: int):
    """A random diffusers pipeline saved to `folder` (VAE with a factor-8 downsampling)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from jdiffusion_lora.tiny import write_byte_level_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=latent * 8)
    dim = unet_config["cross_attention_dim"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=dim, intermediate_size=2 * dim,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    tok_dir = os.path.join(folder, "_tok")
    write_byte_level_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                   unet=unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def torch_step_fn(pipe, rank: int, batch: int, latent: int, checkpointing: bool = False):
    import torch
    from peft import LoraConfig
    from transformers.integrations import peft as tpeft

    tpeft.check_peft_version = lambda min_version: None   # transformers 5.24 asks for PEFT >= 0.22
    unet, text = pipe.unet, pipe.text_encoder
    for m in (unet, text, pipe.vae):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    text.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TEXT_TARGETS))
    if checkpointing:
        unet.enable_gradient_checkpointing()
        text.gradient_checkpointing_enable()
    unet.train()
    text.train()
    params = [p for m in (unet, text) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = pipe.scheduler
    latents = torch.randn(batch, 4, latent, latent)       # cached latents
    g = torch.Generator().manual_seed(0)

    def step():
        ids = pipe.tokenizer([CAPTION] * batch, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        ctx = text(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def our_trainer(folder: str, data_root: str, rank: int, batch: int, latent: int, checkpointing: bool = False):
    from jdiffusion_lora.train.config import build_config
    from jdiffusion_lora.train.trainer import Trainer

    c = build_config(None, dict(base_model=folder, data_root=data_root, resolution=latent * 8, rank=rank,
                                unet_targets=UNET_TARGETS, text_encoder_targets=TEXT_TARGETS, train_batch_size=batch,
                                learning_rate=1e-4, max_grad_norm=1.0, flip_p=0.0, crop="center",
                                output_dir=os.path.join(data_root, "_out"), progress_bar=False, tensorboard=False,
                                gradient_checkpointing=checkpointing))
    trainer = Trainer(c, printer=lambda s: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the benchmark's data has no prompt.json
        trainer.setup()
    return trainer


def timed(step, warmup: int, steps: int):
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_side(args) -> dict:
    """Time one side in this process (the parent runs each side in its own process, so neither
    framework's idle worker threads steal the 2 cores from the other)."""
    import torch
    torch.set_num_threads(args.threads)
    folder, data = os.path.join(args.workdir, "model"), os.path.join(args.workdir, "data")
    if args.side == "ours":
        trainer = our_trainer(folder, data, args.rank, args.batch, args.latent)
        counter = iter(range(10 ** 9))
        first, med = timed(lambda: trainer.train_step(next(counter)), args.warmup, args.steps)
        params = sum(int(np.prod(p.shape)) for p in trainer.params)
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        step, params = torch_step_fn(pipe, args.rank, args.batch, args.latent)
        first, med = timed(step, args.warmup, args.steps)
    return {"first": first, "median": med, "params": int(params)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(run_side(args)))
        return 0

    import subprocess

    import torch
    from PIL import Image

    config = dict(CONFIGS[args.config])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(os.path.join(tmp, "model"), config, args.latent)
        n_unet = sum(p.numel() for p in ref.unet.parameters()) / 1e6
        del ref
        data = os.path.join(tmp, "data", "00", "images")
        os.makedirs(data)
        rng = np.random.default_rng(0)
        for i in range(max(3, args.batch)):
            Image.fromarray((rng.random((args.latent * 8, args.latent * 8, 3)) * 255).astype(np.uint8)).save(
                os.path.join(data, f"img{i}.png"))
        for side in ("diffusers", "ours"):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--workdir", tmp,
                   *[f"--{k}={getattr(args, k)}" for k in ("config", "rank", "batch", "latent", "steps", "warmup",
                                                           "threads")]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the {side} side failed")
            results[side] = json.loads(lines[-1][len("RESULT "):])
    ours, ref = results["ours"], results["diffusers"]
    assert ours["params"] == ref["params"], (ours["params"], ref["params"])
    print(f"LoRA training step, UNet '{args.config}' ({n_unet:.2f}M params), rank {args.rank}, "
          f"targets UNet {','.join(UNET_TARGETS)} + text {','.join(TEXT_TARGETS)} ({ours['params']:,} trainable), "
          f"batch {args.batch}, latents {args.latent}x{args.latent} (images {args.latent * 8}px), "
          f"{args.threads} threads, jittor {jt.__version__} ({jdiffusion_lora.DEVICE}), torch {torch.__version__}; "
          f"each side in its own process")
    print("| | diffusers + PEFT (s/step) | jdiffusion-lora (s/step) | ratio (ours / diffusers) | "
          "first steps incl. compile (ours, s) |")
    print("|---|---|---|---|---|")
    print(f"| median of {args.steps} | {ref['median']:.3f} | {ours['median']:.3f} | "
          f"{ours['median'] / ref['median']:.2f}x | {ours['first']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
