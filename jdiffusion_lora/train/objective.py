"""The denoising loss: target, per-sample distance and Min-SNR weighting.

x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]); the model predicts
- eps ("epsilon"), or
- v = sqrt(a_t) eps - sqrt(1 - a_t) x0 ("v_prediction", Salimans & Ho 2022).

Min-SNR-gamma (Hang et al. 2023): SNR(t) = a_t / (1 - a_t); the per-sample weight is
min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v (the v loss already carries a
factor SNR + 1 relative to the x0 loss).
"""
from __future__ import annotations

import numpy as np

from .._runtime import jt


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
