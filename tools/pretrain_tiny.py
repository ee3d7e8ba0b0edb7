"""Pretrain the built-in tiny Stable Diffusion model on the procedural shapes data set.

    python -m tools.pretrain_tiny --out jdiffusion_lora/assets/tiny-sd            # full run (~40 min, 2 CPU cores)
    python -m tools.pretrain_tiny --out /tmp/t --vae-steps 2 --unet-steps 2 --data 32 --no-grid   # smoke run

Three phases, all plain AdamW on CPU:
  1. VAE: a small AutoencoderKL (64x64 RGB -> 16x16x4 latents) trained as an autoencoder
     (MSE + a tiny KL term) on `tools.tiny_data` images: the captioned set plus as many
     uncaptioned shapes in arbitrary colours (`make_colour_dataset`), so it can draw colours a style
     LoRA will ask for. Its `scaling_factor` is then set to 1 / std of the captioned set's latents,
     so the UNet sees unit-variance latents.
  2. UNet + CLIP text encoder, jointly, on the cached latents (posterior means) of the captioned set:
     epsilon prediction with DDPM noise, 10% of captions dropped to "" for classifier-free guidance.
  3. The VAE's decoder alone on both sets again, the encoder frozen (so the UNet's latents keep their
     meaning): sharper, truer colours. `--finetune-decoder` runs it on a folder saved with
     `--decoder-steps 0`, to the same bytes.
The text encoder uses CLIP's real 49408-token vocabulary (tokenizer files written by `python -m tools.clip_vocab`).

Deterministic for a given seed on one machine: all data randomness comes from one numpy
Generator, and Jittor's own seed is fixed. The output folder gets the diffusers layout, a
`SHA256SUMS` of the weight files, `train_log.txt` and (unless --no-grid) `samples.png`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

import jdiffusion_lora  # noqa: F401  (sets Jittor's environment before importing it)
from jdiffusion_lora import tiny
from jdiffusion_lora._runtime import jt

from tools import tiny_data

# 64x64 pixels -> 16x16x4 latents (two downsamplings). With three (8x8 latents) this VAE did not learn to
# keep the colours within the time budget; no VAE attention: flat-colour images do not need it.
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [16, 32, 32], "sample_size": 64, "mid_block_add_attention": False,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
}
# The real CLIP vocabulary (49408 tokens, see `python -m tools.clip_vocab`) at width 32 keeps the embedding at 6 MB.
TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": 32,
}
# Attention only at 8x8 (the second level and the middle): at 16x16 it cost 40% more time per step.
UNET_CONFIG = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": 8, "norm_num_groups": 8, "use_linear_projection": True,
}
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "jdiffusion_lora", "assets", "tiny-sd", "tokenizer")
SCHEDULER_CONFIG = dict(tiny.SCHEDULER_CONFIG)

# The sample grid: one row per prompt, one column per seed.
GRID_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue circle on a yellow background",
    "a green square on a white background",
    "a black triangle on a red background",
]
GRID_SEEDS = list(range(6))
GRID_STEPS = 20
GRID_GUIDANCE = 4.0


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(folder: str) -> List[str]:
    """Relative paths of the weight files in a pipeline folder, sorted."""
    out = []
    for sub in ("text_encoder", "unet", "vae"):
        for name in sorted(os.listdir(os.path.join(folder, sub))):
            if name.endswith(".safetensors"):
                out.append(f"{sub}/{name}")
    return out


def write_sha256sums(folder: str) -> List[str]:
    lines = [f"{sha256_file(os.path.join(folder, rel))}  {rel}" for rel in weight_files(folder)]
    with open(os.path.join(folder, "SHA256SUMS"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def lr_at(step: int, total: int, peak: float) -> float:
    """Piecewise constant: the peak, then 30% from 60% of the run, then 10% from 85%.

    Few distinct values on purpose: Jittor bakes Python float constants into its compiled kernels, so
    a learning rate that changes every step recompiles the optimizer's kernels every step."""
    if step < 0.6 * total:
        return peak
    return peak * (0.3 if step < 0.85 * total else 0.1)


def set_lr(optimizer, lr: float) -> None:
    optimizer.lr = lr
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, rng, log) -> None:
    """Autoencoder training: MSE reconstruction of a sampled latent + 1e-6 * KL."""
    vae.train()
    optimizer = jt.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    latent_hw = images.shape[-1] // vae.downscale_factor
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr))
        idx = rng.integers(len(images), size=batch)
        x = jt.array(images[idx])                                            # (B, 3, 64, 64)
        noise = jt.array(rng.standard_normal((batch, 4, latent_hw, latent_hw), dtype=np.float32))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(noise)).sample                     # (B, 3, 64, 64)
        mse = ((rec - x) ** 2).mean()
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.step(loss)
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  mse {float(mse.item()):.5f}")


def encode_latents(vae, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Posterior means of all images -> (N, 4, 16, 16) float32 (unscaled)."""
    vae.eval()
    out = []
    with jt.no_grad():
        for i in range(0, len(images), batch):
            out.append(vae.encode(jt.array(images[i:i + batch])).latent_dist.mode().numpy())
    return np.concatenate(out).astype(np.float32)


def train_decoder(vae, images: np.ndarray, steps: int, batch: int, lr: float, rng, log) -> None:
    """Phase 3: the decoder alone (MSE), the encoder frozen so the latents the UNet learned keep their meaning."""
    vae.train()
    params = vae.decoder.parameters() + (vae.post_quant_conv.parameters() if vae.post_quant_conv is not None else [])
    optimizer = jt.optim.AdamW(params, lr=lr, weight_decay=0.0)
    latent_hw = images.shape[-1] // vae.downscale_factor
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr))
        x = jt.array(images[rng.integers(len(images), size=batch)])                              # (B, 3, 64, 64)
        noise = jt.array(rng.standard_normal((batch, 4, latent_hw, latent_hw), dtype=np.float32))
        z = vae.encode(x).latent_dist.sample(noise).stop_grad()                                 # (B, 4, 16, 16)
        mse = ((vae.decode(z).sample - x) ** 2).mean()
        optimizer.step(mse)
        if step % 25 == 0 or step == steps - 1:
            log(f"decoder step {step:5d}  mse {float(mse.item()):.5f}")


def decoder_phase(vae, images: np.ndarray, seed: int, data: int, steps: int, batch: int, lr: float, log) -> None:
    """Phase 3 on the captioned set + the colour set, with a random stream of its own (so phases 1-2 do not
    depend on it, and running it later on a saved folder gives the same bytes as running it in one go)."""
    pool = np.concatenate([images, to_model_input(tiny_data.make_colour_dataset(data, seed + 1))])
    train_decoder(vae, pool, steps, batch, lr, np.random.default_rng([seed, 3]), log)


def to_model_input(images_u8: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float32 in [-1, 1]."""
    return (images_u8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def train_unet(unet, text_encoder, latents: np.ndarray, ids: np.ndarray, empty_ids: np.ndarray,
               alphas_cumprod: np.ndarray, steps: int, batch: int, lr: float, rng, log,
               checkpoint=None, checkpoint_every: int = 0) -> None:
    """Joint epsilon-prediction training of the UNet and the text encoder on scaled latents."""
    unet.train()
    text_encoder.train()
    optimizer = jt.optim.AdamW(unet.parameters() + text_encoder.parameters(), lr=lr, weight_decay=0.01)
    running = []
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, lr))
        idx = rng.integers(len(latents), size=batch)
        x0 = latents[idx]                                                    # (B, 4, 16, 16)
        tok = ids[idx].copy()                                                # (B, 77)
        tok[rng.random(batch) < 0.1] = empty_ids                             # caption dropout for CFG
        t = rng.integers(len(alphas_cumprod), size=batch)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)
        context = text_encoder(jt.array(tok)).last_hidden_state              # (B, 77, 32)
        pred = unet(jt.array(noisy), jt.array(t.astype(np.int32)), context).sample
        loss = ((pred - jt.array(noise)) ** 2).mean()
        optimizer.step(loss)
        running.append(float(loss.item()))
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step:5d}  loss {np.mean(running):.5f}  lr {optimizer.lr:.2e}")
            running = []
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint(step + 1)


def draw_and_check(pipe, prompts: List[str], seeds: List[int], steps: int, guidance: float):
    """Images for every (prompt, seed) -> (rows of PIL images, one per prompt; fraction whose centre and
    corners show the prompted colours)."""
    pipe.progress_bar_disabled = True
    rows, passed = [], 0
    for prompt in prompts:
        words = prompt.split()
        images = pipe([prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, seed=seeds).images
        passed += sum(tiny_data.matches(image, words[1], words[5]) for image in images)
        rows.append(images)
    return rows, passed / (len(prompts) * len(seeds))


def pixel_check(pipe) -> float:
    """The quick check run at each checkpoint: the grid's prompts, 4 seeds, 10 steps."""
    return draw_and_check(pipe, GRID_PROMPTS, GRID_SEEDS[:4], 10, GRID_GUIDANCE)[1]


def sample_grid(pipe, path: str) -> float:
    """Draw the grid (rows = prompts, columns = seeds) to `path`; returns the pixel-check pass rate."""
    from PIL import Image

    rows, rate = draw_and_check(pipe, GRID_PROMPTS, GRID_SEEDS, GRID_STEPS, GRID_GUIDANCE)
    size = tiny_data.SIZE
    grid = Image.new("RGB", (size * len(GRID_SEEDS), size * len(GRID_PROMPTS)), (128, 128, 128))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * size, r * size))
    grid.save(path)
    return rate


def build_tokenizer(folder: str = TOKENIZER):
    from jdiffusion_lora.models.clip_tokenizer import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


def pretrain(out: str, seed: int = 0, data: int = 4096, vae_steps: int = 1000, vae_batch: int = 16,
             vae_lr: float = 2e-3, unet_steps: int = 2600, unet_batch: int = 32, unet_lr: float = 1e-3,
             decoder_steps: int = 600, decoder_batch: int = 16, decoder_lr: float = 1e-3,
             grid: bool = True, checkpoint_every: int = 400, quiet: bool = False, resume: Optional[str] = None) -> dict:
    """Run the three phases and write the pipeline folder `out`. Returns a summary dict.

    resume: a pipeline folder to start from; its VAE is kept as is (no VAE phase) and its UNet and
    text encoder train on (fresh AdamW state)."""
    from jdiffusion_lora.models.autoencoder_kl import AutoencoderKL
    from jdiffusion_lora.models.clip import CLIPTextModel
    from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel
    from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline
    from jdiffusion_lora.schedulers import DDIMScheduler, DDPMScheduler

    os.makedirs(out, exist_ok=True)
    start = time.time()
    log, lines = timed_log(quiet)

    settings = dict(resume=resume, seed=seed, data=data, vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr,
                    unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr, decoder_steps=decoder_steps,
                    decoder_batch=decoder_batch, decoder_lr=decoder_lr)
    log("settings " + json.dumps(settings, sort_keys=True))
    jt.set_global_seed(seed)
    rng = np.random.default_rng(seed)

    images_u8, captions, _ = tiny_data.make_dataset(data, seed)
    images = to_model_input(images_u8)                                                   # (N, 3, 64, 64)

    if resume:
        vae = AutoencoderKL.from_pretrained(os.path.join(resume, "vae"))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(resume, "unet"))
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(resume, "text_encoder"))
    else:
        vae = AutoencoderKL.from_config(dict(VAE_CONFIG))
        unet = UNet2DConditionModel.from_config(dict(UNET_CONFIG))
        text_encoder = CLIPTextModel.from_config(dict(TEXT_CONFIG))
    tokenizer = build_tokenizer()

    if not resume:
        # The VAE also sees as many shapes in arbitrary colours (outlines, stripes; no captions): trained on
        # the six named colours alone, its encoder merged unseen ones (purple came back blue, pink green),
        # and no style LoRA could then reach a new palette.
        colour_images = to_model_input(tiny_data.make_colour_dataset(data, seed + 1))
        train_vae(vae, np.concatenate([images, colour_images]), vae_steps, vae_batch, vae_lr, rng, log)
        del colour_images
    latents = encode_latents(vae, images)
    std = float(latents.std())
    if not resume:
        vae.config.scaling_factor = float(f"{1.0 / std:.5f}")
    latents = latents * np.float32(vae.config.scaling_factor)
    log(f"latent std {std:.5f} -> scaling_factor {vae.config.scaling_factor}")

    ids = np.asarray(tokenizer(captions, padding="max_length", max_length=77, truncation=True)["input_ids"],
                     dtype=np.int32)                                                # (N, 77)
    empty_ids = np.asarray(tokenizer([""], padding="max_length", max_length=77)["input_ids"][0], dtype=np.int32)
    alphas_cumprod = np.asarray(DDPMScheduler.from_config(dict(SCHEDULER_CONFIG, _class_name="DDPMScheduler"))
                                .alphas_cumprod, dtype=np.float64)

    def make_pipe():
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_config(dict(SCHEDULER_CONFIG)))

    def checkpoint(step: int) -> None:
        pipe = make_pipe()
        pipe.save_pretrained(out)
        unet.eval()
        text_encoder.eval()
        rate = pixel_check(pipe)
        unet.train()
        text_encoder.train()
        log(f"checkpoint saved at unet step {step}; pixel check {rate:.0%}")

    train_unet(unet, text_encoder, latents, ids, empty_ids, alphas_cumprod, unet_steps, unet_batch, unet_lr,
               rng, log, checkpoint, checkpoint_every)
    if decoder_steps:
        decoder_phase(vae, images, seed, data, decoder_steps, decoder_batch, decoder_lr, log)
    summary = {"settings": settings}
    summary.update(save_and_report(make_pipe(), out, grid, log))
    log(f"done in {time.time() - start:.0f}s")
    summary["train_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(out, "train_log.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def timed_log(quiet: bool):
    """(log, lines): log(msg) keeps "[seconds since now] msg" in lines and prints it unless quiet."""
    start = time.time()
    lines: List[str] = []

    def log(msg: str) -> None:
        lines.append(f"[{time.time() - start:7.1f}s] {msg}")
        if not quiet:
            print(lines[-1], flush=True)

    return log, lines


def save_and_report(pipe, out: str, grid: bool, log) -> dict:
    """Save the pipeline (eval mode) to `out`, write SHA256SUMS and, with `grid`, samples.png."""
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.eval()
    pipe.save_pretrained(out)
    sums = write_sha256sums(out)
    log("saved " + "; ".join(sums))
    report = {"sha256": sums}
    if grid:
        report["grid_pixel_check"] = sample_grid(pipe, os.path.join(out, "samples.png"))
        log(f"samples.png: pixel check passed on {report['grid_pixel_check']:.0%} of the grid")
    return report


def finetune_decoder(out: str, seed: int = 0, data: int = 4096, steps: int = 600, batch: int = 16, lr: float = 1e-3,
                     grid: bool = True, quiet: bool = False) -> dict:
    """Phase 3 alone, on a folder written by a run with `decoder_steps=0`: gives the bytes a run with
    `decoder_steps=steps` would have written. Appends to the folder's train_log.txt."""
    from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline

    log, lines = timed_log(quiet)
    log("phase 3 on the saved folder: " + json.dumps(dict(seed=seed, data=data, decoder_steps=steps,
                                                          decoder_batch=batch, decoder_lr=lr), sort_keys=True))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    images = to_model_input(tiny_data.make_dataset(data, seed)[0])
    decoder_phase(pipe.vae, images, seed, data, steps, batch, lr, log)
    report = save_and_report(pipe, out, grid, log)
    with open(os.path.join(out, "train_log.txt"), "a") as f:
        f.write("\n".join(lines) + "\n")
    return report


def finalize(out: str) -> dict:
    """Write SHA256SUMS and samples.png for a folder saved by a (possibly interrupted) run's checkpoint."""
    from jdiffusion_lora.pipelines.stable_diffusion import StableDiffusionPipeline

    return save_and_report(StableDiffusionPipeline.from_pretrained(out), out, True, print)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=int, default=4096, help="number of procedural images")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-steps", type=int, default=2600)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--decoder-steps", type=int, default=600, help="phase 3: decoder-only steps (0: none)")
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--checkpoint-every", type=int, default=400, help="save the pipeline every N UNet steps (0: never)")
    p.add_argument("--resume", help="pipeline folder to continue from (keeps its VAE, trains UNet + text encoder on)")
    p.add_argument("--no-grid", action="store_true", help="skip the sample grid")
    p.add_argument("--finetune-decoder", action="store_true",
                   help="only phase 3, on the folder a run with --decoder-steps 0 left in --out")
    p.add_argument("--finalize", action="store_true",
                   help="do not train: write SHA256SUMS and samples.png for the checkpoint already in --out")
    a = p.parse_args(argv)
    if a.finalize:
        print(json.dumps(finalize(a.out), indent=1))
        return 0
    if a.finetune_decoder:
        print(json.dumps(finetune_decoder(a.out, a.seed, a.data, a.decoder_steps, a.decoder_batch, a.decoder_lr,
                                          grid=not a.no_grid), indent=1))
        return 0
    summary = pretrain(a.out, a.seed, a.data, a.vae_steps, a.vae_batch, a.vae_lr, a.unet_steps, a.unet_batch,
                       a.unet_lr, a.decoder_steps, a.decoder_batch, a.decoder_lr, grid=not a.no_grid,
                       checkpoint_every=a.checkpoint_every, resume=a.resume)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
