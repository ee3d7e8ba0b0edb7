"""Tiny CLIP tokenizer folders for the tests: a real-shaped byte-level BPE vocabulary.

The vocabulary has the same layout as OpenAI's CLIP one: the 256 byte-level characters,
the same 256 with the `</w>` end-of-word suffix, one token per learned merge, then
`<|startoftext|>` and `<|endoftext|>`. Merges are learned here from a short English text.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Dict, List, Tuple

from jdiffusion_lora.models.clip_tokenizer import bytes_to_unicode

CORPUS = """
A photograph of an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation.
A beautiful painting of a castle in the mountains at sunset, oil on canvas, by a famous artist.
The quick brown fox jumps over the lazy dog. It's a dog's life, don't you think? They're here and we've
been there; I'm sure you'll see what I'd do. Portrait of a woman with red hair, studio lighting, sharp
focus, masterpiece, best quality, ultra realistic, cinematic lighting, depth of field, bokeh.
A cute cat sitting on a wooden table next to a cup of coffee in a cafe. The café serves crème brûlée.
Landscape with green trees, blue sky and white clouds, digital art, concept art, illustration.
An old man reading a book in the library, warm light, detailed face, photorealistic, 8k resolution.
A futuristic city at night with neon lights and flying cars, cyberpunk style, rain, reflections.
Naïve über Ångström señor jalapeño, the photo of the dog and the cat and the horse and the house.
"""


def learn_merges(text: str, num_merges: int) -> List[Tuple[str, str]]:
    """Plain BPE training on the words of `text` (lower-cased, byte-level, `</w>` on the last symbol)."""
    byte_chars = bytes_to_unicode()
    words = re.findall(r"[^\W\d_]+|\d|[^\s\w]+", text.lower())
    counts = collections.Counter("".join(byte_chars[b] for b in w.encode("utf-8")) for w in words)
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in counts}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in counts.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, s in splits.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return merges


def build_clip_vocab(num_merges: int = 400) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """(vocab, merges) laid out like CLIP's: bytes, bytes+</w>, merges, then the two special tokens."""
    table = bytes_to_unicode()
    # OpenAI's order: the printable bytes first ("!" is id 0), then the remapped ones.
    chars = sorted(table.values(), key=lambda c: (ord(c) >= 256, ord(c)))
    tokens = chars + [c + "</w>" for c in chars]
    merges = learn_merges(CORPUS, num_merges)
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_folder(folder: str, pad_token: str = "<|endoftext|>", model_max_length: int = 77,
                           num_merges: int = 400) -> str:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json as SD-1/SD-2 ship them.

    pad_token="<|endoftext|>" is SD-1 (openai/clip-vit-large-patch14); pad_token="!" is SD-2 (OpenCLIP).
    """
    os.makedirs(folder, exist_ok=True)
    vocab, merges = build_clip_vocab(num_merges)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": _added("<|startoftext|>"), "eos_token": _added("<|endoftext|>"),
               "pad_token": pad_token, "unk_token": _added("<|endoftext|>")}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
                   for k, v in special.items()}, f, indent=2)
    config = {"add_prefix_space": False, **special, "do_lower_case": True, "errors": "replace",
              "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder
