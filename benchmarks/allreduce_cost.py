"""What the gradient all-reduce of data-parallel training costs for the seed's pack LoRA.

    python benchmarks/allreduce_cost.py [--rank 896] [--step-seconds 0.45] [--dtype-bytes 4]

Counts the LoRA parameters exactly: builds Stable Diffusion 2.1's UNet and text encoder from their
published configs (Jittor allocates parameters lazily: nothing big is computed or downloaded) and
asks the trainer's own counter (adapters.count_target_params) for the seed's targets (UNet to_q,
to_k, to_v, to_out.0; text q_proj, k_proj, v_proj) at rank 896 (28 styles x 32). Then, per optimizer
step, the bytes one flat all-reduce moves and its time with a ring all-reduce,
2 (N - 1) / N x bytes / bandwidth per rank, against the compute time of one step (the seed: about
0.45 s/step on an RTX 3090, REFERENCE section 1), and the world size from which the all-reduce takes
longer than the step's compute.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# stabilityai/stable-diffusion-2-1 unet/config.json (the keys that shape the attention layers)
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H text tower, 23 layers)
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512, max_position_embeddings=77, vocab_size=49408)

# Effective all-reduce bandwidths (bytes/s per rank, NCCL "bus bandwidth"-like figures; assumptions).
LINKS = [
    ("NVLink (A100 SXM, NCCL ring)", 200e9),
    ("PCIe 4.0 x16 (NCCL, no NVLink)", 20e9),
    ("PCIe, Jittor MPI via host memory", 6e9),
    ("100 Gb/s InfiniBand (2 machines)", 11e9),
    ("25 Gb/s Ethernet (2 machines)", 2.9e9),
    ("10 Gb/s Ethernet (2 machines)", 1.15e9),
]


def seed_pack_parameters(rank: int) -> dict:
    from jdiffusion_lora.models.clip import CLIPTextModel
    from jdiffusion_lora.models.unet_2d_condition import UNet2DConditionModel
    from jdiffusion_lora.train import adapters as ad
    from jdiffusion_lora.train.config import TrainConfig

    models = {"unet": UNet2DConditionModel.from_config(SD21_UNET),
              "text_encoder": CLIPTextModel.from_config(SD21_TEXT)}
    c = TrainConfig(rank=rank, pack_rank=False, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                    text_encoder_targets=["q_proj", "k_proj", "v_proj"])
    return {comp: n for comp, (_, n) in ad.count_target_params(models, c, 1).items()}


def analytic_parameters(rank: int) -> int:
    """The same count by hand: per transformer block of width C, self-attention 4 x r (C + C), cross-attention
    to_q, to_out r (C + C) and to_k, to_v r (1024 + C); blocks: 5 at 320, 5 at 640, 6 at 1280 (2 per down
    level, 1 mid, 3 per up level); text: 23 layers x 3 projections x r (1024 + 1024)."""
    per_block = lambda c: rank * (14 * c + 2 * 1024)  # noqa: E731
    unet = 5 * per_block(320) + 5 * per_block(640) + 6 * per_block(1280)
    return unet + 23 * 3 * rank * 2048


def ring_seconds(nbytes: float, world: int, bandwidth: float) -> float:
    return 2 * (world - 1) / world * nbytes / bandwidth


def dominating_world(nbytes: float, bandwidth: float, step_seconds: float) -> str:
    """Smallest N with ring time > compute time (2 (N-1)/N B / bw > T), or 'never' (the limit 2 B / bw <= T)."""
    for n in range(2, 1025):
        if ring_seconds(nbytes, n, bandwidth) > step_seconds:
            return str(n)
    return "never"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=896)
    p.add_argument("--step-seconds", type=float, default=0.45, help="compute time of one step on one GPU")
    args = p.parse_args(argv)

    counts = seed_pack_parameters(args.rank)
    total = sum(counts.values())
    assert total == analytic_parameters(args.rank), (total, analytic_parameters(args.rank))
    print(f"seed pack LoRA, rank {args.rank}: UNet {counts['unet']:,} + text encoder {counts['text_encoder']:,} "
          f"= {total:,} parameters (counted from the SD 2.1 configs; the hand count agrees)")
    for name, size in (("fp32", 4), ("fp16", 2)):
        print(f"  {name} gradients: {total * size / 1e9:.3f} GB per all-reduce (one per optimizer step)")
    print(f"compute: {args.step_seconds} s/step per GPU (batch 1)\n")
    worlds = (2, 4, 8, 16)
    print(f"| link (assumed all-reduce bandwidth) | " + " | ".join(f"N={n} fp32" for n in worlds)
          + " | all-reduce > compute from N (fp32 / fp16) |")
    print("|---|" + "---|" * len(worlds) + "---|")
    for name, bw in LINKS:
        cells = []
        for n in worlds:
            t = ring_seconds(total * 4, n, bw)
            cells.append(f"{t * 1000:.0f} ms ({t / args.step_seconds:.0%})")
        dom = f"{dominating_world(total * 4, bw, args.step_seconds)} / {dominating_world(total * 2, bw, args.step_seconds)}"
        print(f"| {name}, {bw / 1e9:g} GB/s | " + " | ".join(cells) + f" | {dom} |")
    print("\n(ms per step and its share of the compute time; with gradient accumulation k the all-reduce is "
          "paid once per k micro-batches, so its share divides by k)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
