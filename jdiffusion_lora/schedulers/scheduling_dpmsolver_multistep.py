"""Multistep DPM-Solver (Lu et al. 2022, "DPM-Solver", NeurIPS) and DPM-Solver++ (Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"), with the SDE
variants of DPM-Solver++ (k-diffusion's "DPM++ 2M SDE"). Matches diffusers' `DPMSolverMultistepScheduler`.

Notation: at noise level sigma (the table value), alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t,
lambda = log(alpha_t / sigma_t) (half log-SNR), h = lambda_next - lambda_now. The solver keeps the last
`solver_order` converted model outputs (x0 for the ++ variants, eps otherwise) and extrapolates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scheduling_utils import (ConfigError, SchedulerConfig, SchedulerOutput, SigmaSchedulerMixin, as_number,
                               karras_sigmas, per_sample, randn_like, sigma_to_t)

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


@dataclass
class DPMSolverMultistepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"
    solver_order: int = 2             # 1, 2 or 3 (3 not for sde-dpmsolver)
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"     # midpoint | heun (second order only)
    lower_order_final: bool = True    # first/second order for the last steps when < 15 steps
    euler_at_final: bool = False      # first order for the last step
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"   # zero | sigma_min ("dpmsolver" needs sigma_min)
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False


def _alpha_sigma(sigma: float):
    """VP (alpha_t, sigma_t) for a table sigma; lambda = log(alpha_t) - log(sigma_t) (inf at sigma = 0)."""
    alpha_t = 1.0 / math.sqrt(sigma ** 2 + 1)
    sigma_t = sigma * alpha_t
    with np.errstate(divide="ignore"):
        lam = float(np.log(alpha_t) - np.log(sigma_t))
    return alpha_t, sigma_t, lam


class DPMSolverMultistepScheduler(SigmaSchedulerMixin):
    """Stateful: keeps previous model outputs; `set_timesteps` resets the state."""

    config_class = DPMSolverMultistepConfig
    unsupported = {"thresholding": (False,), "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
                   "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None), "variance_type": (None,),
                   "use_dynamic_shifting": (False, None)}

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.rescale_betas_zero_snr:  # keep sigma_T finite, as diffusers does
            self.alphas_cumprod[-1] = np.float32(2.0 ** -24)
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(np.float32(1.0) - self.alphas_cumprod)
        self.lambda_t = (np.log(alpha_t) - np.log(sigma_t)).astype(np.float32)  # (T,) float32
        self.train_sigmas = np.sqrt((np.float32(1.0) - self.alphas_cumprod) / self.alphas_cumprod)
        T = self.config.num_train_timesteps
        self.timesteps = np.arange(T)[::-1].astype(np.int64)
        self.sigmas = self.train_sigmas.copy()
        self._reset_state()

    @property
    def stochastic(self) -> bool:
        return self.config.algorithm_type.startswith("sde-")

    def _check_config(self) -> None:
        super()._check_config()
        # diffusers maps these names of other solvers onto supported ones
        if self.config.algorithm_type == "deis":
            self._replace_config(algorithm_type="dpmsolver++")
        if self.config.solver_type in ("logrho", "bh1", "bh2"):
            self._replace_config(solver_type="midpoint")
        c = self.config
        self._check_choice("algorithm_type", ALGORITHMS)
        self._check_choice("solver_type", ("midpoint", "heun"))
        self._check_choice("solver_order", (1, 2, 3))
        self._check_choice("prediction_type", ("epsilon", "v_prediction", "sample"))
        self._check_choice("final_sigmas_type", ("zero", "sigma_min"))
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver") and c.final_sigmas_type == "zero":
            raise ConfigError(f"DPMSolverMultistepScheduler: final_sigmas_type='zero' does not work with "
                              f"algorithm_type={c.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            raise ConfigError("DPMSolverMultistepScheduler: sde-dpmsolver has no third-order solver")

    def _reset_state(self) -> None:
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Timesteps (int64, descending) and sigmas (one more); resets the multistep state."""
        c = self.config
        T = c.num_train_timesteps
        clipped = int(np.searchsorted(self.lambda_t[::-1], c.lambda_min_clipped))
        last = T - clipped
        n = num_inference_steps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif c.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1)))[::-1][:-1] + c.steps_offset
        else:  # trailing
            ts = np.arange(last, 0, -T / n).round() - 1
        ts = ts.astype(np.int64)

        if c.use_karras_sigmas:
            descending = self.train_sigmas[::-1]
            sigmas = karras_sigmas(float(descending[-1]), float(descending[0]), n)
            ts = sigma_to_t(sigmas, np.log(self.train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(T), self.train_sigmas)
        last_sigma = self.train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        self.timesteps = ts
        self.num_inference_steps = len(ts)
        self._reset_state()

    def index_for_timestep(self, timestep) -> int:
        """Like the base rule, but a timestep not in the schedule maps to the last index (diffusers)."""
        hits = np.nonzero(self.timesteps == int(as_number(timestep)))[0]
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    # --------------------------------------------------------------- the solver

    def _convert_model_output(self, model_output, sample):
        """Model output -> x0 (DPM-Solver++, data prediction) or eps (DPM-Solver, noise prediction)."""
        alpha_t, sigma_t, _ = _alpha_sigma(float(self.sigmas[self._step_index]))
        kind = self.config.prediction_type
        if self.config.algorithm_type.endswith("++"):
            if kind == "epsilon":
                return (sample - sigma_t * model_output) / alpha_t
            if kind == "v_prediction":
                return alpha_t * sample - sigma_t * model_output
            return model_output
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        return (sample - alpha_t * model_output) / sigma_t

    def _first_order(self, m0, sample, noise):
        """DPM-Solver-1 (= DDIM): Lu et al. eq. 3.7 (noise) / DPM-Solver++ eq. 5 (data); SDE: DPM-Solver++ eq. 9."""
        i = self._step_index
        alpha_t, sigma_t, lam_t = _alpha_sigma(float(self.sigmas[i + 1]))
        alpha_s, sigma_s, lam_s = _alpha_sigma(float(self.sigmas[i]))
        h = lam_t - lam_s
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (math.exp(-h) - 1.0)) * m0
        if algo == "dpmsolver":
            return (alpha_t / alpha_s) * sample - (sigma_t * (math.exp(h) - 1.0)) * m0
        if algo == "sde-dpmsolver++":
            return ((sigma_t / sigma_s * math.exp(-h)) * sample + (alpha_t * (1 - math.exp(-2.0 * h))) * m0
                    + (sigma_t * math.sqrt(1.0 - math.exp(-2 * h))) * noise)
        return ((alpha_t / alpha_s) * sample - (2.0 * sigma_t * (math.exp(h) - 1.0)) * m0
                + (sigma_t * math.sqrt(math.exp(2 * h) - 1.0)) * noise)

    def _second_order(self, sample, noise):
        """Multistep 2nd order: D0 = m0, D1 = (m0 - m1) / r0 with r0 = h_prev / h (DPM-Solver++ Alg. 2)."""
        i = self._step_index
        alpha_t, sigma_t, lam_t = _alpha_sigma(float(self.sigmas[i + 1]))
        alpha_s0, sigma_s0, lam_s0 = _alpha_sigma(float(self.sigmas[i]))
        _, _, lam_s1 = _alpha_sigma(float(self.sigmas[i - 1]))
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        D0, D1 = m0, (1.0 / (h_0 / h)) * (m0 - m1)
        algo, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if algo == "dpmsolver++":
            c = alpha_t * (math.exp(-h) - 1.0)
            c1 = -0.5 * c if midpoint else alpha_t * ((math.exp(-h) - 1.0) / h + 1.0)
            return (sigma_t / sigma_s0) * sample - c * D0 + c1 * D1
        if algo == "dpmsolver":
            c = sigma_t * (math.exp(h) - 1.0)
            c1 = 0.5 * c if midpoint else sigma_t * ((math.exp(h) - 1.0) / h - 1.0)
            return (alpha_t / alpha_s0) * sample - c * D0 - c1 * D1
        if algo == "sde-dpmsolver++":
            c = alpha_t * (1 - math.exp(-2.0 * h))
            c1 = 0.5 * c if midpoint else alpha_t * ((1.0 - math.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            return ((sigma_t / sigma_s0 * math.exp(-h)) * sample + c * D0 + c1 * D1
                    + (sigma_t * math.sqrt(1.0 - math.exp(-2 * h))) * noise)
        c = 2.0 * sigma_t * (math.exp(h) - 1.0)  # sde-dpmsolver
        c1 = 0.5 * c if midpoint else 2.0 * sigma_t * ((math.exp(h) - 1.0) / h - 1.0)
        return ((alpha_t / alpha_s0) * sample - c * D0 - c1 * D1
                + (sigma_t * math.sqrt(math.exp(2 * h) - 1.0)) * noise)

    def _third_order(self, sample, noise):
        """Multistep 3rd order (DPM-Solver eq. 4.7 / DPM-Solver++ multistep analogue)."""
        i = self._step_index
        alpha_t, sigma_t, lam_t = _alpha_sigma(float(self.sigmas[i + 1]))
        alpha_s0, sigma_s0, lam_s0 = _alpha_sigma(float(self.sigmas[i]))
        _, _, lam_s1 = _alpha_sigma(float(self.sigmas[i - 1]))
        _, _, lam_s2 = _alpha_sigma(float(self.sigmas[i - 2]))
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            e = math.exp(-h) - 1.0
            return ((sigma_t / sigma_s0) * sample - (alpha_t * e) * m0 + (alpha_t * (e / h + 1.0)) * D1
                    - (alpha_t * ((e + h) / h ** 2 - 0.5)) * D2)
        if algo == "dpmsolver":
            e = math.exp(h) - 1.0
            return ((alpha_t / alpha_s0) * sample - (sigma_t * e) * m0 - (sigma_t * (e / h - 1.0)) * D1
                    - (sigma_t * ((e - h) / h ** 2 - 0.5)) * D2)
        e = 1.0 - math.exp(-2.0 * h)  # sde-dpmsolver++
        return ((sigma_t / sigma_s0 * math.exp(-h)) * sample + (alpha_t * e) * m0
                + (alpha_t * (e / (-2.0 * h) + 1.0)) * D1 + (alpha_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
                + (sigma_t * math.sqrt(e)) * noise)

    def step(self, model_output, timestep, sample, noise=None) -> SchedulerOutput:
        """One multistep update. The first steps (and, with lower_order_final and < 15 steps, the
        last ones) use a lower order. `noise` is used by the SDE variants only (drawn when None)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        self._init_step_index(timestep)
        c, i, n = self.config, self._step_index, len(self.timesteps)
        lower_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                            or c.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and c.lower_order_final and n < 15

        out_dtype = model_output.dtype
        m = self._convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        sample = sample.float32()
        if self.stochastic:
            noise = randn_like(sample) if noise is None else noise.float32()
        else:
            noise = None

        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev = self._first_order(m, sample, noise)
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev = self._second_order(sample, noise)
        else:
            prev = self._third_order(sample, noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1

        if c.algorithm_type.endswith("++"):
            x0 = m
        else:
            alpha_s, sigma_s, _ = _alpha_sigma(float(self.sigmas[i]))
            x0 = (sample - sigma_s * m) / alpha_s
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev.cast(out_dtype), pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t x0 + sigma_t noise at the sigma of each timestep of `.timesteps` (img2img)."""
        sigma = self.sigmas[self._sigma_indices(timesteps)].astype(np.float64)
        alpha_t = 1.0 / np.sqrt(sigma ** 2 + 1)
        return (per_sample(alpha_t, original_samples) * original_samples
                + per_sample(sigma * alpha_t, original_samples) * noise)
