"""UNet forward and forward+backward time: jdiffusion-lora (Jittor) vs diffusers (PyTorch), same config, same inputs.

    python benchmarks/unet_step.py [--config small|sd-mini] [--repeats 5] [--threads 2]

Jittor compiles kernels the first time it sees a shape; that one-time cost is reported
separately ("first call") from the steady-state median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("FIX_TORCH_ERROR", "0")
import jdiffusion_lora  # noqa: E402  (configures Jittor before torch is imported)
from jdiffusion_lora import jt  # noqa: E402
from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
import numpy as np  # noqa: E402

from unet_configs import UNET_CONFIGS as CONFIGS  # noqa: E402  (benchmarks/ is on sys.path)


def timed_pair(fn_a, fn_b, repeats):
    """First-call times and steady-state medians of two functions, calls interleaved a, b, a, b, ...

    Interleaving makes both sides see the same background load on a shared machine.
    """
    firsts, times = [], ([], [])
    for fn in (fn_a, fn_b):
        start = time.perf_counter()
        fn()
        firsts.append(time.perf_counter() - start)
    for _ in range(repeats):
        for fn, bucket in zip((fn_a, fn_b), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return firsts[1], statistics.median(times[0]), statistics.median(times[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = TorchUNet(**CONFIGS[args.config])
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = UNet2DConditionModel.from_pretrained(tmp)

    rng = np.random.default_rng(0)
    b, s, d = args.batch, args.latent, CONFIGS[args.config]["cross_attention_dim"]
    x = rng.standard_normal((b, 4, s, s), dtype=np.float32)
    ctx = rng.standard_normal((b, 77, d), dtype=np.float32)
    t = np.array([10, 500][:b] * (b // 2 + 1), dtype=np.int64)[:b]

    xt, ct, tt = torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(t)
    xj, cj, tj = jt.array(x), jt.array(ctx), jt.array(t)

    def torch_fwd():
        with torch.no_grad():
            ref(xt, tt, ct).sample

    def torch_fwd_bwd():
        ref.zero_grad(set_to_none=True)
        ref(xt, tt, ct).sample.square().mean().backward()

    def jt_fwd():
        with jt.no_grad():
            ours(xj, tj, cj).sample.sync()

    params = [p for p in ours.parameters()]

    def jt_fwd_bwd():
        # every parameter gets its gradient, as in diffusers' backward
        loss = ours(xj, tj, cj).sample.sqr().mean()
        grads = jt.grad(loss, params)
        jt.sync(grads)

    rows = []
    for name, tf, jf in (("forward", torch_fwd, jt_fwd), ("forward+backward", torch_fwd_bwd, jt_fwd_bwd)):
        # Jittor's eval() also stop-grads every parameter, so the backward pass needs train mode
        # (both configs have dropout 0: train and eval compute the same thing).
        for model in (ours, ref):
            model.train() if name == "forward+backward" else model.eval()
        j_first, t_med, j_med = timed_pair(tf, jf, args.repeats)
        rows.append((name, t_med, j_med, j_first))
    n_params = sum(p.numel() for p in ref.parameters())
    print(f"UNet '{args.config}' ({n_params / 1e6:.2f}M params), batch {b}, latents {s}x{s}, "
          f"{args.threads} threads, jittor {jt.__version__} ({jdiffusion_lora.DEVICE}), torch {torch.__version__}")
    print(f"| pass | diffusers (s) | jdiffusion-lora (s) | ratio (ours/diffusers) | jittor first call incl. compile (s) |")
    print(f"|---|---|---|---|---|")
    for name, t_med, j_med, j_first in rows:
        print(f"| {name} | {t_med:.3f} | {j_med:.3f} | {j_med / t_med:.2f}x | {j_first:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
