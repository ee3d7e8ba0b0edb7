"""The denoising loss: target, per-sample distance and Min-SNR weighting.

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]); the model predicts
- eps ("epsilon"), or
- v = sqrt(a_t) eps - sqrt(1 - a_t) x0 ("v_prediction", Salimans & Ho 2022).

Min-SNR-gamma (Hang et al. 2023): SNR(t) = a_t / (1 - a_t); the per-sample weight is
min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v (the v loss already carries a
factor SNR + 1 relative to the x0 loss).

`DenoisingLoss` puts it together for a micro-batch of `batches.Sample`s: noise the latents, run the
text encoder and the UNet, weight each sample (Min-SNR, prior preservation).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .._runtime import jt
from ..models.modeling import to_model_dtype


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients became NaN/Inf; the message names the step and the culprit."""


def snr(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    a = alphas_cumprod[np.asarray(timesteps, dtype=np.int64)].astype(np.float64)
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: np.ndarray, timesteps: np.ndarray, gamma: float, prediction_type: str) -> np.ndarray:
    """(B,) float32 weights; all ones when gamma <= 0."""
    if gamma <= 0:
        return np.ones(len(timesteps), dtype=np.float32)
    s = snr(alphas_cumprod, timesteps)
    clipped = np.minimum(s, gamma)
    if prediction_type == "v_prediction":
        return (clipped / (s + 1.0)).astype(np.float32)
    return (clipped / s).astype(np.float32)


def training_target(prediction_type: str, scheduler, latents, noise, timesteps):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def per_sample_loss(pred, target, loss_type: str = "l2", huber_c: float = 0.1):
    """(B, C, H, W) x2 -> (B,) mean distance per sample. Huber is the pseudo-Huber of kohya:
    2c (sqrt(d^2 + c^2) - c), ~d^2 near 0 and ~2c|d| far away."""
    d = pred.float32() - target.float32()
    if loss_type == "l2":
        e = d * d
    elif loss_type == "l1":
        e = jt.abs(d)
    elif loss_type == "huber":
        e = 2.0 * huber_c * (jt.sqrt(d * d + huber_c * huber_c) - huber_c)
    else:
        raise ValueError(f"loss_type must be l2, l1 or huber, got {loss_type!r}")
    return e.reshape(e.shape[0], -1).mean(dim=1)


def training_scheduler(pipe, c):
    """(prediction type, DDPM noise scheduler) to train with; the pipeline's sampler predicts the same."""
    from ..schedulers import DDPMScheduler
    prediction_type = c.prediction_type or pipe.scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"cannot train prediction_type {prediction_type!r} (epsilon or v_prediction)")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    if pipe.scheduler.config.prediction_type != prediction_type:  # sample with what we train
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return prediction_type, noise_scheduler



def check_model_fits(pipe, c, printer: Callable[[str], None]) -> None:
    """The config's token length and resolution against the model's limits."""
    max_pos = pipe.text_encoder.config.max_position_embeddings
    if c.max_token_length > max_pos:
        raise ValueError(f"max_token_length {c.max_token_length} exceeds the text encoder's {max_pos} positions")
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if c.resolution % factor:
        raise ValueError(f"resolution must be a multiple of {factor} (the VAE's downsampling), got {c.resolution}")
    if c.enable_bucket and c.bucket_reso_steps % factor:
        raise ValueError(f"bucket_reso_steps must be a multiple of {factor} (the VAE's downsampling), "
                         f"got {c.bucket_reso_steps}")


class DenoisingLoss:
    """loss, per_sample = DenoisingLoss(...)(samples): the weighted loss of a micro-batch, the mean over
    its instance samples + prior_loss_weight * the mean over its class samples; per_sample is (B,)."""

    def __init__(self, c, unet, text_encoder, tokenizer, noise_scheduler, prediction_type: str, text_cache=None,
                 token_embeddings=None):
        self.c = c
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.alphas_cumprod = np.asarray(noise_scheduler.alphas_cumprod, dtype=np.float64)
        self.text_cache = text_cache     # captions -> embeddings, when the text encoder is frozen
        self.token_embeddings = token_embeddings  # Textual Inversion vectors being trained (or None)

    def __call__(self, samples: Sequence):
        c = self.c
        # inputs: constants to the graph (see adapters.freeze_base)
        latents = jt.array(np.stack([s.latent for s in samples])).stop_grad()          # (B, C, h, w)
        noise = jt.array(np.stack([s.noise for s in samples])).stop_grad()
        t = np.array([s.timestep for s in samples], dtype=np.int64)
        noisy_noise = noise
        if c.input_perturbation:
            noisy_noise = noise + c.input_perturbation * jt.array(np.stack([s.perturbation for s in samples]))
        noisy = self.noise_scheduler.add_noise(latents, noisy_noise, t)
        context = self.encode_text([s.caption for s in samples])                       # (B, T, D)
        pred = self.unet(to_model_dtype(noisy, self.unet), t.astype(np.float32),
                         to_model_dtype(context, self.unet)).sample                    # half under mixed_precision
        target = training_target(self.prediction_type, self.noise_scheduler, latents, noise, t)
        per = per_sample_loss(pred, target, c.loss_type, c.huber_c)                     # (B,)
        weights = min_snr_weights(self.alphas_cumprod, t, c.min_snr_gamma, self.prediction_type)
        n_inst = sum(not s.is_class for s in samples)
        n_class = len(samples) - n_inst
        for i, s in enumerate(samples):
            weights[i] *= (c.prior_loss_weight / n_class) if s.is_class else (1.0 / n_inst)
        return (per * jt.array(weights.astype(np.float32))).sum(), per

    def encode_text(self, captions: Sequence[str]):
        """Captions -> (B, T, D) text embeddings (through the LoRA when the text encoder is trained)."""
        def run(texts):
            ti = self.token_embeddings
            texts = ti.expand(texts) if ti is not None else list(texts)
            ids = self.tokenizer(texts, padding="max_length", max_length=self.c.max_token_length,
                                 truncation=True)["input_ids"]
            return self.text_encoder(jt.array(ids), inputs_embeds=ti.embed(ids) if ti is not None else None
                                     ).last_hidden_state

        if self.text_cache is None:
            return run(captions)
        # One caption per forward pass: a batched matmul's rows can differ in the last bit with the batch
        # they share, and which captions meet first depends on where a run started (resume).
        for text in dict.fromkeys(captions):
            if self.text_cache.get(text) is None:
                with jt.no_grad():
                    self.text_cache.put(text, run([text]).numpy()[0])
        return jt.array(np.stack([self.text_cache.get(t) for t in captions]))


def nonfinite_error(step: int, what: str, samples: Sequence, pairs: Sequence, param_names: Sequence[str], grads,
                    models: dict, last_checkpoint: Optional[str]) -> NonFiniteLoss:
    """The error of a bad step, naming what is not finite: input latents/noise, adapter weights;
    else the first gradient; else the first base weight of each model."""
    culprits = []
    for s in samples:
        if not (np.isfinite(s.latent).all() and np.isfinite(s.noise).all()):
            culprits.append(f"input image {s.source} (its latent or noise)")
    for pair in pairs:
        for side, var in (("lora_A (down)", pair.down), ("lora_B (up)", pair.up)):
            if not np.isfinite(var.numpy()).all():
                culprits.append(f"adapter weight {side} of module {pair.name}")
    if not culprits:
        for name, g in zip(param_names, grads):
            if not np.isfinite(g.numpy()).all():
                culprits.append(f"gradient of {name}")
                break
    if not culprits:
        for comp, model in models.items():
            for name, p in model.named_parameters():
                if not np.isfinite(p.numpy()).all():
                    culprits.append(f"base weight {comp}.{name}")
                    break
    where = "; ".join(culprits[:5]) or "no single tensor is non-finite (overflow inside the forward pass?)"
    return NonFiniteLoss(f"step {step + 1}: {what}. Non-finite: {where}. Stopped without saving; the latest "
                         f"checkpoint is {last_checkpoint or 'none'}. Try a lower learning_rate or max_grad_norm.")
