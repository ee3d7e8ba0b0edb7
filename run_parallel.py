#!/usr/bin/env python
"""`infer.py` sharded over workers: one per GPU, else CPU processes (`--workers N`, default auto).

Thin wrapper over `python -m jdiffusion_lora.cli generate --workers auto`."""
import sys

from jdiffusion_lora.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--workers" or a.startswith("--workers=") for a in argv):
        argv = ["--workers", "auto", *argv]
    sys.exit(main(["generate", *argv]))
