"""`--dry-run`: resolve the data, print every image's caption, the plan of steps, parameter counts and a
memory estimate, without loading any weights or training."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List

import numpy as np

from . import adapters as ad
from .captions import CaptionOptions, token_length, truncated_text
from .buckets import BucketOrder, make_buckets
from .data import SampleOrder, discover
from .adapters import LoraPair
from .optim import lr_lambda, pair_learning_rates


def _load_components(folder: str):
    """Tokenizer (real) and UNet / text encoder / VAE built from their configs (Jittor allocates
    parameters lazily, so nothing big is computed) plus the scheduler config."""
    from ..models.autoencoder_kl import AutoencoderKL
    from ..models.clip import CLIPTextModel
    from ..models.clip_tokenizer import CLIPTokenizer
    from ..models.unet_2d_condition import UNet2DConditionModel

    from ..hub import resolve_model
    from ..pipelines.single_file import build_unloaded, default_tokenizer, is_single_file

    folder = resolve_model(folder)
    if is_single_file(folder):
        m = build_unloaded(folder)
        tokenizer = default_tokenizer(m["text_encoder"].config.hidden_act == "gelu", None)
        return m["unet"], m["text_encoder"], m["vae"], tokenizer, m["scheduler_config"]

    def sub(name):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"component folder missing: {path}")
        return path

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sub("unet")))
    text_encoder = CLIPTextModel.from_config(CLIPTextModel.load_config(sub("text_encoder")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sub("vae")))
    tokenizer = CLIPTokenizer.from_pretrained(sub("tokenizer"))
    with open(os.path.join(sub("scheduler"), "scheduler_config.json")) as f:
        scheduler = json.load(f)
    return unet, text_encoder, vae, tokenizer, scheduler


def _count(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def _mb(n_bytes: float) -> str:
    if n_bytes < 2 ** 20:
        return f"{n_bytes / 2 ** 10:,.0f} KiB"
    return f"{n_bytes / 2 ** 20:,.0f} MiB" if n_bytes < 2 ** 30 else f"{n_bytes / 2 ** 30:,.2f} GiB"


def activation_bytes(unet_config, latent: int, batch: int, tokens: int = 77) -> float:
    """Rough float32 activation memory of one UNet forward+backward: per level, ~10 feature maps per
    ResNet and ~20 per transformer block, plus attention score matrices (self and cross)."""
    c = unet_config
    heads = c.attention_head_dim if isinstance(c.attention_head_dim, (list, tuple)) else \
        [c.attention_head_dim] * len(c.block_out_channels)
    total = 0.0
    for level, ch in enumerate(c.block_out_channels):
        hw = (latent // 2 ** level) ** 2
        layers = c.layers_per_block if isinstance(c.layers_per_block, int) else c.layers_per_block[level]
        resnets = 2 * layers + 1
        total += resnets * 10 * ch * hw
        if "CrossAttn" in c.down_block_types[level]:
            blocks = 2 * layers + 1
            total += blocks * (20 * ch * hw + 2 * heads[level] * (hw * hw + hw * tokens))
    return total * 4 * batch


def dry_run(c, printer: Callable[[str], None] = print) -> int:
    from ..tiny import tiny_model_path
    from .batches import augment

    out = printer
    folder = c.base_model or tiny_model_path()
    unet, text_encoder, vae, tokenizer, sched = _load_components(folder)
    data = discover(c)
    prediction = c.prediction_type or sched.get("prediction_type", "epsilon")
    rank = ad.total_rank(c, len(data.styles))
    alpha = ad.lora_alpha(c, len(data.styles))

    out(f"base model: {folder} ({prediction}, {sched.get('_class_name', '?')})")
    out(f"data: {c.data_root} - {len(data.styles)} style(s), {len(data.records)} training image(s), "
        f"{len(data.validation)} held out")
    for note in data.warnings:
        out(f"  warning: {note}")
    for s in data.styles:
        n = sum(r.style == s.name for r in data.records)
        out(f"  style {s.name} ({s.layout}): trigger {s.trigger!r}, {n} image(s), style tags {s.style_tags}, "
            f"{len(s.prompts)} prompt(s)")

    buckets = None
    if c.enable_bucket:
        buckets = make_buckets([r.size for r in data.records], c)
        order = BucketOrder(buckets, c.train_batch_size, c.seed)
        out("")
        out(f"aspect-ratio buckets ({len(buckets.sizes)}; area <= {c.resolution}x{c.resolution}, step "
            f"{c.bucket_reso_steps}, {c.min_bucket_reso}..{c.max_bucket_reso}"
            + (", no upscaling" if c.bucket_no_upscale else "") + f"; a pass is {order.pass_length} samples, "
            f"batches of {c.train_batch_size} from one bucket):")
        for line in buckets.table([f"{r.style}/{os.path.basename(r.path)}" for r in data.records]):
            out(line)
    else:
        order = SampleOrder(len(data.records), c.seed)

    out("")
    out("captions (each image at its first appearance in pass 1, exactly as trained):")
    opts = CaptionOptions.from_config(c)
    per_step = c.train_batch_size * c.gradient_accumulation_steps
    first_seen: Dict[int, int] = {}
    for pos in range(getattr(order, "pass_length", len(data.records))):
        _, item = order(pos)
        first_seen.setdefault(item, pos)
    longest = 0
    for item, rec in enumerate(data.records):
        index = first_seen[item]
        aug = augment(c, data, data.records, order, opts, index, index // per_step, buckets)
        n_tokens = token_length(tokenizer, aug.caption)
        longest = max(longest, n_tokens)
        flag = " [flipped]" if aug.flip else ""
        out(f"  {rec.style}/{os.path.basename(rec.path)}{flag}: {aug.caption}")
        if n_tokens > c.max_token_length:
            out(f"    ({n_tokens} tokens; truncated to {c.max_token_length}: "
                f"{truncated_text(tokenizer, aug.caption, c.max_token_length)!r})")
    out(f"  longest caption: {longest} tokens (limit {c.max_token_length})")

    out("")
    out("plan:")
    samples = c.max_train_steps * per_step
    out(f"  {c.max_train_steps} optimizer steps x (batch {c.train_batch_size} x accumulation "
        f"{c.gradient_accumulation_steps}) = {samples} samples = {samples / len(data.records):.1f} passes over "
        f"{len(data.records)} images" + (" (+ as many class images)" if c.with_prior_preservation else ""))
    out(f"  resolution {c.resolution}, crop {c.crop}, flip p={c.flip_p}, loss {c.loss_type}"
        + (f", min-SNR gamma {c.min_snr_gamma}" if c.min_snr_gamma else "")
        + f", timesteps {c.timestep_sampling} in [{c.timestep_min}, {c.timestep_max or sched.get('num_train_timesteps', 1000)})")
    lam = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.max_train_steps, c.lr_num_cycles, c.lr_power,
                    lr_init=c.learning_rate)
    marks = sorted({0, min(c.lr_warmup_steps, c.max_train_steps - 1), c.max_train_steps // 4,
                    c.max_train_steps // 2, 3 * c.max_train_steps // 4, c.max_train_steps - 1})
    out(f"  {c.optimizer}, lr {c.learning_rate:g} ({c.lr_scheduler}): "
        + ", ".join(f"step {m + 1}: {c.learning_rate * lam(m):.3g}" for m in marks))
    saves = list(range(c.save_every, c.max_train_steps, c.save_every)) if c.save_every else []
    saves.append(c.max_train_steps)
    shown = ", ".join(str(s) for s in saves[:8]) + (" ..." if len(saves) > 8 else "")
    out(f"  checkpoints at steps {shown} (keep last {c.keep_last}), formats {', '.join(c.save_formats)} "
        f"({c.save_dtype}) -> {c.output_dir}")
    if c.sample_every:
        out(f"  sample grid every {c.sample_every} steps ({c.sample_steps} sampler steps, seed {c.sample_seed})")
    if c.resume:
        out(f"  resume: {c.resume}")

    out("")
    out("parameters:")
    out(f"  base: unet {_count(unet):,}, text encoder {_count(text_encoder):,}, vae {_count(vae):,} (frozen)")
    models = {"unet": unet, "text_encoder": text_encoder}
    counts = ad.count_target_params(models, c, len(data.styles))
    lora_total = 0
    for comp, (layers, n) in counts.items():
        lora_total += n
        out(f"  LoRA on {comp}: {layers} layers, rank {rank}, alpha {alpha:g}, {n:,} trainable parameters")
    out(f"  LoRA total: {lora_total:,} parameters ({_mb(lora_total * 4)} in fp32)")
    groups: Dict[str, List[int]] = {}
    from ..lora.inject import find_target_modules
    for comp in counts:
        targets = c.unet_targets if comp == "unet" else c.text_encoder_targets
        for name, m in find_target_modules(models[comp], list(targets)).items():
            shape = tuple(m.weight.shape)
            fake = LoraPair(f"{comp}.{name}", comp, np.broadcast_to(np.float32(0), (rank,) + shape[1:]),
                            np.broadcast_to(np.float32(0), (shape[0], rank)))
            for side, lr in pair_learning_rates(fake, c).items():
                key = f"{comp} {side} lr={lr:.6g}"
                groups.setdefault(key, [0, 0])
                groups[key][0] += 1
                groups[key][1] += int(np.prod(fake.down.shape if side == "down" else fake.up.shape))
    out("  parameter groups:")
    for key, (tensors, n) in groups.items():
        out(f"    {key}: {tensors} tensors, {n:,} parameters")

    out("")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = c.resolution // factor
    batch = c.train_batch_size * (2 if c.with_prior_preservation else 1)
    weights = (_count(unet) + _count(text_encoder) + _count(vae)) * (4 if c.mixed_precision == "no" else 2)
    states = {"AdamW": 2, "Adam": 2, "Adan": 4, "SGD": 1, "RMSprop": 1}[c.optimizer]
    trainable = lora_total * 4 * (3 + states + (1 if c.ema_decay else 0))
    acts = activation_bytes(unet.config, latent, batch)
    out(f"memory estimate (weights in {'float32' if c.mixed_precision == 'no' else c.mixed_precision}"
        f"{', activations before gradient checkpointing' if c.gradient_checkpointing else ''}):")
    out(f"  weights {_mb(weights)} + LoRA, gradients and optimizer state {_mb(trainable)} + UNet activations "
        f"~{_mb(acts)} (rough) = ~{_mb(weights + trainable + acts)}")
    out("")
    out("dry run: nothing was trained or written")
    return 0
