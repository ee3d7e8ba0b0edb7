"""`train`: train a style LoRA (one style or a pack) from a TOML config; any option overridable.

    python -m jdiffusion_lora.cli train --config configs/demo.toml --max-train-steps 200
    python -m jdiffusion_lora.cli train --config configs/demo.toml --dry-run
    python -m jdiffusion_lora.cli train --config configs/demo.toml --resume latest
"""
from __future__ import annotations

import argparse
import signal
import sys


def add_parser(subparsers) -> None:
    from ..train.config import add_arguments
    p = subparsers.add_parser("train", help="train a style LoRA (one style or a pack of styles)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config_file", default=None,
                   help="TOML file with the options (tables only group keys; kohya's names are read too)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the data, print every caption, the plan, parameter counts and a memory "
                        "estimate, then exit")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import build_config, overrides_from_args, to_toml
    config = build_config(args.config, overrides_from_args(args),
                          note=lambda line: print(f"note: {line}", file=sys.stderr))
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    from .._runtime import announce_device
    announce_device()
    if args.dry_run:
        from ..train.dry_run import dry_run
        return dry_run(config)

    from ..models.checkpointing import LiveOpLimitError
    from ..train import distributed as dist
    from ..train.checkpoint import CheckpointError
    from ..train.objective import NonFiniteLoss
    from ..train.trainer import Trainer
    try:
        result = Trainer(config).run()
    except NonFiniteLoss as e:  # every rank learns of it in the same all-reduce and stops alike
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (CheckpointError, LiveOpLimitError) as e:
        return fail(str(e), 2)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        return fail(str(e), 4)
    if not dist.is_writer():  # under mpirun rank 0 reports and compares
        return 128 + int(result.signal or signal.SIGINT) if result.stopped == "signal" else 0
    print()
    print(f"trained {result.step} step(s); last loss {result.last_loss:.4f}"
          + (f" ({dist.world_size()} ranks)" if dist.active() else ""))
    for path in result.lora_files:
        print(f"  LoRA:        {path}")
    if result.checkpoint:
        print(f"  checkpoint:  {result.checkpoint} (resume with --resume latest)")
    if result.samples:
        print(f"  samples:     {result.samples[-1]} ({len(result.samples)} grid(s) in {config.output_dir}/samples)")
    if result.loss_curve:
        print(f"  loss curve:  {result.loss_curve}")
    print(f"  metrics:     {config.output_dir}/metrics.jsonl" +
          (f", TensorBoard logs in {config.output_dir}/tensorboard" if config.tensorboard else ""))
    if result.stopped == "signal":
        return 128 + int(result.signal or signal.SIGINT)
    if config.before_after and result.lora_files:
        from ..train.compare import run_before_after
        print()
        run_before_after(config, result.lora_files)
    return 0


def fail(message: str, code: int) -> int:
    """Print an error; under mpirun leave at once (this rank alone failed: mpirun then stops the others)."""
    from ..train import distributed as dist
    if dist.active():
        dist.abort_on_error(message, code)
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """`python -m jdiffusion_lora.cli.train ...` (the same as `python -m jdiffusion_lora.cli train ...`)."""
    parser = argparse.ArgumentParser(prog="python -m jdiffusion_lora.cli.train")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
