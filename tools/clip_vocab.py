"""Write CLIP's real tokenizer files (vocab.json + merges.txt, transformers layout) from OpenAI's BPE list.

    pip download open_clip_torch --no-deps -d /tmp/oc && unzip -o /tmp/oc/open_clip_torch-*.whl -d /tmp/oc
    python -m tools.clip_vocab /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz --out jdiffusion_lora/assets/tiny-sd/tokenizer

The BPE list (MIT, OpenAI CLIP) ships in the `open_clip_torch` wheel on PyPI; model hubs are not needed.
CLIP keeps the first 49152 - 256 - 2 = 48894 merges. Its vocabulary is, in this order: the 256 byte
symbols, the same with `</w>`, one token per merge (the merged pair), then <|startoftext|> and
<|endoftext|>: 49408 tokens, ids 49406 / 49407 for the two specials.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from typing import List, Optional

from jdiffusion_lora.models.clip_tokenizer import bytes_to_unicode

NUM_MERGES = 49152 - 256 - 2
TOKENIZER_CONFIG = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "do_lower_case": True,
                    "tokenizer_class": "CLIPTokenizer"}


def read_merges(bpe_path: str) -> List[str]:
    opener = gzip.open if bpe_path.endswith(".gz") else open
    with opener(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:NUM_MERGES + 1]            # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {NUM_MERGES} merge lines of two symbols after the header")
    return merges


def build_vocab(merges: List[str]) -> List[str]:
    symbols = sorted(bytes_to_unicode().values())     # CLIP's order: printable bytes first = ascending code point
    return symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] \
        + ["<|startoftext|>", "<|endoftext|>"]


def write_tokenizer(bpe_path: str, out: str) -> None:
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bpe", help="bpe_simple_vocab_16e6.txt(.gz)")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    a = p.parse_args(argv)
    write_tokenizer(a.bpe, a.out)
    print(f"wrote {a.out}/vocab.json, merges.txt, tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
