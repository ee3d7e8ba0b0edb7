"""Tiny random-weight Stable Diffusion pipelines built with diffusers (the PyTorch reference).

Shared by the pipeline, LoRA and generation tests. Every parameter is re-drawn at random (not the
library's default init) so that zero-initialised layers are exercised too.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from jdiffusion_lora.tiny import write_byte_level_tokenizer

CROSS_DIM = 32


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Refill every parameter with N(0, std); norm weights become 1 + N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_weight else noise)


def tiny_unet_config(sd2: bool = False) -> dict:
    if sd2:
        return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
                    attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=8)
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
                attention_head_dim=4, norm_num_groups=8)


def build_diffusers_pipeline(folder: str, sd2: bool = False, prediction_type: str = "epsilon", seed: int = 0):
    """Build, randomise and save a tiny diffusers StableDiffusionPipeline to `folder`; returns it (eval mode)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sd2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=512,
        eos_token_id=513, pad_token_id=513, projection_dim=CROSS_DIM))
    for i, m in enumerate((unet, vae, text_encoder)):
        randomize_(m, seed * 10 + i)
    # a small VAE std keeps decoded images away from the [0, 1] clamp, so differences stay visible
    randomize_(vae, seed * 10 + 5, std=0.04)
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for m in (unet, vae, text_encoder):
        m.eval()
    return pipe


def image_latents(batch: int, seed: int = 123, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, size, size), dtype=np.float32)
