#!/usr/bin/env python
"""Generate a submission: `python infer.py --data <dataset> --lora <file> --out <dir>` (see --help).

Thin wrapper over `python -m jdiffusion_lora.cli generate`."""
import sys

from jdiffusion_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
