"""Data-parallel training on this machine's CPU: 2 ranks under mpirun (1 thread each) against one
process with 2 threads, same work (the demo config, global batch 2), each side in its own process.

    python benchmarks/data_parallel.py [--steps 8] [--warmup 2]

Prints steps/s and samples/s over the steps after the warm-up ones (Jittor compiles kernels in the
first steps), and for the 2-rank run the share of the step time spent in the gradient all-reduce
(`allreduce_s` in metrics.jsonl: the all-reduce itself plus waiting for the slower rank). Timings on a
shared machine are noisy: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(out: str, steps: int):
    return [sys.executable, "-m", "jdiffusion_lora.cli", "train", "--config", "configs/demo.toml",
            "--max-train-steps", str(steps), "--output-dir", out, "--global-batch-size", "2", "--no-before-after",
            "--no-progress-bar", "--sample-every", "0", "--save-every", "0", "--no-tensorboard"]


def measure(out: str, warmup: int) -> dict:
    """Rates over steps warmup+1..last, from the cumulative it_per_s the trainer logs at every step."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if "it_per_s" in r]
    elapsed = {r["step"]: r["step"] / r["it_per_s"] for r in rows}   # seconds since the loop began
    last = rows[-1]["step"]
    seconds = elapsed[last] - elapsed[warmup]
    steps = last - warmup
    comm = sum(r.get("allreduce_s", 0.0) for r in rows if r["step"] > warmup)
    return {"steps_per_s": steps / seconds, "samples_per_s": 2 * steps / seconds, "allreduce_share": comm / seconds,
            "step_s": seconds / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if shutil.which("mpirun") is None:
        print("needs OpenMPI's mpirun")
        return 2
    env = dict(os.environ, PYTHONPATH=REPO, JDIFFUSION_DEVICE="cpu")
    mpi = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"]
                                                                           if os.geteuid() == 0 else [])
    print(f"load average before: {os.getloadavg()}  (shared machine: timings are noisy)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prefix, threads in (("1 process, 2 threads", [], "2"), ("2 ranks, 1 thread each", mpi, "1")):
            out = os.path.join(tmp, name.split(",")[0].replace(" ", "_"))
            r = subprocess.run(prefix + train_command(out, args.steps), cwd=REPO, env=dict(env, OMP_NUM_THREADS=threads),
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr[-3000:])
                return 1
            results[name] = measure(out, args.warmup)
    print(f"load average after: {os.getloadavg()}")
    print(f"\ndemo config (64 px, tiny model, LoRA rank 4), global batch 2, steps {args.warmup + 1}..{args.steps}:")
    print("| run | steps/s | samples/s | s/step | all-reduce share |")
    print("|---|---|---|---|---|")
    for name, m in results.items():
        share = f"{m['allreduce_share']:.1%}" if "ranks" in name else "-"
        print(f"| {name} | {m['steps_per_s']:.3f} | {m['samples_per_s']:.3f} | {m['step_s']:.2f} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
