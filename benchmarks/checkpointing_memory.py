"""Peak memory and time of one LoRA training step (UNet forward + backward) with and without gradient
checkpointing, and with mixed_precision, each variant in its own process.

    python benchmarks/checkpointing_memory.py [--config sd-mini] [--latent 64] [--batch 1] [--rank 4]

Random UNet from benchmarks/unet_configs.py, LoRA on the attention projections, frozen base weights.
Peak memory is the process's peak resident set (VmHWM), which includes the weights and Jittor's
allocator cache; the second step is timed (the first compiles kernels). Timings on a shared machine are
noisy: the load average is printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(args) -> dict:
    import numpy as np

    from jdiffusion_lora import jt
    from jdiffusion_lora.lora import AdapterConfig, inject_adapter, lora_parameters
    from jdiffusion_lora.models.modeling import to_model_dtype
    from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
    from jdiffusion_lora.train import precision
    from unet_configs import UNET_CONFIGS

    cfg = dict(UNET_CONFIGS[args.config])
    jt.set_global_seed(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig(**cfg))
    for p in unet.parameters():
        p.stop_grad()
    inject_adapter(unet, config=AdapterConfig(rank=args.rank, init_up="gaussian", seed=0), targets="attn")
    precision.cast_frozen([unet], args.mixed_precision)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = lora_parameters(unet)
    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32))
    ctx = jt.array(rng.standard_normal((args.batch, 77, cfg["cross_attention_dim"])).astype(np.float32))
    target = jt.array(rng.standard_normal((args.batch, 4, args.latent, args.latent)).astype(np.float32))

    def step():
        pred = unet(to_model_dtype(x, unet), np.full(args.batch, 500.0, np.float32), to_model_dtype(ctx, unet)).sample
        loss = ((pred.float32() - target) ** 2).mean()
        grads = jt.grad(loss, params)
        jt.sync(grads)
        return float(loss.item())

    step()
    jt.gc()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_rss_mb()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sd-mini")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)))
        return 0
    variants = [("plain", []), ("checkpointing", ["--checkpointing"]),
                ("bf16", ["--mixed-precision", "bf16"]),
                ("bf16 + checkpointing", ["--mixed-precision", "bf16", "--checkpointing"])]
    results = {}
    for name, extra in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--config", args.config,
               "--latent", str(args.latent), "--batch", str(args.batch), "--rank", str(args.rank), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {name} failed")
        results[name] = json.loads(lines[-1][7:])
    load = os.getloadavg()
    print(f"UNet '{args.config}', latents {args.latent}x{args.latent} (images {8 * args.latent}px), batch "
          f"{args.batch}, LoRA rank {args.rank} on attention; forward + backward; peak RSS of each process; "
          f"load average {load[0]:.1f} (shared machine: times are noisy)")
    print("| variant | peak memory (MB) | vs plain | s/step |")
    print("|---|---|---|---|")
    base = results["plain"]["peak_mb"]
    for name, _ in variants:
        r = results[name]
        print(f"| {name} | {r['peak_mb']:.0f} | {r['peak_mb'] / base:.2f}x | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
