"""Style-LoRA training (one style, or a pack of styles trained as one LoRA).

Modules, one job each:
    config      TrainConfig: every option, TOML + command line
    data        finding and checking styles / images, loading and augmenting one image, sample order
    captions    the 2024 challenge pack's caption form and kohya's caption augmentations
    cache       VAE posterior and text-embedding caches
    batches     sample i: its image, augmentation, latent (cached), noise and timestep; class images
    noise       training noise (offset, pyramid, Perlin) and timestep sampling
    objective   eps / v targets, per-sample losses, Min-SNR weights, the loss of a micro-batch
    optim       parameter groups and learning rates, LR schedules, clipping, Jittor optimizers
    adapters    LoraPair (one adapted layer), LoRA injection / read-out for training, LoRA-GA
    checkpoint  atomic checkpoints, the LoRA files, resume
    sampling    sample images during training, their scores, the loss curve
    logging     JSONL, TensorBoard (tfevents), progress bar, loss curve, image grids
    distributed data parallel on Jittor's MPI: batch split, one all-reduce per step, one writer
    trainer     the training loop (start here)
    dry_run     --dry-run

Entry point: `python -m jdiffusion_lora.cli train --config FILE.toml [--option value ...]`.
"""
