"""`evaluate`: score generated images like the competition's checker (per style and overall).

    python -m jdiffusion_lora.cli evaluate --generated OUT --references ROOT [--weights DIR]
    python -m jdiffusion_lora.cli evaluate --compare A/scores.json B/scores.json
"""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score generated images against style references (competition metrics)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Computes dino, hist, fid, lpips, clip_iqa, clip_r and the competition total per style. "
                    "Metrics whose network weights are missing are reported as not computed.")
    p.add_argument("--generated", help="submission folder: <generated>/<NN>/<prompt>.png")
    p.add_argument("--references", help="dataset root: <references>/<NN>/images/*.png")
    p.add_argument("--weights", default=None,
                   help="folder with the scoring networks (when not given: $JDIFFUSION_SCORER_WEIGHTS); "
                        "see jdiffusion_lora/metrics/evaluate.py for the layout")
    p.add_argument("--out", default=None, help="where scores.json and the charts go (when not given: <generated>_scores)")
    p.add_argument("--metrics", default="dino,hist,fid,lpips,clip_iqa,clip_r", help="comma-separated subset")
    p.add_argument("--styles", default=None, help="comma-separated style ids (default: all)")
    p.add_argument("--style", default=None,
                   help="style id of a --generated folder that holds one style's images directly")
    p.add_argument("--fid-dims", type=int, default=64, choices=[64, 192, 768, 2048],
                   help="InceptionV3 feature size (the competition uses 64)")
    p.add_argument("--clip-iqa-backbone", default="rn50", choices=["rn50", "clip"],
                   help="rn50: OpenAI CLIP RN50 (CLIP-IQA's own); clip: the CLIP folder used for clip_r")
    p.add_argument("--clip-r-scope", default="all", choices=["all", "style"],
                   help="all: an image's prompt competes with every style's prompts; style: only its own style's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="show two scores.json files (or folders holding one) side by side and exit")
    p.set_defaults(func=run)


def _scores_path(path: str) -> str:
    return os.path.join(path, "scores.json") if os.path.isdir(path) else path


def run(args) -> int:
    from ..metrics.evaluate import evaluate_folder
    from ..metrics.report import compare_files, format_table, write_charts, write_scores_json

    if args.compare:
        a, b = (_scores_path(p) for p in args.compare)
        for p in (a, b):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"scores file not found: {p}")
        print(compare_files(a, b))
        return 0
    if not args.generated or not args.references:
        raise ValueError("--generated and --references are required (or use --compare A B)")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    styles = [s.strip() for s in args.styles.split(",")] if args.styles else None
    out = args.out or os.path.normpath(args.generated).rstrip(os.sep) + "_scores"

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    scores = evaluate_folder(args.generated, args.references, weights=args.weights, metrics=metrics,
                             styles=styles, style=args.style, fid_dims=args.fid_dims, batch_size=args.batch_size,
                             clip_iqa_backbone=args.clip_iqa_backbone, clip_r_scope=args.clip_r_scope, log=log)
    print(format_table(scores))
    write_scores_json(scores, os.path.join(out, "scores.json"))
    print(f"\nwrote {os.path.join(out, 'scores.json')}")
    if not args.no_charts:
        paths = write_charts(scores, out)
        print(f"wrote {len(paths)} chart(s) to {out}/ (style_<NN>.png, overview.png)")
    return 0
