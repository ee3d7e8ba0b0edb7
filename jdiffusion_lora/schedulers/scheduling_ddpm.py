"""DDPM: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic Models".

Also the training-side scheduler: `add_noise` (forward process) and `get_velocity` (v target).
Matches diffusers' `DDPMScheduler`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scheduling_utils import SchedulerConfig, SchedulerMixin, SchedulerOutput, as_number, randn_like


@dataclass
class DDPMConfig(SchedulerConfig):
    variance_type: str = "fixed_small"  # fixed_small | fixed_small_log | fixed_large
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False


class DDPMScheduler(SchedulerMixin):
    """Ancestral sampler of DDPM; `step` needs fresh noise at every step but the last."""

    config_class = DDPMConfig
    unsupported = {"thresholding": (False,)}
    stochastic = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.timesteps = np.arange(self.config.num_train_timesteps)[::-1].astype(np.int64)

    def _check_config(self) -> None:
        super()._check_config()
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the schedule (-1 after the last); t-1 before `set_timesteps`."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = int(np.nonzero(self.timesteps == timestep)[0][0])
        return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])

    def step(self, model_output, timestep, sample, noise=None) -> SchedulerOutput:
        """One step of p(x_{t'} | x_t): the posterior mean of q(x_{t'} | x_t, x0) (Ho et al. eq. 7)
        at the predicted x0, plus sigma_t * noise (noise: a Var like `sample`, drawn when None)."""
        t = int(as_number(timestep))
        prev_t = self.previous_timestep(t)
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        alpha_t = a_t / a_prev  # alpha of this (possibly multi-step) jump
        beta_t = 1.0 - alpha_t

        x0, _ = self._x0_and_eps(model_output, sample, a_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        prev = (math.sqrt(a_prev) * beta_t / b_t) * x0 + (math.sqrt(alpha_t) * b_prev / b_t) * sample
        if t > 0:
            if self.config.variance_type == "fixed_large":
                std = math.sqrt(beta_t)
            else:  # fixed_small(_log): the posterior variance beta~_t
                std = math.sqrt(max(b_prev / b_t * beta_t, 1e-20))
            prev = prev + std * (randn_like(sample) if noise is None else noise)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
