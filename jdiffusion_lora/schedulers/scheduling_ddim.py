"""DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models". Matches diffusers' `DDIMScheduler`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scheduling_utils import SchedulerConfig, SchedulerMixin, SchedulerOutput, as_number, randn_like


@dataclass
class DDIMConfig(SchedulerConfig):
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # alpha_bar after the last step: 1, or alpha_bar_0
    rescale_betas_zero_snr: bool = False


class DDIMScheduler(SchedulerMixin):
    """Deterministic for eta=0; with eta>0 `step` adds `noise` (DDPM is eta=1)."""

    config_class = DDIMConfig
    unsupported = {"thresholding": (False,)}
    stochastic = False  # True when step is called with eta > 0

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps = np.arange(self.config.num_train_timesteps)[::-1].astype(np.int64)

    def _check_config(self) -> None:
        super()._check_config()
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))

    def step(self, model_output, timestep, sample, noise=None, eta: float = 0.0,
             use_clipped_model_output: bool = False) -> SchedulerOutput:
        """x_{t'} = sqrt(a_t') x0 + sqrt(1 - a_t' - s^2) eps + s noise, s = eta * sigma_t (Song et al. eq. 12, 16).

        Like diffusers, the previous timestep is t - T // num_inference_steps for every spacing.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(as_number(timestep))
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = self._x0_and_eps(model_output, sample, a_t)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:  # re-derive eps from the clipped x0
            eps = (sample - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)

        variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = eta * math.sqrt(variance)
        prev = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - std ** 2) * eps
        if eta > 0:
            prev = prev + std * (randn_like(sample) if noise is None else noise)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)
