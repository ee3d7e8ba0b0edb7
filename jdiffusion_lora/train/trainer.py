"""The style-LoRA training loop.

One optimizer step s uses `gradient_accumulation_steps` micro-batches of `train_batch_size`
samples. Sample i (a global counter, s * batch * accumulation + ...) is the item at position i of
the sampling order (a fresh permutation of all (style, image) pairs each pass) and owns the numpy
random streams `sample_rng(seed, i, ...)`: its crop, flip, caption, VAE posterior draw, timestep
and noise. Jittor's own generator (LoRA dropout) is re-seeded from (seed, s) at every step. So a
sample does not depend on the batch it falls in, k micro-batches of 1 equal one batch of k, and a
resumed run repeats the uninterrupted one bit for bit (CPU).

    trainer = Trainer(config)          # config: TrainConfig
    result = trainer.run()             # -> TrainResult (paths, final loss, stop reason)
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._runtime import jt
from ..weights import atomic_write_bytes
from . import adapters as ad
from .cache import LatentCache, TextCache, latent_key, sample_latent, vae_fingerprint
from .captions import CaptionOptions, caption_parts, render_caption, split_tags
from .checkpoint import (latest_checkpoint, load_training_state, resolve_resume, save_training_state,
                         write_checkpoint, writing)
from .config import TrainConfig, as_dict, to_toml
from .data import (STREAM_CLASS, STREAM_DATA, STREAM_NOISE, STREAM_VAE, STREAM_VALIDATION, DataError,
                   ImageRecord, SampleOrder, crop_box, discover, list_images, load_rgb, pixels, resized_size,
                   sample_rng)
from .metrics import MetricsLog, image_grid, plot_curves, save_png
from .noise import draw_noise, draw_timestep
from .objective import min_snr_weights, per_sample_loss, training_target
from .optim import Optimizer, build_param_groups, clip_scale, describe_groups, global_grad_norm, schedule_for

LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "lora_kohya.safetensors"}


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN/Inf; the message names the step and the culprit."""


@dataclass
class Sample:
    index: int
    source: str                  # image path (or class image path)
    caption: str
    latent: np.ndarray           # (C, h, w), scaled by the VAE scaling factor
    noise: np.ndarray            # (C, h, w)
    timestep: int
    perturbation: Optional[np.ndarray] = None
    is_class: bool = False


@dataclass
class TrainResult:
    step: int
    stopped: str                 # "done" | "signal" | "until"
    output_dir: str
    lora_files: List[str] = field(default_factory=list)
    checkpoint: Optional[str] = None
    samples: List[str] = field(default_factory=list)
    loss_curve: Optional[str] = None
    last_loss: float = float("nan")
    signal: Optional[int] = None        # the signal that stopped the run


def load_pipeline(base_model: str):
    from ..pipelines.stable_diffusion import StableDiffusionPipeline
    from ..tiny import tiny_model_path
    return StableDiffusionPipeline.from_pretrained(base_model or tiny_model_path())


def step_seed(seed: int, step: int) -> int:
    """Seed of Jittor's generator at optimizer step `step` (LoRA dropout)."""
    return int(np.random.SeedSequence([int(seed), int(step), 7]).generate_state(1)[0] % (2 ** 31 - 1))


def caption_parts_for(c, style, rec: ImageRecord, flip: bool):
    """The caption parts of one image: competition layout (trigger, style tags | item tags, stem,
    flip tag) or plain layout (trigger, style tags | the .txt caption's tags or the stem)."""
    if style.layout == "competition":
        return caption_parts(style.trigger, style.style_tags, rec.item_tags, rec.stem if c.use_file_stem else None,
                             flip, c.flip_tag, c.caption_prefix, c.caption_suffix)
    tags = split_tags(rec.caption) if rec.caption is not None else [rec.stem]
    if style.trigger and style.trigger in tags:
        tags.remove(style.trigger)
    return caption_parts(style.trigger, style.style_tags, tags, None, flip, c.flip_tag,
                         c.caption_prefix, c.caption_suffix)


@dataclass
class Augmented:
    record: ImageRecord
    pass_index: int
    flip: bool
    box: tuple
    caption: str


def augment(c, data, records: Sequence[ImageRecord], order: SampleOrder, opts: CaptionOptions, index: int,
            step: int) -> Augmented:
    """Which image sample `index` is and how it is augmented (flip, crop box, caption): a function of
    (seed, index, step) only. Draw order in the sample's data stream: flip, crop, caption."""
    pass_index, item = order(index)
    rec = records[item]
    rng = sample_rng(c.seed, index, STREAM_DATA)
    flip = bool(rng.random() < c.flip_p)
    w, h = resized_size(rec.size[0], rec.size[1], c.resolution)
    box = crop_box(w, h, c.resolution, c.crop, rng)
    caption = render_caption(caption_parts_for(c, data.style(rec.style), rec, flip), opts, rng,
                             epoch=pass_index + 1, step=step)
    return Augmented(rec, pass_index, flip, box, caption)


class Trainer:
    def __init__(self, config: TrainConfig, pipeline=None, printer: Callable[[str], None] = print):
        self.c = config
        self.pipe = pipeline
        self.print = printer
        self.ready = False
        self._stop_signal: Optional[int] = None
        self._scorer = None  # the local scorer, built on the first sample round that is scored

    # ================================================================== set-up

    def setup(self) -> None:
        if self.ready:
            return
        c = self.c
        from ..schedulers import DDPMScheduler
        if self.pipe is None:
            self.pipe = load_pipeline(c.base_model)
        pipe = self.pipe
        self.unet, self.text_encoder, self.vae, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
        self.prediction_type = c.prediction_type or pipe.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"cannot train prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=self.prediction_type)
        if pipe.scheduler.config.prediction_type != self.prediction_type:  # sample with what we train
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                              prediction_type=self.prediction_type)
        self.alphas_cumprod = np.asarray(self.noise_scheduler.alphas_cumprod, dtype=np.float64)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        max_pos = self.text_encoder.config.max_position_embeddings
        if c.max_token_length > max_pos:
            raise ValueError(f"max_token_length {c.max_token_length} exceeds the text encoder's {max_pos} positions")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if c.resolution % factor:
            raise ValueError(f"resolution must be a multiple of {factor} (the VAE's downsampling), got {c.resolution}")
        if c.gradient_checkpointing:
            self.print("note: gradient_checkpointing is not available with Jittor's graph here; training without it")

        # ---------------------------------------------------------- data
        self.data = discover(c)
        self.records: List[ImageRecord] = self.data.records
        for note in self.data.warnings:
            self.print(f"warning: {note}")
        self.order = SampleOrder(len(self.records), c.seed)
        self.caption_options = CaptionOptions.from_config(c)
        self.class_records: List[str] = []
        if c.with_prior_preservation:
            self.class_records = self.prepare_class_images()
        self.latent_cache = LatentCache(c.cache_latents, c.cache_dir or os.path.join(c.output_dir, "cache"))
        self.vae_id = vae_fingerprint(self.vae, c.base_model)
        self.scaling_factor = float(self.vae.config.scaling_factor)

        # ---------------------------------------------------------- adapters, optimizer
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        self.n_styles = len(self.data.styles)
        self.pairs = ad.attach(models, c, self.n_styles, seed=c.seed)
        self.layers = ad.trained_layers(models)
        self.alpha = ad.lora_alpha(c, self.n_styles)
        self.train_text_encoder = bool(c.text_encoder_targets)
        self.text_cache = TextCache() if (c.cache_text_embeddings and not self.train_text_encoder) else None
        self.groups = build_param_groups(self.pairs, c)
        self.optimizer = Optimizer(self.groups, c)
        self.params = self.optimizer.params
        self.param_names = self.optimizer.names
        self.schedule = schedule_for(c)
        self.ema: Optional[List] = None
        self.ga_offsets: Dict[str, tuple] = {}
        self.start_step = 0

        resume_from = resolve_resume(c.resume, c.output_dir)
        if resume_from:
            self.restore(resume_from)
        else:
            if c.resume == "latest":
                self.print(f"resume: no checkpoint under {c.output_dir}, starting from step 0")
            self.clear_old_checkpoints()
            if c.lora_init == "lora_ga":
                self.init_lora_ga()
            if c.ema_decay > 0:
                self.ema = [jt.array(p.numpy()) for p in self.params]
        self.unet.train()
        self.vae.eval()
        if self.train_text_encoder:
            self.text_encoder.train()
        else:
            self.text_encoder.eval()
        if c.cache_latents != "none":
            self.precache_latents()
        self.ready = True

    def clear_old_checkpoints(self) -> None:
        """A fresh run never mixes its checkpoints with an earlier run's: refuse, or delete them (`overwrite`)."""
        c = self.c
        old = latest_checkpoint(c.output_dir)
        if old is None:
            return
        if not c.overwrite:
            raise ValueError(f"{c.output_dir} already holds checkpoints of an earlier run (latest: {old}); "
                             f"continue it with --resume latest, or pass --overwrite to start again, "
                             f"or choose another --output-dir")
        import shutil
        from .checkpoint import checkpoint_root
        shutil.rmtree(checkpoint_root(c.output_dir))
        self.print(f"overwrite: deleted the earlier run's checkpoints in {c.output_dir}")

    def prepare_class_images(self) -> List[str]:
        """The class images for prior preservation; generated with the base model when too few."""
        c = self.c
        have = list_images(c.class_data_dir)
        need = max(0, c.num_class_images - len(have))
        if need:
            self.print(f"prior preservation: generating {need} class image(s) of {c.class_prompt!r} "
                       f"into {c.class_data_dir}")
            os.makedirs(c.class_data_dir, exist_ok=True)
            from .metrics import png_bytes
            self.pipe.set_progress_bar_config(disable=True)
            for k in range(need):
                seed = c.class_sample_seed + len(have) + k
                image = self.pipe(c.class_prompt, num_inference_steps=c.class_sample_steps, seed=seed,
                                  height=c.resolution, width=c.resolution).images[0]
                atomic_write_bytes(os.path.join(c.class_data_dir, f"class_{seed:06d}.png"), [png_bytes(image)])
            have = list_images(c.class_data_dir)
        if not have:
            raise DataError(f"prior preservation: no class images in {c.class_data_dir} and num_class_images is 0")
        limit = c.num_class_images or len(have)
        return have[:limit]

    # ================================================================== samples

    def _moments(self, path: str, size, box, flip: bool) -> np.ndarray:
        c = self.c
        key = latent_key(path, c.resolution, box, flip, self.vae_id)

        def encode():
            image = pixels(load_rgb(path, c.alpha_background), c.resolution, box, flip)
            return self.encode_pixels(image[None])[0]

        return self.latent_cache.get_or_encode(key, encode)

    def encode_pixels(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> VAE posterior parameters (B, 2C, h, w)."""
        with jt.no_grad():
            dist = self.vae.encode(jt.array(batch.astype(np.float32))).latent_dist
            out = dist.parameters.numpy()
        return out.astype(np.float32)

    def _draw_noise(self, index: int, shape) -> tuple:
        rng = sample_rng(self.c.seed, index, STREAM_NOISE)
        t = draw_timestep(rng, self.c, self.num_train_timesteps)
        noise = draw_noise(rng, shape, self.c)
        pert = rng.standard_normal(shape, dtype=np.float32) if self.c.input_perturbation else None
        return t, noise, pert

    def instance_sample(self, index: int, step: int) -> Sample:
        c = self.c
        aug = augment(c, self.data, self.records, self.order, self.caption_options, index, step)
        moments = self._moments(aug.record.path, aug.record.size, aug.box, aug.flip)
        shape = (moments.shape[0] // 2,) + moments.shape[1:]
        eps = sample_rng(c.seed, index, STREAM_VAE).standard_normal(shape, dtype=np.float32)
        latent = sample_latent(moments, eps, self.scaling_factor)
        t, noise, pert = self._draw_noise(index, shape)
        return Sample(index, aug.record.path, aug.caption, latent, noise, t, pert)

    def class_sample(self, index: int) -> Sample:
        c = self.c
        rng = sample_rng(c.seed, index, STREAM_CLASS)
        path = self.class_records[int(rng.integers(len(self.class_records)))]
        from PIL import Image
        with Image.open(path) as im:
            size = im.size
        w, h = resized_size(size[0], size[1], c.resolution)
        box = crop_box(w, h, c.resolution, c.crop, rng)
        moments = self._moments(path, size, box, False)
        shape = (moments.shape[0] // 2,) + moments.shape[1:]
        latent = sample_latent(moments, rng.standard_normal(shape, dtype=np.float32), self.scaling_factor)
        t, noise, pert = self._draw_noise(index + (1 << 40), shape)
        return Sample(index, path, c.class_prompt, latent, noise, t, pert, is_class=True)

    def caption_parts(self, rec: ImageRecord, flip: bool):
        return caption_parts_for(self.c, self.data.style(rec.style), rec, flip)

    def precache_latents(self) -> None:
        """Encode, `vae_batch_size` at a time, every (image, flip) whose crop is fixed (no random choice)."""
        c = self.c
        todo = []
        for rec in self.records:
            w, h = resized_size(rec.size[0], rec.size[1], c.resolution)
            if c.crop == "random" and (w, h) != (c.resolution, c.resolution):
                continue  # random crops are encoded when drawn
            box = crop_box(w, h, c.resolution, "center", np.random.default_rng(0))
            flips = [f for f in (False, True) if (f and c.flip_p > 0) or (not f and c.flip_p < 1)]
            for flip in flips:
                key = latent_key(rec.path, c.resolution, box, flip, self.vae_id)
                if self.latent_cache.get(key) is None:
                    todo.append((key, rec.path, box, flip))
        for i in range(0, len(todo), c.vae_batch_size):
            chunk = todo[i:i + c.vae_batch_size]
            batch = np.stack([pixels(load_rgb(p, c.alpha_background), c.resolution, b, f) for _, p, b, f in chunk])
            for (key, *_), moments in zip(chunk, self.encode_pixels(batch)):
                self.latent_cache.put(key, moments)

    # ================================================================== loss

    def encode_text(self, captions: Sequence[str]):
        """Captions -> (B, T, D) text embeddings (through the LoRA when the text encoder is trained)."""
        def run(texts):
            ids = self.tokenizer(list(texts), padding="max_length", max_length=self.c.max_token_length,
                                 truncation=True)["input_ids"]
            return self.text_encoder(jt.array(ids)).last_hidden_state

        if self.text_cache is None:
            return run(captions)
        missing = [t for t in dict.fromkeys(captions) if self.text_cache.get(t) is None]
        if missing:
            with jt.no_grad():
                out = run(missing).numpy()
            for t, e in zip(missing, out):
                self.text_cache.put(t, e)
        return jt.array(np.stack([self.text_cache.get(t) for t in captions]))

    def batch_loss(self, samples: Sequence[Sample]):
        """Weighted loss of a micro-batch: mean over its instance samples + prior_loss_weight * mean over
        its class samples; returns (loss Var, per-sample loss Var (B,))."""
        c = self.c
        latents = jt.array(np.stack([s.latent for s in samples]))
        noise = jt.array(np.stack([s.noise for s in samples]))
        t = np.array([s.timestep for s in samples], dtype=np.int64)
        noisy_noise = noise
        if c.input_perturbation:
            noisy_noise = noise + c.input_perturbation * jt.array(np.stack([s.perturbation for s in samples]))
        noisy = self.noise_scheduler.add_noise(latents, noisy_noise, t)
        context = self.encode_text([s.caption for s in samples])
        pred = self.unet(noisy, t.astype(np.float32), context).sample
        target = training_target(self.prediction_type, self.noise_scheduler, latents, noise, t)
        per = per_sample_loss(pred, target, c.loss_type, c.huber_c)                  # (B,)
        weights = min_snr_weights(self.alphas_cumprod, t, c.min_snr_gamma, self.prediction_type)
        n_inst = sum(not s.is_class for s in samples)
        n_class = len(samples) - n_inst
        for i, s in enumerate(samples):
            weights[i] *= (c.prior_loss_weight / n_class) if s.is_class else (1.0 / n_inst)
        return (per * jt.array(weights.astype(np.float32))).sum(), per

    def micro_batch(self, step: int, micro: int) -> List[Sample]:
        c = self.c
        first = (step * c.gradient_accumulation_steps + micro) * c.train_batch_size
        samples = [self.instance_sample(first + j, step) for j in range(c.train_batch_size)]
        if c.with_prior_preservation:
            samples += [self.class_sample(first + j) for j in range(c.train_batch_size)]
        return samples

    # ================================================================== one step

    def train_step(self, step: int) -> Dict[str, float]:
        """Optimizer step `step` (0-based). Returns its metrics."""
        c = self.c
        k = c.gradient_accumulation_steps
        scale = self.schedule(step)
        self.optimizer.set_lr_scale(scale)
        jt.set_global_seed(step_seed(c.seed, step))
        acc, losses = None, []
        for micro in range(k):
            samples = self.micro_batch(step, micro)
            loss, _ = self.batch_loss(samples)
            grads = jt.grad(loss / k, self.params)
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
            jt.sync(acc + [loss])
            value = float(loss.item())
            if not math.isfinite(value):
                self.raise_nonfinite(step, f"loss is {value}", samples, acc)
            losses.append(value)
        norm = global_grad_norm(acc)
        if not math.isfinite(norm):
            self.raise_nonfinite(step, f"gradient norm is {norm}", samples, acc)
        clip = clip_scale(norm, c.max_grad_norm)
        if clip < 1.0:
            acc = [g * clip for g in acc]
        self.optimizer.step(acc)
        if self.ema is not None:
            d = c.ema_decay
            for e, p in zip(self.ema, self.params):
                e.update(e * d + p * (1.0 - d))
            jt.sync(self.ema)
        return {"loss": float(np.mean(losses)), "lr": c.learning_rate * scale, "grad_norm": norm}

    def raise_nonfinite(self, step: int, what: str, samples: Sequence[Sample], grads) -> None:
        """Find what is not finite (input, adapter weight, gradient, base weight) and stop with its name."""
        culprits = []
        for s in samples:
            if not (np.isfinite(s.latent).all() and np.isfinite(s.noise).all()):
                culprits.append(f"input image {s.source} (its latent or noise)")
        for pair in self.pairs:
            for side, var in (("lora_A (down)", pair.down), ("lora_B (up)", pair.up)):
                if not np.isfinite(var.numpy()).all():
                    culprits.append(f"adapter weight {side} of module {pair.name}")
        if not culprits:
            for name, g in zip(self.param_names, grads):
                if not np.isfinite(g.numpy()).all():
                    culprits.append(f"gradient of {name}")
                    break
        if not culprits:
            for comp, model in (("unet", self.unet), ("text_encoder", self.text_encoder)):
                for name, p in model.named_parameters():
                    if not np.isfinite(p.numpy()).all():
                        culprits.append(f"base weight {comp}.{name}")
                        break
        where = "; ".join(culprits[:5]) or "no single tensor is non-finite (overflow inside the forward pass?)"
        last = latest_checkpoint(self.c.output_dir)
        raise NonFiniteLoss(f"step {step + 1}: {what}. Non-finite: {where}. Stopped without saving; "
                            f"the latest checkpoint is {last or 'none'}. Try a lower learning_rate or max_grad_norm.")

    # ================================================================== LoRA-GA

    def init_lora_ga(self) -> None:
        c = self.c
        weights = {name: layer.weight for name, layer in self.layers.items()}
        names = [p.name for p in self.pairs]
        sums = None
        for b in range(c.lora_ga_batches):
            samples = [self.instance_sample((1 << 41) + b * c.train_batch_size + j, 0)
                       for j in range(c.train_batch_size)]
            loss, _ = self.batch_loss(samples)
            grads = jt.grad(loss, [weights[n] for n in names])
            arrays = [g.numpy().astype(np.float64) for g in grads]
            sums = arrays if sums is None else [s + a for s, a in zip(sums, arrays)]
        means = {n: s / c.lora_ga_batches for n, s in zip(names, sums)}
        self.ga_offsets = ad.lora_ga_init(self.pairs, self.layers, means, self.alpha, c.lora_ga_gamma)
        self.print(f"LoRA-GA: initialised {len(self.pairs)} layers from the gradient of {c.lora_ga_batches} batch(es)")

    # ================================================================== saving

    def lora_state(self, arrays=None):
        c = self.c
        styles = [s.name for s in self.data.styles]
        meta = {"jdiffusion_lora.trainer": "style-lora", "jdiffusion_lora.styles": ",".join(styles),
                "jdiffusion_lora.triggers": ",".join(s.trigger for s in self.data.styles),
                "jdiffusion_lora.base_model": c.base_model or "tiny", "jdiffusion_lora.prediction_type":
                self.prediction_type}
        return ad.lora_state(self.pairs, self.alpha, arrays, self.ga_offsets, meta)

    def write_lora_files(self, folder: str, arrays=None) -> List[str]:
        from ..lora.formats import save_lora_state
        c = self.c
        state = self.lora_state(arrays)
        paths = []
        for fmt in c.save_formats:
            extra = None
            if fmt == "kohya":
                extra = {"ss_seed": str(c.seed), "ss_resolution": f"({c.resolution}, {c.resolution})",
                         "ss_learning_rate": str(c.learning_rate), "ss_max_train_steps": str(c.max_train_steps),
                         "ss_num_train_images": str(len(self.records)),
                         "ss_training_comment": "triggers: " + ",".join(s.trigger for s in self.data.styles)}
            path = os.path.join(folder, LORA_FILES[fmt])
            with writing(path):
                paths.append(save_lora_state(state, path, format=fmt, dtype=c.save_dtype, metadata=extra))
        return paths

    def ema_arrays(self) -> Dict[str, np.ndarray]:
        out = {}
        values = {n: e.numpy() for n, e in zip(self.param_names, self.ema)}
        for p in self.pairs:
            out[p.name + ".down"] = values[p.name + ".lora_A.weight"]
            out[p.name + ".up"] = values[p.name + ".lora_B.weight"]
        return out

    def save_checkpoint(self, step: int) -> str:
        c = self.c

        def write(folder):
            self.write_lora_files(folder)
            extra = {}
            if self.ema is not None:
                self.write_lora_files(os.path.join(folder, "ema"), self.ema_arrays())
                extra.update({f"ema.{n}": e.numpy() for n, e in zip(self.param_names, self.ema)})
            for name, (b0, a0) in self.ga_offsets.items():
                extra[f"ga.{name}.up"] = b0
                extra[f"ga.{name}.down"] = a0
            state = {"format": 1, "step": step, "optimizer_steps": self.optimizer.step_count,
                     "samples_seen": step * c.train_batch_size * c.gradient_accumulation_steps,
                     "rng": {"scheme": "per-sample numpy streams from (seed, sample index); jittor reseeded per step",
                             "seed": c.seed},
                     "prediction_type": self.prediction_type, "config": as_dict(c)}
            save_training_state(folder, state, ad.adapter_arrays(self.pairs), self.optimizer.state_arrays(), extra)

        try:
            return write_checkpoint(c.output_dir, step, write, c.keep_last)
        except OSError as e:
            last = latest_checkpoint(c.output_dir)
            raise OSError(e.errno, f"could not save the checkpoint of step {step}: {e.strerror or e}; nothing "
                          f"half-written was kept, the latest checkpoint is {last or 'none'}") from None

    def restore(self, checkpoint: str) -> None:
        state, adapter, optimizer, extra = load_training_state(checkpoint)
        old = state.get("config", {})
        must_match = ("seed", "rank", "pack_rank", "unet_targets", "text_encoder_targets", "optimizer",
                      "train_batch_size", "gradient_accumulation_steps", "lora_init")
        changed = [f"{k}: {old.get(k)!r} -> {getattr(self.c, k)!r}" for k in must_match
                   if k in old and old[k] != getattr(self.c, k)]
        if changed:
            raise ValueError(f"cannot resume from {checkpoint}: these options differ from the checkpoint's: "
                             + "; ".join(changed))
        if state.get("prediction_type", self.prediction_type) != self.prediction_type:
            raise ValueError(f"cannot resume: the checkpoint trained {state['prediction_type']}, "
                             f"this run {self.prediction_type}")
        ad.load_adapter_arrays(self.pairs, adapter)
        self.optimizer.load_state_arrays(optimizer, state["optimizer_steps"])
        ga = {}
        for key, arr in extra.items():
            if key.startswith("ga."):
                name, side = key[3:].rsplit(".", 1)
                ga.setdefault(name, [None, None])[0 if side == "up" else 1] = arr
        self.ga_offsets = {k: (v[0], v[1]) for k, v in ga.items()}
        if self.ga_offsets:
            ad.reapply_ga_offsets(self.pairs, self.layers, self.ga_offsets, self.alpha)
        if self.c.ema_decay > 0:
            if any(k.startswith("ema.") for k in extra):
                self.ema = [jt.array(extra[f"ema.{n}"]) for n in self.param_names]
            else:
                self.ema = [jt.array(p.numpy()) for p in self.params]
        self.start_step = int(state["step"])
        self.print(f"resumed from {checkpoint} at step {self.start_step}")

    # ================================================================== samples and validation

    def sample_prompts(self) -> List[Tuple[str, Optional[str], Optional[str]]]:
        """(prompt, style name, object) per sample image; style and object are known for the default
        prompts (one per style: trigger, style tags, its first prompt) and None for user prompts."""
        c = self.c
        prompts = [(p, None, None) for p in c.sample_prompts]
        if c.sample_prompts_file:
            with open(c.sample_prompts_file, encoding="utf-8") as f:
                prompts += [(line.strip(), None, None) for line in f if line.strip() and not line.startswith("#")]
        if not prompts:
            for style in self.data.styles:
                first = next(iter(style.prompts.values()), None) or (style.images[0].stem if style.images else "")
                text = ",".join([t for t in [style.trigger, *style.style_tags, first] if t])
                prompts.append((text, style.name, first))
        return prompts

    def sample_images(self, step: int) -> str:
        c = self.c
        items = self.sample_prompts()
        prompts = [p for p, _, _ in items]
        self.unet.eval()
        self.text_encoder.eval()
        try:
            self.pipe.set_progress_bar_config(disable=True)
            out = self.pipe(prompts, num_inference_steps=c.sample_steps, guidance_scale=c.sample_guidance,
                            seed=[c.sample_seed + i for i in range(len(prompts))], height=c.resolution,
                            width=c.resolution)
        finally:
            self.unet.train()
            if self.train_text_encoder:
                self.text_encoder.train()
        labels = [f"{p} (seed {s})" for p, s in zip(prompts, out.seeds)]
        grid = image_grid(out.images, labels, columns=min(4, len(prompts)), title=f"step {step}")
        path = os.path.join(c.output_dir, "samples", f"step_{step:06d}.png")
        save_png(grid, path)
        self.metrics.add_image(step, "samples", grid)
        self.score_samples(step, items, out.images)
        return path

    def score_samples(self, step: int, items, images) -> Optional[Dict[str, float]]:
        """Score one sample round with the local scorer and log `score/<metric>`.

        Runs when `sample_scores` is set, the prompts are the default per-style ones and the data is in
        the competition layout (`<data_root>/<NN>/images`): the images are written as a one-image
        submission per style (`samples/step_N/<NN>/<object>.png`) and scored against the references.
        """
        c = self.c
        if not c.sample_scores or any(style is None for _, style, _ in items):
            return None
        if not all(os.path.isdir(os.path.join(c.data_root, style, "images")) for _, style, _ in items):
            return None
        from ..metrics.evaluate import Scorer, evaluate_folder

        folder = os.path.join(c.output_dir, "samples", f"step_{step:06d}")
        for (_, style, obj), image in zip(items, images):
            save_png(image, os.path.join(folder, style, f"{obj or 'sample'}.png"))
        if self._scorer is None:
            self._scorer = Scorer(c.score_weights or None, metrics=c.sample_scores)
        scores = evaluate_folder(folder, c.data_root, styles=sorted({s for _, s, _ in items}), scorer=self._scorer)
        values = {f"score/{k}": float(v) for k, v in scores["overall"].items() if isinstance(v, (int, float))}
        if values:
            self.metrics.log(step, values)
            self.print(f"step {step} sample scores: " + ", ".join(f"{k[6:]} {v:.4f}" for k, v in values.items()))
        return values

    def validation_loss(self) -> float:
        """Mean loss on the held-out images (see `fixed_loss`)."""
        return self.fixed_loss(self.data.validation, self.c.validation_seed)

    def fixed_loss(self, records: Sequence[ImageRecord], seed: int, repeats: int = 1) -> float:
        """Mean loss over `records` (each `repeats` times) with noise, timesteps and captions fixed by
        `seed`, centre crops, no flip, no dropout: comparable between calls."""
        c = self.c
        self.setup()
        self.unet.eval()
        self.text_encoder.eval()
        total, n = 0.0, 0
        try:
            for j, rec in enumerate([r for r in records for _ in range(repeats)]):
                rng = sample_rng(seed, j, STREAM_VALIDATION)
                w, h = resized_size(rec.size[0], rec.size[1], c.resolution)
                box = crop_box(w, h, c.resolution, "center", rng)
                caption = render_caption(self.caption_parts(rec, False), CaptionOptions(), rng)
                moments = self._moments(rec.path, rec.size, box, False)
                shape = (moments.shape[0] // 2,) + moments.shape[1:]
                latent = sample_latent(moments, rng.standard_normal(shape, dtype=np.float32), self.scaling_factor)
                t = int(rng.integers(0, self.num_train_timesteps))
                noise = rng.standard_normal(shape, dtype=np.float32)
                with jt.no_grad():
                    loss, _ = self.batch_loss([Sample(j, rec.path, caption, latent, noise, t)])
                    total += float(loss.item())
                    n += 1
        finally:
            self.unet.train()
            if self.train_text_encoder:
                self.text_encoder.train()
        return total / max(1, n)

    # ================================================================== the loop

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, saving a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self._stop_signal = signum

    def run(self, until: Optional[int] = None, callback: Optional[Callable[[int, Dict[str, float]], None]] = None
            ) -> TrainResult:
        """Train to `max_train_steps` (or stop early at step `until`, saving a checkpoint there)."""
        c = self.c
        self.setup()
        os.makedirs(c.output_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(c.output_dir, "config.toml"), [to_toml(c).encode()])
        self.metrics = MetricsLog(c.output_dir, c.tensorboard, resume_step=self.start_step if self.start_step else None)
        self.print(f"training {len(self.records)} image(s) of {self.n_styles} style(s) "
                   f"({', '.join(s.trigger or s.name for s in self.data.styles)}); LoRA rank "
                   f"{ad.total_rank(c, self.n_styles)} on {len(self.pairs)} layers, "
                   f"{sum(int(np.prod(p.shape)) for p in self.params):,} parameters; {self.prediction_type}; "
                   f"steps {self.start_step} -> {c.max_train_steps}")
        self.print("parameter groups:\n" + describe_groups(self.groups))
        end = min(until, c.max_train_steps) if until else c.max_train_steps
        result = TrainResult(step=self.start_step, stopped="done", output_dir=c.output_dir)
        previous = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[s] = signal.signal(s, lambda signum, frame: self.request_stop(signum))
            except ValueError:  # not the main thread: no handlers, request_stop() still works
                break
        bar = None
        if c.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.max_train_steps, initial=self.start_step, desc="training", dynamic_ncols=True)
        try:
            step = self.start_step
            t0, done_here = time.time(), 0
            while step < end:
                m = self.train_step(step)
                step += 1
                done_here += 1
                result.step, result.last_loss = step, m["loss"]
                rate = done_here / max(1e-9, time.time() - t0)
                if step % c.log_every == 0 or step == end:
                    self.metrics.log(step, {**m, "it_per_s": rate})
                if c.validation_every and self.data.validation and step % c.validation_every == 0:
                    self.metrics.log(step, {"val/loss": self.validation_loss()})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", its=f"{rate:.2f}")
                if callback is not None:
                    callback(step, m)
                if c.sample_every and step % c.sample_every == 0:
                    result.samples.append(self.sample_images(step))
                stop = self._stop_signal is not None
                if step == end or stop or (c.save_every and step % c.save_every == 0):
                    result.checkpoint = self.save_checkpoint(step)
                    result.loss_curve = self.plot_loss()
                if stop:
                    result.stopped, result.signal = "signal", int(self._stop_signal)
                    self.print(f"\nstopped by signal {self._stop_signal} at step {step}; resumable checkpoint "
                               f"{result.checkpoint} (run again with --resume latest)")
                    break
            if result.stopped == "done" and step < c.max_train_steps:
                result.stopped = "until"
            if step >= c.max_train_steps:
                result.lora_files = self.write_lora_files(c.output_dir)
                if self.ema is not None:
                    result.lora_files += self.write_lora_files(os.path.join(c.output_dir, "ema"), self.ema_arrays())
                if result.checkpoint is None:
                    result.checkpoint = latest_checkpoint(c.output_dir)
                result.loss_curve = self.plot_loss()
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return result

    def plot_loss(self) -> str:
        path = os.path.join(self.c.output_dir, "loss_curve.png")
        series = {"train loss": self.metrics.series("loss")}
        val = self.metrics.series("val/loss")
        if val:
            series["validation loss"] = val
        plot_curves(series, path, title="loss")
        return path
