"""Style-LoRA training (one style, or a pack of styles trained as one LoRA).

Modules, one job each:
    config      TrainConfig: every option, TOML + command line
    data        finding and checking styles / images, loading and augmenting one image, sample order
    captions    the seed's caption form and kohya's caption augmentations
    cache       VAE posterior and text-embedding caches
    noise       training noise (offset, pyramid, Perlin) and timestep sampling
    objective   eps / v targets, per-sample losses, Min-SNR weights
    optim       parameter groups and learning rates, LR schedules, clipping, Jittor optimizers
    adapters    LoRA injection / read-out for training, LoRA-GA
    checkpoint  atomic checkpoints, resume
    metrics     JSONL, TensorBoard (tfevents), loss curve, image grids
    trainer     the training loop
    plan        --dry-run

Entry point: `python -m jdiffusion_lora.cli train --config FILE.toml [--option value ...]`.
"""
