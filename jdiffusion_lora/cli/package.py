"""`package`: check a generated folder against the prompts and write the submission zip + contact sheets.

    python -m jdiffusion_lora.cli package --out outputs/sub --data styles --size 512 [--zip [PATH]] [--sheets [DIR]]

Exit code 0 when the folder is complete (and the zip was written), 1 when something is missing,
extra, misnamed or bad (each one is listed), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("package", help="check generated images and write the submission zip",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="the generated folder (<out>/<NN>/<prompt>.png)")
    p.add_argument("--data", default=None, help="dataset root with <NN>/prompt.json (and reference images)")
    p.add_argument("--prompts", default=None, help="prompt file instead of --data (JSON, see generate)")
    p.add_argument("--styles", default=None, help="comma-separated style ids (default: all)")
    p.add_argument("--size", default=None,
                   help="expected image size, 512 or 512x512 (default: the size recorded in manifest.json)")
    p.add_argument("--zip", nargs="?", const=None, default=None, metavar="PATH",
                   help="zip to write (written by default; a bare --zip means <out>.zip)")
    p.add_argument("--sheets", nargs="?", const=None, default=None, metavar="DIR",
                   help="contact-sheet folder (written by default; a bare --sheets means <out>_sheets)")
    p.add_argument("--no-sheets", action="store_true")
    p.add_argument("--check-only", action="store_true", help="check, write nothing")
    p.add_argument("--images-only", action="store_true", help="leave manifest.json and SHA256SUMS out of the zip")
    p.set_defaults(func=run)


def _parse_size(text):
    w, _, h = str(text).lower().partition("x")
    return int(w), int(h or w)


def _size_from_manifest(out_dir):
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        images = json.load(f).get("images", {})
    sizes = {tuple(rec["size"]) for rec in images.values() if rec.get("size")}
    return sizes.pop() if len(sizes) == 1 else None


def run(args) -> int:
    from ..generate.contact_sheet import write_contact_sheets
    from ..generate.package import check_output, expected_from_inputs, write_zip
    from ..generate.plan import read_inputs

    out_dir = args.out.rstrip("/")
    styles = [s for s in args.styles.split(",") if s.strip()] if args.styles else None
    inputs, _ = read_inputs(args.data, args.prompts, styles)
    expected = expected_from_inputs(inputs)
    size = _parse_size(args.size) if args.size else _size_from_manifest(out_dir)
    report = check_output(out_dir, expected, size)
    n = sum(len(v) for v in expected.values())
    print(f"{out_dir}: {len(expected)} style(s), {n} prompt(s), size "
          + (f"{size[0]}x{size[1]}" if size else "not checked (pass --size)"))
    for line in report.lines():
        print("  " + line)
    if not args.check_only and not args.no_sheets:
        sheets = write_contact_sheets(out_dir, expected, args.sheets or out_dir + "_sheets", args.data)
        print(f"contact sheets: {len(sheets)} in {os.path.dirname(sheets[0]) if sheets else '-'}/")
    if not report.ok:
        print(f"error: {len(report.lines())} problem(s); no zip written", file=sys.stderr)
        return 1
    if args.check_only:
        print("ok: complete")
        return 0
    zip_path = args.zip or out_dir + ".zip"
    names = write_zip(out_dir, report, zip_path, include_manifest=not args.images_only)
    print(f"ok: wrote {zip_path} ({len(names)} entries)")
    return 0
