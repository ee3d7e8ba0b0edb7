"""GPU check: CUDA against CPU parity of the three models, one bf16 training step, the real-size benchmark.

    python benchmarks/gpu_check.py             # on a machine with a CUDA GPU (found by jdiffusion_lora._runtime)
    python benchmarks/gpu_check.py --dry-run   # on CPU with the built-in tiny model: the same code path,
                                               # "cuda" runs on the CPU too (what the tests run)

Prints one table (check | device | result | detail) with the date, Jittor's version and the GPU's name.
Record it in the README with its date whenever a GPU is available.

Checks:
1. parity: the UNet, the VAE (encode + decode) and the text encoder, random weights, the same inputs
   run with jt.flags.use_cuda = 0 and = 1 in one process; relative error against the CPU output
   (float32, tensor cores off: expected below 1e-4);
2. one LoRA training step with mixed_precision = "bf16" through the Trainer (loss finite, the base
   weights bfloat16, the LoRA float32), then a second step timed;
3. the real-size benchmark, `benchmarks/real_size.py` (SD 2.1 at 512 px, ours against diffusers + PEFT),
   when that file exists; skipped cleanly otherwise and in the dry run.

Carrying packages to the GPU machine (see the workplace's device README): a package missing there
travels as wheels built for its Python (3.12, x86-64). Once, in the repo's root:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl jittor==1.3.11 ...          # and each missing dependency, one version of each
then name `.whl` in the run's `carry` and start the command with
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; python3 benchmarks/gpu_check.py
(Jittor compiles its CUDA kernels on first use there: allow a few minutes in the run's timeout.)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PARITY_TOL = 1e-4


def device_name() -> str:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "no GPU"


@contextlib.contextmanager
def on(jt, cuda: bool, dry_run: bool):
    """Run the block with jt.flags.use_cuda set (left at 0 in the dry run)."""
    saved = jt.flags.use_cuda
    jt.flags.use_cuda = int(cuda and not dry_run)
    try:
        yield
    finally:
        jt.flags.use_cuda = saved


def relative(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def parity_rows(pipe, jt, dry_run: bool):
    """(name, relative error, seconds on the device) of each model, device against CPU."""
    import numpy as np
    rng = np.random.default_rng(0)
    factor = pipe.vae_scale_factor
    size = factor * pipe.unet.config.sample_size
    ids = np.array(pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                                  truncation=True)["input_ids"])
    latents = rng.standard_normal((1, pipe.unet.config.in_channels, size // factor, size // factor)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    ctx = None

    def text():
        return pipe.text_encoder(jt.array(ids)).last_hidden_state.numpy()

    def unet():
        return pipe.unet(jt.array(latents), 500.0, jt.array(ctx)).sample.numpy()

    def vae():
        posterior = pipe.vae.encode(jt.array(image)).latent_dist
        return pipe.vae.decode(posterior.mean).sample.numpy()

    rows = []
    with jt.no_grad():
        for name, fn in (("text_encoder", text), ("unet", unet), ("vae", vae)):
            with on(jt, False, dry_run):
                cpu = fn()
            with on(jt, True, dry_run):
                fn()                                    # compile
                start = time.perf_counter()
                dev = fn()
                seconds = time.perf_counter() - start
            if name == "text_encoder":
                ctx = cpu
            rows.append((name, relative(dev, cpu), seconds))
    return rows


def train_row(jt, dry_run: bool, workdir: str):
    """One bf16 LoRA step through the Trainer on the demo style 00, then one more, timed."""
    from jdiffusion_lora.train.config import build_config
    from jdiffusion_lora.train.trainer import Trainer
    c = build_config(None, dict(output_dir=os.path.join(workdir, "train"), data_root=os.path.join(REPO, "styles"),
                                styles=["00"], resolution=32 if dry_run else 256, max_train_steps=2,
                                mixed_precision="bf16", progress_bar=False, tensorboard=False,
                                text_encoder_targets=["q_proj", "k_proj", "v_proj"]))
    notes = []
    with on(jt, True, dry_run):
        trainer = Trainer(c, printer=notes.append)
        trainer.setup()
        first = trainer.train_step(0)
        start = time.perf_counter()
        second = trainer.train_step(1)
        seconds = time.perf_counter() - start
    ok = all(m["loss"] == m["loss"] and abs(m["loss"]) != float("inf") for m in (first, second))
    dtypes = f"unet {trainer.unet.dtype}, LoRA {trainer.params[0].dtype}"
    return ok, seconds, f"loss {first['loss']:.4f} -> {second['loss']:.4f}; {dtypes}"


def real_size_row(dry_run: bool):
    script = os.path.join(HERE, "real_size.py")
    if not os.path.isfile(script):
        return "skipped", "benchmarks/real_size.py is not in this checkout", []
    if dry_run:
        return "skipped", "dry run (the real-size benchmark needs the GPU's memory and time)", []
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=REPO)
    tail = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    if proc.returncode != 0:
        return "FAILED", (proc.stderr.strip().splitlines() or ["(no output)"])[-1], tail
    return "ok", "its table follows", tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny model: exercise the script's code path")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import jdiffusion_lora
    from jdiffusion_lora import jt
    if not args.dry_run and jdiffusion_lora.DEVICE != "cuda":
        print("no usable CUDA GPU (nvcc, driver, runtime): run with --dry-run on CPU", file=sys.stderr)
        return 2
    from jdiffusion_lora.tiny import build_tiny_pipeline

    device = "cpu (dry run)" if args.dry_run else "cuda"
    rows, failed = [], False
    pipe = build_tiny_pipeline()
    for name, err, seconds in parity_rows(pipe, jt, args.dry_run):
        ok = err <= PARITY_TOL
        failed |= not ok
        rows.append((f"parity {name}", device, "ok" if ok else "FAILED",
                     f"relative error vs CPU {err:.2e} (tolerance {PARITY_TOL:g}); {seconds * 1000:.1f} ms"))
    with tempfile.TemporaryDirectory() as tmp:
        ok, seconds, detail = train_row(jt, args.dry_run, tmp)
    failed |= not ok
    rows.append(("train step bf16", device, "ok" if ok else "FAILED", f"{seconds:.2f} s/step; {detail}"))
    status, detail, real_size_table = real_size_row(args.dry_run)
    failed |= status == "FAILED"
    rows.append(("real-size benchmark", device, status, detail))

    load = os.getloadavg()
    print(f"GPU check {datetime.date.today().isoformat()}: jittor {jt.__version__}, device {device_name()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| check | device | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if real_size_table:
        print("\nreal-size benchmark (benchmarks/real_size.py):")
        print("\n".join(real_size_table))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
