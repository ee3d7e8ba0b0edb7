"""The built-in tiny Stable Diffusion models, so every command has a default that runs in seconds.

`tiny_model_path()`: the pretrained one shipped in the package (`assets/tiny-sd`, trained by
`python -m tools.pretrain_tiny` on procedural coloured shapes: "a red circle on a blue background", 64x64
pixels, CLIP's real vocabulary). It is the default base model of every command.

`random_tiny_model_path()`: random weights from fixed configs and a seed, built on first use into the
user cache, with a byte-level CLIP vocabulary (no merges). It exercises the machinery and draws
noise; tests and benchmarks use it where only the numbers matter.
"""
from __future__ import annotations

import json
import os
from typing import List

from ._runtime import jt
from .models.clip_tokenizer import bytes_to_unicode

TINY_SEED = 0
TINY_VERSION = "random-v1"

UNET_CONFIG = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 64,
    "attention_head_dim": 8, "norm_num_groups": 8, "use_linear_projection": True,
}
VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [32, 64, 64], "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
}
TEXT_CONFIG = {
    "vocab_size": 514, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "projection_dim": 64,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "leading",
}


def byte_level_vocab() -> List[str]:
    """The 514-token vocabulary in CLIP's order: 256 byte symbols, the same with `</w>`, then the two specials.

    CLIP lists the byte symbols printable-first, which is ascending order of the symbol's code point."""
    symbols = sorted(bytes_to_unicode().values())
    return symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]


def write_byte_level_tokenizer(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(byte_level_vocab())}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True}, f)


def build_tiny_pipeline(seed: int = TINY_SEED):
    """Build the tiny pipeline in memory from fixed configs and a fixed seed."""
    import tempfile

    from .models.autoencoder_kl import AutoencoderKL
    from .models.clip import CLIPTextModel
    from .models.clip_tokenizer import CLIPTokenizer
    from .models.unet_2d_condition import UNet2DConditionModel
    from .pipelines.stable_diffusion import StableDiffusionPipeline
    from .schedulers import DDIMScheduler

    jt.set_global_seed(seed)
    unet = UNet2DConditionModel.from_config(dict(UNET_CONFIG))
    vae = AutoencoderKL.from_config(dict(VAE_CONFIG))
    text_encoder = CLIPTextModel.from_config(dict(TEXT_CONFIG))
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = DDIMScheduler.from_config(dict(SCHEDULER_CONFIG))
    for model in (unet, vae, text_encoder):
        model.eval()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler)


PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-sd")


def tiny_model_path() -> str:
    """Folder of the shipped pretrained tiny model (diffusers layout, read-only)."""
    if not os.path.isfile(os.path.join(PRETRAINED, "model_index.json")):
        raise FileNotFoundError(f"the built-in model is missing from the installed package ({PRETRAINED}); "
                                "reinstall jdiffusion-lora or pass a model folder")
    return PRETRAINED


def random_tiny_model_path() -> str:
    """Folder of the random tiny model, built on first call (cached under ~/.cache/jdiffusion_lora)."""
    root = os.environ.get("JDIFFUSION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jdiffusion_lora"))
    folder = os.path.join(root, f"tiny-sd-{TINY_VERSION}")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        tmp = folder + f".partial-{os.getpid()}"
        build_tiny_pipeline().save_pretrained(tmp)
        os.makedirs(root, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
