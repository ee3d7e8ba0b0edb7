"""`pez`: find a hard prompt per style with PEZ (generate/pez.py) and write {style: prompt} JSON for --pez."""
from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pez", help="optimise a K-token hard prompt per style against its references (PEZ)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root with <NN>/images/*.png")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (e.g. the clip_r scorer's)")
    p.add_argument("--styles", default=None, help="comma-separated style ids (default: all)")
    p.add_argument("--tokens", type=int, default=8, help="prompt length K")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--init", default=None, help="start from this prompt (default: random tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pez.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..generate.pez import optimize_prompt
    from ..generate.start import reference_paths
    from ..models.clip_tokenizer import CLIPTokenizer
    from ..metrics.nets.clip_vision import CLIPModel
    from ..weights import atomic_write_bytes

    styles = ([s.strip() for s in args.styles.split(",") if s.strip()] if args.styles else
              sorted(d for d in os.listdir(args.data) if os.path.isdir(os.path.join(args.data, d, "images"))))
    if not styles:
        raise FileNotFoundError(f"no <NN>/images folders under {args.data}")
    clip, tokenizer = CLIPModel.from_pretrained(args.clip), CLIPTokenizer.from_pretrained(args.clip)
    clip.eval()
    out = {}
    for style in styles:
        r = optimize_prompt(clip, tokenizer, reference_paths(args.data, style), num_tokens=args.tokens,
                            steps=args.steps, lr=args.lr, seed=args.seed, init_prompt=args.init, progress=True)
        out[style] = {"prompt": r.prompt, "similarity": r.similarity, "start_prompt": r.start_prompt,
                      "start_similarity": r.start_similarity}
        print(f"{style}: {r.prompt!r}  CLIP similarity {r.start_similarity:.4f} -> {r.similarity:.4f}")
    atomic_write_bytes(args.out, [json.dumps(out, indent=2, ensure_ascii=False).encode("utf-8")])
    print(f"wrote {args.out} (use: generate --pez {args.out} --template '{{trigger}},{{pez}},{{prompt}}')")
    return 0
