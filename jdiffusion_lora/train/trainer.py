"""The style-LoRA training loop.

One optimizer step s uses `gradient_accumulation_steps` micro-batches of `train_batch_size` samples. Sample i
(a global counter, s * batch * accumulation + ...) owns its random streams (`batches.py`): its image, crop, flip,
caption, VAE posterior draw, timestep and noise. Jittor's own generator (LoRA dropout) is re-seeded from
(seed, s, micro-batch) at every micro-batch. So a sample does not depend on the batch it falls in, k micro-batches
of 1 equal one batch of k, and a resumed run repeats the uninterrupted one bit for bit (CPU). Under `mpirun -np N`
(distributed.py) N ranks share each step's global batch and reproduce one process.

    trainer = Trainer(config)          # config: TrainConfig
    result = trainer.run()             # -> TrainResult (paths, final loss, stop reason)

The helpers, one job per file: batches (samples, their random streams, the latent cache), objective (the loss),
adapters (LoRA injection, LoRA-GA), optim (groups, schedule, clipping, EMA), precision (half weights, loss
scaling), checkpoint (LoRA files, checkpoints, resume), sampling (sample images, scores, loss curve, validation
loss), logging (metrics.jsonl, TensorBoard), signals (SIGINT/SIGTERM), distributed (mpirun), textual_inversion.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .._runtime import DEVICE, jt, keep_freed_memory
from ..pipelines import load_pipeline
from ..weights import atomic_write_bytes, remove_stale_temp_files
from . import adapters as ad
from . import distributed as dist
from .batches import Sample, SampleBuilder, prepare_class_images, step_seed
from .cache import TextCache
from .checkpoint import (clear_old_checkpoints, latest_checkpoint, resolve_resume, restore, save_checkpoint,
                         write_final_lora)
from .config import TrainConfig, as_dict, to_toml
from .data import ImageRecord, discover
from .logging import MetricsLog, progress_bar
from .objective import DenoisingLoss, NonFiniteLoss, check_model_fits, nonfinite_error, training_scheduler
from . import precision
from .optim import (Optimizer, build_param_groups, clip_scale, describe_groups, global_grad_norm, schedule_for,
                    update_ema)
from .sampling import plot_loss, sample_images, validation_loss
from .signals import stop_on_signals
from .textual_inversion import TokenEmbeddings


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


class Trainer:
    def __init__(self, config: TrainConfig, pipeline=None, printer: Callable[[str], None] = print):
        self.c = config
        self.pipe = pipeline
        self.print = printer if dist.is_writer() else (lambda *a, **k: None)  # rank 0 speaks for all ranks
        self.ready = False
        self._stop_signal: Optional[int] = None
        self.stop_agreed = False  # under MPI: some rank was signalled before this step's all-reduce
        self.scorer = None  # the local scorer, built on the first sample round that is scored

    def setup(self) -> None:
        """Load the model, find the data, attach the adapters, build the optimizer, then resume or start."""
        if self.ready:
            return
        c = self.c
        if self.pipe is None:
            self.pipe = load_pipeline(c.base_model)
        self.unet, self.text_encoder, self.vae = self.pipe.unet, self.pipe.text_encoder, self.pipe.vae
        self.prediction_type, self.noise_scheduler = training_scheduler(self.pipe, c)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        check_model_fits(self.pipe, c, self.print)
        precision.check_device(c.mixed_precision, DEVICE, self.print)
        precision.cast_frozen((self.unet, self.text_encoder, self.vae), c.mixed_precision)
        self.scaler = precision.GradScaler.for_mode(c.mixed_precision)   # fp16 loss scale; skipped steps
        if c.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if c.text_encoder_targets:
                self.text_encoder.enable_gradient_checkpointing()

        self.data = discover(c)
        self.records: List[ImageRecord] = self.data.records
        for note in self.data.warnings:
            self.print(f"warning: {note}")
        class_images = prepare_class_images(c, self.pipe, self.print) if c.with_prior_preservation else []
        self.batches = SampleBuilder(c, self.data, self.vae, self.num_train_timesteps, class_images)
        if self.batches.buckets is not None:
            self.print(f"{len(self.batches.buckets.sizes)} aspect-ratio bucket(s):\n" + "\n".join(
                self.batches.buckets.table([f"{r.style}/{os.path.basename(r.path)}" for r in self.records])))
        self.order, self.caption_options = self.batches.order, self.batches.caption_options
        self.latent_cache = self.batches.latent_cache
        self.world = dist.world_size()
        self.global_batch = self.batches.split(self.world, dist.rank(), c.global_batch_size)

        self.ti = None   # Textual Inversion: one new token per style, its trigger
        if c.textual_inversion:
            self.ti = TokenEmbeddings.add(self.pipe, [s.trigger for s in self.data.styles], c.ti_num_vectors,
                                          c.ti_init_word)
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        self.n_styles = len(self.data.styles)
        self.pairs = ad.attach(models, c, self.n_styles, seed=c.seed)
        self.layers = ad.trained_layers(models)
        self.alpha = ad.lora_alpha(c, self.n_styles)
        self.train_text_encoder = bool(c.text_encoder_targets)
        frozen_text = not self.train_text_encoder and self.ti is None
        text_cache = TextCache() if (c.cache_text_embeddings and frozen_text) else None
        self.loss = DenoisingLoss(c, self.unet, self.text_encoder, self.pipe.tokenizer, self.noise_scheduler,
                                  self.prediction_type, text_cache, self.ti)
        self.groups = build_param_groups(self.pairs, c, extra=[self.ti.parameter(c)] if self.ti else ())
        self.optimizer = Optimizer(self.groups, c)
        self.params, self.param_names = self.optimizer.params, self.optimizer.names
        self.schedule = schedule_for(c)
        self.ema: Optional[List] = None
        self.ga_offsets: Dict[str, tuple] = {}
        self.start_step = 0
        self.started_at = time.time()       # kohya's ss_training_started_at

        resume_from = resolve_resume(c.resume, c.output_dir)
        dist.check_same_config({**as_dict(c), "images": [(r.path, list(r.size)) for r in self.records],
                                "resume_from": os.path.basename(resume_from or "")})
        if resume_from:
            restore(self, resume_from)
        else:
            if c.resume == "latest":
                self.print(f"resume: no checkpoint under {c.output_dir}, starting from step 0")
            clear_old_checkpoints(c, self.print)
            if c.lora_init == "lora_ga":   # A, B from the mean base-weight gradient of a few batches
                losses = (self.loss(self.batches.lora_ga_batch(b))[0] for b in range(c.lora_ga_batches))
                grads = ad.mean_base_gradients(self.pairs, self.layers, losses)
                self.ga_offsets = ad.lora_ga_init(self.pairs, self.layers, grads, self.alpha, c.lora_ga_gamma)
                self.print(f"LoRA-GA: initialised {len(self.pairs)} layers from the gradient of "
                           f"{c.lora_ga_batches} batch(es)")
            if c.ema_decay > 0:
                self.ema = [jt.array(p.numpy()) for p in self.params]
        ad.freeze_base((self.unet, self.text_encoder, self.vae))   # after LoRA-GA, which needs base gradients
        dist.broadcast_params(self.params)
        self.train_mode()
        self.vae.eval()
        if c.cache_latents != "none":
            self.batches.precache()
        keep_freed_memory()   # from here on: no page faults for oneDNN's per-call buffers (see _runtime)
        self.ready = True

    def run(self, until: Optional[int] = None, callback: Optional[Callable[[int, Dict[str, float]], None]] = None
            ) -> TrainResult:
        """Train to `max_train_steps` (or stop early at step `until`, saving a checkpoint there)."""
        c = self.c
        self.setup()
        writer = dist.is_writer()  # rank 0 alone writes output_dir; the other ranks train and read
        self.open_logs()
        end = min(until, c.max_train_steps) if until else c.max_train_steps
        result = TrainResult(step=self.start_step, stopped="done", output_dir=c.output_dir)
        step, t0 = self.start_step, time.time()
        with contextlib.closing(self.metrics), progress_bar(c.progress_bar and writer, c.max_train_steps, step) as bar, \
                stop_on_signals(self.request_stop):
            while step < end:
                m = self.train_step(step)
                step += 1
                result.step, result.last_loss = step, m["loss"]
                rate = (step - self.start_step) / max(1e-9, time.time() - t0)
                if step % c.log_every == 0 or step == end:
                    self.metrics.log(step, {**m, "it_per_s": rate})
                if c.validation_every and self.data.validation and step % c.validation_every == 0 and writer:
                    self.metrics.log(step, {"val/loss": validation_loss(self)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", its=f"{rate:.2f}")
                if callback is not None:
                    callback(step, m)
                if c.sample_every and step % c.sample_every == 0:
                    if writer:
                        result.samples.append(sample_images(self, step))
                    dist.barrier(f"waiting for rank 0's samples of step {step}", timeout=0)  # no time limit
                stop = self.should_stop()
                if (step == end or stop or (c.save_every and step % c.save_every == 0)) and writer:
                    result.checkpoint = save_checkpoint(self, step)
                    result.loss_curve = plot_loss(self)
                if stop:
                    result.stopped, result.signal = "signal", int(self._stop_signal or signal.SIGTERM)
                    self.print(f"\nstopped by signal {self._stop_signal} at step {step}; resumable checkpoint "
                               f"{result.checkpoint} (run again with --resume latest)")
                    break
            if result.stopped == "done" and step < c.max_train_steps:
                result.stopped = "until"
            if step >= c.max_train_steps and writer:
                result.lora_files = write_final_lora(self)
                result.checkpoint = result.checkpoint or latest_checkpoint(c.output_dir)
                result.loss_curve = plot_loss(self)
        return result

    def train_step(self, step: int) -> Dict[str, float]:
        """Optimizer step `step` (0-based). Returns its metrics."""
        c = self.c
        k, rank = self.batches.accum, self.batches.rank
        scale = self.schedule(step)
        self.optimizer.set_lr_scale(scale)
        acc, losses, bad = None, [], None
        for micro in range(k):
            jt.set_global_seed(step_seed(c.seed, step, rank * k + micro), different_seed_for_mpi=False)
            samples = self.batches.micro_batch(step, micro)
            loss, _ = self.loss(samples)
            grads = jt.grad(self.scaler.scale_loss(loss / k), self.params)
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
            jt.sync(acc + [loss])
            losses.append(float(loss.item()))
            if not math.isfinite(losses[-1]) and c.mixed_precision == "no":
                bad = f"loss is {losses[-1]}"
                break
        acc = self.scaler.unscale(acc)
        # one all-reduce over the ranks (nothing in one process): mean gradient and loss, NaN and stop flags
        red = dist.reduce_step(acc, losses, bad is not None, self._stop_signal is not None, step, c.allreduce_dtype)
        if red.bad_ranks:
            if bad is None:
                raise NonFiniteLoss(f"step {step + 1}: rank(s) {red.bad_ranks} met a non-finite loss (their message "
                                    f"names the module); every rank stopped without saving")
            self.raise_nonfinite(step, bad, samples, acc)
        acc, self.stop_agreed = red.grads, red.stop
        norm = global_grad_norm(acc)
        if not math.isfinite(norm) and c.mixed_precision == "no":
            self.raise_nonfinite(step, f"gradient norm is {norm}", samples, acc)
        if not self.scaler.update(precision.all_finite([red.loss, norm])):   # mixed precision: skip the step
            if self.scaler.consecutive_skips > precision.MAX_CONSECUTIVE_SKIPS:
                self.raise_nonfinite(step, f"{self.scaler.consecutive_skips} steps in a row were not finite",
                                     samples, acc)
            return {"loss": red.loss, "lr": c.learning_rate * scale, "grad_norm": norm,
                    "skipped_steps": self.scaler.skipped_steps, "loss_scale": self.scaler.factor}
        clip = clip_scale(norm, c.max_grad_norm)
        if clip < 1.0:
            acc = [g * clip for g in acc]
        self.optimizer.step(acc)
        if self.ema is not None:
            update_ema(self.ema, self.params, c.ema_decay)
        m = {"loss": red.loss, "lr": c.learning_rate * scale, "grad_norm": norm}
        if c.mixed_precision != "no":
            m.update(skipped_steps=self.scaler.skipped_steps, loss_scale=self.scaler.factor)
        if dist.active():
            m["allreduce_s"] = red.seconds
        return m

    def raise_nonfinite(self, step: int, what: str, samples: Sequence[Sample], grads) -> None:
        """Stop, naming what is not finite (input, adapter weight, gradient, base weight)."""
        models = {"unet": self.unet, "text_encoder": self.text_encoder}
        what += f" on rank {dist.rank()} of {self.world}" if dist.active() else ""
        raise nonfinite_error(step, what, samples, self.pairs, self.param_names, grads, models,
                              latest_checkpoint(self.c.output_dir))

    def open_logs(self) -> None:
        """config.toml and the metrics log in output_dir; print what is trained."""
        c = self.c
        if dist.is_writer():
            os.makedirs(c.output_dir, exist_ok=True)
            remove_stale_temp_files(c.output_dir)   # what a killed run's atomic writes left behind
            atomic_write_bytes(os.path.join(c.output_dir, "config.toml"), [to_toml(c).encode()])
        self.metrics = MetricsLog(c.output_dir, c.tensorboard, resume_step=self.start_step if self.start_step else None,
                                  write=dist.is_writer())
        self.print(f"training {len(self.records)} image(s) of {self.n_styles} style(s) "
                   f"({', '.join(s.trigger or s.name for s in self.data.styles)}); LoRA rank "
                   f"{ad.total_rank(c, self.n_styles)} on {len(self.pairs)} layers, "
                   f"{sum(int(np.prod(p.shape)) for p in self.params):,} parameters; {self.prediction_type}; "
                   f"steps {self.start_step} -> {c.max_train_steps}; global batch {self.global_batch}"
                   + (f" over {self.world} ranks" if self.world > 1 else ""))
        self.print("parameter groups:\n" + describe_groups(self.groups))

    def train_mode(self) -> None:
        self.unet.train()
        if self.train_text_encoder:
            self.text_encoder.train()
        else:
            self.text_encoder.eval()

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout) inside, training mode again after."""
        self.unet.eval()
        self.text_encoder.eval()
        try:
            yield
        finally:
            self.unet.train()
            if self.train_text_encoder:
                self.text_encoder.train()

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, saving a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self._stop_signal = signum

    def should_stop(self) -> bool:
        """Stop after this step? Under MPI every rank decides alike, from the step's all-reduce."""
        return self.stop_agreed if self.world > 1 else self._stop_signal is not None
