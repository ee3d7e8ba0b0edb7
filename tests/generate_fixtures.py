"""Small inputs for the generation and packaging tests: a 2-style dataset and LoRA files for the tiny model."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

PROMPTS = {"00": {"0": "Cat", "1": "AC/DC", "2": "Boat"}, "01": {"0": "Cat", "1": "Moon"}}
STYLE_TAGS = {"00": "purple, lineart", "01": "pastel"}


def make_dataset(root: str, prompts=PROMPTS) -> str:
    """<root>/<NN>/prompt.json, tag.json, images/ref.png, plus llm_prompt.json."""
    rng = np.random.default_rng(0)
    for style, table in prompts.items():
        os.makedirs(os.path.join(root, style, "images"), exist_ok=True)
        with open(os.path.join(root, style, "prompt.json"), "w") as f:
            json.dump(table, f)
        with open(os.path.join(root, style, "tag.json"), "w") as f:
            json.dump({"style": STYLE_TAGS.get(style, ""), "item": {}}, f)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(root, style, "images", "ref.png"))
    with open(os.path.join(root, "llm_prompt.json"), "w") as f:
        json.dump({"cat": {"hypernyms": ["animal", "pet"]}}, f)
    return root


def write_tiny_lora(path: str, width: int = 64, rank: int = 4, seed: int = 0) -> str:
    """A diffusers/PEFT-format LoRA on the random tiny UNet's first cross-attention (context width `width`;
    any other width makes it a LoRA for another base model)."""
    from jdiffusion_lora.weights import save_safetensors

    rng = np.random.default_rng(seed)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    tensors = {}
    for name, fan_in in (("to_k", width), ("to_v", width)):
        tensors[f"{base}.{name}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(np.float32) * 0.3
        tensors[f"{base}.{name}.lora_B.weight"] = rng.standard_normal((32, rank)).astype(np.float32) * 0.3
    save_safetensors(tensors, path)
    return path
