"""Command line: `python -m jdiffusion_lora.cli <command> ...` (also installed as `jdiffusion-lora`).

Under `mpirun -np N` (train, generate) a rank that fails exits at once, so mpirun stops the others
instead of leaving them waiting in a collective."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Each module has add_parser(subparsers), which registers its command and sets `func`.
COMMANDS = ["txt2img", "train", "lora", "evaluate", "generate", "package", "pez"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jdiffusion_lora.cli",
                                     description="Stable Diffusion LoRA tools on Jittor")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..train import distributed as dist
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        if dist.active():  # under mpirun: leave at once so that mpirun stops the other ranks too
            dist.abort_on_error(str(e), 2)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if not dist.active():
            raise
        import traceback
        traceback.print_exc()
        dist.abort_on_error("stopped by the exception above", 1)
