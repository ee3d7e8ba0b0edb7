"""Euler samplers in sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 2; k-diffusion's `sample_euler` / `sample_euler_ancestral`).

The latent lives at x = x0 + sigma * eps with sigma = sqrt((1 - a_t) / a_t); the UNet sees
x / sqrt(sigma^2 + 1) (`scale_model_input`). Like diffusers, `timesteps` are float32 and may be
fractional (linspace spacing, Karras sigmas): pass them to the UNet as they are.
Matches diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .scheduling_utils import (ConfigError, SchedulerConfig, SchedulerOutput, SigmaSchedulerMixin, karras_sigmas,
                               per_sample, randn_like, sigma_to_t, spaced_timesteps)


@dataclass
class EulerDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False
    sigma_min: Optional[float] = None  # Karras range; None: the schedule's own
    sigma_max: Optional[float] = None
    final_sigmas_type: str = "zero"  # zero | sigma_min
    rescale_betas_zero_snr: bool = False


@dataclass
class EulerAncestralDiscreteConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    rescale_betas_zero_snr: bool = False


class _EulerBase(SigmaSchedulerMixin):
    """Sigma tables, input scaling and `add_noise` shared by both Euler samplers."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.rescale_betas_zero_snr:  # keep sigma_T finite, as diffusers does
            self.alphas_cumprod[-1] = np.float32(2.0 ** -24)
        # sigma of every training timestep, ascending in t: (T,) float32
        self.train_sigmas = np.sqrt((np.float32(1.0) - self.alphas_cumprod) / self.alphas_cumprod)
        T = self.config.num_train_timesteps
        self.timesteps = np.linspace(0, T - 1, T)[::-1].astype(np.float32)
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting latent: sigma_max (or sqrt(sigma_max^2 + 1) for leading spacing, like diffusers)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma ** 2 + np.float32(1.0)))

    def _schedule_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending timesteps (float64, linspace ones fractional) and the interpolated sigmas."""
        ts = spaced_timesteps(self.config.num_train_timesteps, num_inference_steps, self.config.timestep_spacing,
                              self.config.steps_offset).astype(np.float32)
        sigmas = np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)
        return ts, sigmas

    def _reset(self, timesteps: np.ndarray, sigmas: np.ndarray, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = sigmas.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): the UNet was trained on unit-variance inputs."""
        self._init_step_index(timestep)
        sigma = float(self.sigmas[self._step_index])
        return sample / math.sqrt(sigma ** 2 + 1)

    def add_noise(self, original_samples, noise, timesteps):
        """x0 + sigma * noise for timesteps taken from `.timesteps` (img2img)."""
        sigma = self.sigmas[self._sigma_indices(timesteps)]
        return original_samples + noise * per_sample(sigma, original_samples)

    def _x0(self, model_output, sample, sigma: float, sigma_hat: float):
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma_hat * model_output
        if kind == "v_prediction":  # x0 = x / (s^2 + 1) - s v / sqrt(s^2 + 1)
            return model_output * (-sigma / math.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
        return model_output  # "sample"


class EulerDiscreteScheduler(_EulerBase):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma; optional churn (s_churn)."""

    config_class = EulerDiscreteConfig
    unsupported = {"interpolation_type": ("linear",), "use_exponential_sigmas": (False, None),
                   "use_beta_sigmas": (False, None), "timestep_type": ("discrete",)}
    stochastic = False  # True when step is called with s_churn > 0

    def _check_config(self) -> None:
        super()._check_config()
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"))
        self._check_choice("final_sigmas_type", ("zero", "sigma_min"))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (float32, descending) and sigmas (one more, ending at 0 or sigma_min); resets the step index."""
        ts, sigmas = self._schedule_timesteps(num_inference_steps)
        if self.config.use_karras_sigmas:
            sigma_min = self.config.sigma_min if self.config.sigma_min is not None else float(sigmas[-1])
            sigma_max = self.config.sigma_max if self.config.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            ts = sigma_to_t(sigmas, np.log(self.train_sigmas))
        if self.config.final_sigmas_type == "sigma_min":
            last = self.train_sigmas[0]
        else:
            last = 0.0
        self._reset(ts, np.concatenate([sigmas, [last]]), num_inference_steps)

    def step(self, model_output, timestep, sample, noise=None, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0) -> SchedulerOutput:
        """x_{i+1} = x_i + (x_i - x0) / sigma_hat * (sigma_{i+1} - sigma_hat) (Karras et al. Alg. 2).

        With s_churn > 0 the step first raises sigma to sigma_hat = sigma (1 + gamma) by adding
        `noise` (a Var like `sample`; drawn when None).
        """
        self._init_step_index(timestep)
        i = self._step_index
        sigma = float(self.sigmas[i])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        out_dtype = model_output.dtype
        sample = sample.float32()
        if gamma > 0:
            eps = (randn_like(model_output) if noise is None else noise) * s_noise
            sample = sample + eps * math.sqrt(sigma_hat ** 2 - sigma ** 2)
        x0 = self._x0(model_output, sample, sigma, sigma_hat)
        derivative = (sample - x0) / sigma_hat
        prev = sample + derivative * (float(self.sigmas[i + 1]) - sigma_hat)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev.cast(out_dtype), pred_original_sample=x0)

    def get_velocity(self, sample, noise, timesteps):
        raise NotImplementedError("EulerDiscreteScheduler has no training-side get_velocity here "
                                  "(diffusers' version indexes alphas_cumprod by schedule position); "
                                  "use DDPMScheduler.get_velocity")


class EulerAncestralDiscreteScheduler(_EulerBase):
    """Euler step down to sigma_down, then fresh noise up to sigma_{i+1} (k-diffusion `sample_euler_ancestral`)."""

    config_class = EulerAncestralDiscreteConfig
    stochastic = True

    def _check_config(self) -> None:
        super()._check_config()
        if self.config.prediction_type == "sample":
            raise ConfigError("EulerAncestralDiscreteScheduler: prediction_type='sample' is not supported "
                              "(diffusers does not implement it either)")
        self._check_choice("prediction_type", ("epsilon", "v_prediction"))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (float32, descending) and sigmas (one more, ending at 0); resets the step index."""
        ts, sigmas = self._schedule_timesteps(num_inference_steps)
        self._reset(ts, np.concatenate([sigmas, [0.0]]), num_inference_steps)

    def step(self, model_output, timestep, sample, noise=None) -> SchedulerOutput:
        """Ancestral Euler: sigma_up^2 = s_to^2 (s^2 - s_to^2) / s^2, sigma_down^2 = s_to^2 - sigma_up^2;
        x <- x + d (sigma_down - s) + sigma_up * noise (noise: a Var like `sample`; drawn when None)."""
        self._init_step_index(timestep)
        i = self._step_index
        sigma, sigma_to = float(self.sigmas[i]), float(self.sigmas[i + 1])
        out_dtype = model_output.dtype
        sample = sample.float32()
        x0 = self._x0(model_output, sample, sigma, sigma)
        sigma_up = math.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
        sigma_down = math.sqrt(max(sigma_to ** 2 - sigma_up ** 2, 0.0))
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        if sigma_up > 0 or noise is not None:
            prev = prev + (randn_like(model_output) if noise is None else noise) * sigma_up
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev.cast(out_dtype), pred_original_sample=x0)
