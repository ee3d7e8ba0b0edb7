"""PNDM / PLMS: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds".

The default scheduler of Stable Diffusion 1.x folders (with `skip_prk_steps=True`: pure PLMS, a
linear multistep method whose first steps bootstrap from lower orders). Matches diffusers' `PNDMScheduler`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scheduling_utils import SchedulerConfig, SchedulerMixin, SchedulerOutput, as_number, spaced_timesteps


@dataclass
class PNDMConfig(SchedulerConfig):
    skip_prk_steps: bool = False    # True: PLMS only (SD folders); False: 4 Runge-Kutta steps first
    set_alpha_to_one: bool = False  # alpha_bar after the last step: 1, or alpha_bar_0


class PNDMScheduler(SchedulerMixin):
    """Stateful: keeps the last model outputs (`ets`); `set_timesteps` resets the state.

    With PLMS the second timestep appears twice in `.timesteps`: call the model and `step` for each entry.
    """

    config_class = PNDMConfig
    stochastic = False
    pndm_order = 4

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps = None
        self.prk_timesteps = np.array([], dtype=np.int64)
        self.plms_timesteps = None
        self._reset_state()

    def _check_config(self) -> None:
        super()._check_config()
        self._check_choice("prediction_type", ("epsilon", "v_prediction"))

    def _reset_state(self) -> None:
        self.ets = []                 # past model outputs, oldest first
        self.counter = 0              # steps taken since set_timesteps
        self.cur_model_output = None  # running Runge-Kutta sum
        self.cur_sample = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (int64): PRK ones (if any) then PLMS ones; resets the multistep state."""
        T = self.config.num_train_timesteps
        self.num_inference_steps = num_inference_steps
        ascending = np.round(spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing,
                                              self.config.steps_offset))[::-1].astype(np.int64)
        if self.config.skip_prk_steps:
            # the second-to-last ascending timestep is repeated: PLMS' first step is a 2-stage (Heun-like) step
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half = T // num_inference_steps // 2
            prk = ascending[-self.pndm_order:].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    def step(self, model_output, timestep, sample, noise=None) -> SchedulerOutput:
        """One PRK or PLMS step (deterministic; `noise` is ignored)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(as_number(timestep))
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self._step_prk(model_output, t, sample)
        return self._step_plms(model_output, t, sample)

    def _step_prk(self, model_output, timestep: int, sample) -> SchedulerOutput:
        """Pseudo Runge-Kutta (Liu et al. eq. 13): four model calls per step, weights 1/6, 1/3, 1/3, 1/6."""
        diff_to_prev = 0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = None
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev = self._transfer(cur_sample, timestep, prev_t, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev)

    def _step_plms(self, model_output, timestep: int, sample) -> SchedulerOutput:
        """Pseudo linear multistep (Liu et al. eq. 12): Adams-Bashforth weights on the last 4 outputs."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: PLMS steps need the PRK steps first; start from set_timesteps")
        jump = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = timestep - jump
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:  # second call at the repeated timestep: redo the first jump
            prev_t, timestep = timestep, timestep + jump

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        prev = self._transfer(sample, timestep, prev_t, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev)

    def _transfer(self, sample, timestep: int, prev_timestep: int, model_output):
        """The transfer part phi(x_t, eps, t, t') of Liu et al. eq. 11 (a DDIM step written in eps)."""
        a_t = float(self.alphas_cumprod[timestep])
        a_prev = float(self.alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        if self.config.prediction_type == "v_prediction":  # v -> eps
            model_output = math.sqrt(a_t) * model_output + math.sqrt(b_t) * sample
        sample_coeff = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(b_prev) + math.sqrt(a_t * b_t * a_prev)
        return sample_coeff * sample - ((a_prev - a_t) / denom) * model_output
