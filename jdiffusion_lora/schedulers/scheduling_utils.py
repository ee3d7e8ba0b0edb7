"""Shared scheduler plumbing: configs, noise schedules (betas), loading and saving.

Every scheduler here matches the diffusers class of the same name step for step. Each one has a
config dataclass (a subclass of `SchedulerConfig`) whose field names are the diffusers
`scheduler_config.json` keys, so a diffusers config loads with no renaming and `save_pretrained`
writes a file diffusers reads back.

Numerics: the tables are float32 like diffusers': `betas` and `alphas_cumprod` are bit-identical to
diffusers' torch tables (with `rescale_betas_zero_snr` to ~1e-6 relative), `sigmas` within one
float32 ulp (torch's float32 sqrt is not always correctly rounded; numpy's is). Per-step scalar
coefficients are computed in float64 from those tables and applied to the jittor Vars (`sample`,
`model_output`), which keep their dtype.

Randomness: stochastic steps take their noise as the `noise` argument (a Var shaped like the
sample), so the caller decides where it comes from (the pipeline draws it per image from that
image's seed). When `noise` is None the scheduler draws `jt.randn` from Jittor's global generator.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .._runtime import jt
from ..configuration import ConfigError, read_config_json
from ..weights import atomic_write_bytes

CONFIG_NAME = "scheduler_config.json"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerConfig:
    """The diffusers scheduler_config.json fields every scheduler here shares.

    Each scheduler subclasses this with its own fields (and diffusers' defaults for them).
    Two plain attributes (not fields) carry what diffusers' config dicts carry when you switch
    scheduler class with `OtherScheduler.from_config(scheduler.config)`:
      `_use_default_values`: fields that were NOT given, left to the other class's defaults (so PNDM's
          default timestep_spacing "leading" does not leak into Euler, whose default is "linspace");
      `_hidden`: given keys this class does not use (SD-2.1's `clip_sample=False` survives a trip
          DDIM -> Euler -> DDIM). `save_pretrained` writes them too, as diffusers does.
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"          # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: Optional[Tuple[float, ...]] = None
    prediction_type: str = "epsilon"       # epsilon | v_prediction | sample
    timestep_spacing: str = "leading"      # leading | trailing | linspace
    steps_offset: int = 0


@dataclass
class SchedulerOutput:
    """What `step` returns. `pred_original_sample` is the model's x0 estimate (None for PNDM)."""
    prev_sample: Any
    pred_original_sample: Any = None


# ----------------------------------------------------------------------------- noise schedules


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit.

    Torch rounds the end points and the step to float32, then fills the first half forwards
    from `start` and the second half backwards from `end`.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(max(steps - 1, 1)))
    i = np.arange(steps)
    values = np.where(i < steps // 2, float(start32) + float(step) * i, float(end32) - float(step) * (steps - 1 - i))
    return values.astype(np.float32)


def cumprod_float32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 vector (torch accumulates in double on CPU)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17), betas capped at `max_beta`."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.array(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1). float32 like diffusers."""
    alphas_bar_sqrt = np.sqrt(cumprod_float32(np.float32(1.0) - betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * np.float32(first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """The (num_train_timesteps,) float32 beta table the config describes."""
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch_linspace_float32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the Stable Diffusion schedule
        return torch_linspace_float32(config.beta_start ** 0.5, config.beta_end ** 0.5, n) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise ConfigError(f"beta_schedule={config.beta_schedule!r} is not supported (use one of {BETA_SCHEDULES})")


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending float64 timesteps for `timestep_spacing` ("Common Diffusion Noise Schedules...", Table 2).

    linspace: evenly from T-1 to 0 (not rounded here); leading: multiples of T//n plus
    `steps_offset`; trailing: T-1 downwards in steps of T/n.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ConfigError(f"timestep_spacing={spacing!r} is not supported (use one of {TIMESTEP_SPACINGS})")


# ----------------------------------------------------------------------------- sigma helpers (Karras et al.)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022 ("Elucidating the Design Space...", eq. 5), float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, None]  # (T, N)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


# ----------------------------------------------------------------------------- small Var helpers


def as_number(timestep):
    """A timestep given as int/float, numpy scalar/array of one element, or jt.Var -> Python number."""
    if isinstance(timestep, jt.Var):
        return timestep.item()
    if isinstance(timestep, np.ndarray):
        return timestep.item()
    if isinstance(timestep, np.generic):
        return timestep.item()
    return timestep


def as_index_array(timesteps) -> np.ndarray:
    """Timesteps (int, numpy array or jt.Var of shape (B,)) -> (B,) numpy array."""
    if isinstance(timesteps, jt.Var):
        timesteps = timesteps.numpy()
    return np.asarray(timesteps).reshape(-1)


def per_sample(coef: np.ndarray, like) -> "jt.Var":
    """(B,) coefficients -> Var shaped (B, 1, 1, ...) in `like`'s dtype, to broadcast over a batch."""
    coef = np.asarray(coef, dtype=np.float32)
    return jt.array(coef.reshape((-1,) + (1,) * (len(like.shape) - 1))).cast(like.dtype)


def randn_like(sample) -> "jt.Var":
    """Fallback noise when the caller passes none: Jittor's global generator."""
    return jt.randn(tuple(sample.shape)).cast(sample.dtype)


# ----------------------------------------------------------------------------- base class


class SchedulerMixin:
    """Base of all schedulers: config handling, beta tables, training-side `add_noise`.

    Subclasses set `config_class` and, for diffusers options they know but do not implement,
    `unsupported` = {key: accepted value(s)}: such a key with any other value is an error, while
    keys belonging to other scheduler classes are ignored (as diffusers does).
    """

    config_class = SchedulerConfig
    unsupported: Dict[str, Tuple[Any, ...]] = {}
    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: Optional[SchedulerConfig] = None, **kwargs):
        if config is None:
            config = self.config_class()
            config._use_default_values = tuple(f.name for f in dataclasses.fields(config))
        if isinstance(config, Mapping):
            config = self.config_from_dict(config)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}; use {type(self).__name__}.from_config(...)")
        if kwargs:
            self._check_option_names(kwargs)
            config = self.config_from_dict({**self.config_as_dict(config), **kwargs})
        self.config = config
        self._check_config()

        self.betas = make_betas(config)  # (T,) float32
        if getattr(config, "rescale_betas_zero_snr", False):
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = (np.float32(1.0) - self.betas).astype(np.float32)
        self.alphas_cumprod = cumprod_float32(self.alphas)  # alpha_bar_t, (T,) float32
        self.num_inference_steps: Optional[int] = None

    # --------------------------------------------------------------- config

    def _check_config(self) -> None:
        """Reject values this implementation does not support. Subclasses extend it."""
        c = self.config
        if c.trained_betas is None and c.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"{type(self).__name__}: beta_schedule={c.beta_schedule!r} is not supported "
                              f"(use one of {BETA_SCHEDULES})")
        if c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ConfigError(f"{type(self).__name__}: timestep_spacing={c.timestep_spacing!r} is not supported "
                              f"(use one of {TIMESTEP_SPACINGS})")
        if c.trained_betas is not None and len(c.trained_betas) != c.num_train_timesteps:
            raise ConfigError(f"{type(self).__name__}: trained_betas has {len(c.trained_betas)} values, "
                              f"num_train_timesteps is {c.num_train_timesteps}")

    def _replace_config(self, **changes) -> None:
        """`dataclasses.replace` on our config, keeping its record of defaulted fields."""
        old = self.config
        self.config = dataclasses.replace(old, **changes)
        self.config._use_default_values = tuple(k for k in getattr(old, "_use_default_values", ()) if k not in changes)
        self.config._hidden = dict(getattr(old, "_hidden", {}))

    def _check_choice(self, key: str, allowed: Tuple[Any, ...]) -> None:
        value = getattr(self.config, key)
        if value not in allowed:
            raise ConfigError(f"{type(self).__name__}: {key}={value!r} is not supported (use one of {allowed})")

    @classmethod
    def _check_option_names(cls, options: Mapping) -> None:
        """Options passed by hand (not read from a file) must be known to this class."""
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        for key in options:
            if key not in names and key not in cls.unsupported:
                raise TypeError(f"{cls.__name__} has no config option {key!r}")

    @classmethod
    def config_from_dict(cls, data: Mapping) -> SchedulerConfig:
        """Build our config from a scheduler_config.json dict (possibly of another scheduler class).

        Keys starting with "_" and keys our class does not know are ignored (kept in `_hidden`);
        keys in `unsupported` must hold an accepted value. Keys listed in the dict's
        `_use_default_values` (diffusers' in-memory configs) count as not given.
        """
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        defaulted = set(data.get("_use_default_values") or ())
        kwargs, problems = {}, []
        for key, value in data.items():
            if key.startswith("_") or key in defaulted:
                continue
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, (list, np.ndarray)) else value
            elif key in cls.unsupported:
                if value not in cls.unsupported[key]:
                    problems.append(f"{key}={value!r} (supported: {cls.unsupported[key]!r})")
        if problems:
            raise ConfigError(f"{cls.__name__} does not support " + ", ".join(problems))
        config = cls.config_class(**kwargs)
        config._use_default_values = tuple(sorted(names - set(kwargs)))
        config._hidden = {k: v for k, v in data.items()
                          if not k.startswith("_") and k not in defaulted and k not in names}
        return config

    @staticmethod
    def config_as_dict(config: SchedulerConfig) -> Dict[str, Any]:
        """What was given: the hidden keys of other classes plus the fields not left at their default."""
        defaulted = set(getattr(config, "_use_default_values", ()))
        given = {k: v for k, v in dataclasses.asdict(config).items() if k not in defaulted}
        return {**getattr(config, "_hidden", {}), **given}

    @classmethod
    def from_config(cls, config, **overrides):
        """From a config dict (scheduler_config.json, any scheduler class) or another scheduler's `.config`.

        `overrides` replace config values, e.g. `DDIMScheduler.from_config(cfg, timestep_spacing="trailing")`.
        """
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            data = cls.config_as_dict(config)
        elif isinstance(config, Mapping):
            data = dict(config)
        else:
            raise TypeError(f"from_config needs a dict or a scheduler config, got {type(config).__name__}")
        cls._check_option_names(overrides)
        return cls(cls.config_from_dict({**data, **overrides}))

    @staticmethod
    def load_config(folder: str, subfolder: Optional[str] = None) -> Dict[str, Any]:
        """Read `scheduler_config.json` of a folder as a dict."""
        if subfolder:
            folder = os.path.join(folder, subfolder)
        return read_config_json(folder, CONFIG_NAME, "scheduler")

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = None, **overrides):
        """Load from a folder holding `scheduler_config.json` (diffusers layout; the class in it may differ),
        or `org/name` in the local HuggingFace cache."""
        from ..hub import resolve_model
        return cls.from_config(cls.load_config(resolve_model(folder), subfolder), **overrides)

    def save_pretrained(self, folder: str) -> None:
        """Write `scheduler_config.json` (with `_class_name`) that diffusers and we can load."""
        data = {**getattr(self.config, "_hidden", {}), "_class_name": type(self).__name__,
                **dataclasses.asdict(self.config)}
        if data.get("trained_betas") is not None:
            data["trained_betas"] = [float(b) for b in data["trained_betas"]]
        atomic_write_bytes(os.path.join(folder, CONFIG_NAME),
                           [json.dumps(data, indent=2, sort_keys=True).encode("utf-8")])

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # --------------------------------------------------------------- shared math

    def _x0_and_eps(self, model_output, sample, alpha_prod_t: float):
        """Model output -> (x0, epsilon) at a timestep with cumulative alpha `alpha_prod_t`.

        x_t = sqrt(a) x0 + sqrt(1-a) eps;  v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022).
        """
        a, b = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - b * model_output) / a, model_output
        if kind == "sample":
            return model_output, (sample - a * model_output) / b
        if kind == "v_prediction":
            return a * sample - b * model_output, a * model_output + b * sample
        raise ConfigError(f"prediction_type={kind!r} is not supported")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Pick the `num_inference_steps` timesteps to sample with (descending int64).

        The discrete-timestep samplers (DDPM, DDIM) use this; sigma-based and multistep ones override it.
        """
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} is more than num_train_timesteps={T}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = np.round(spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing,
                                                   self.config.steps_offset)).astype(np.int64)

    def add_noise(self, original_samples, noise, timesteps):
        """Forward diffusion q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample.

        `timesteps`: training timesteps, shape (B,) (numpy or jt.Var) or a single int.
        """
        t = as_index_array(timesteps).astype(np.int64)
        a = self.alphas_cumprod[t]
        return (per_sample(np.sqrt(a), original_samples) * original_samples
                + per_sample(np.sqrt(np.float32(1.0) - a), original_samples) * noise)

    def get_velocity(self, sample, noise, timesteps):
        """v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022, "Progressive
        Distillation", sec. 4). `sample` is x0."""
        t = as_index_array(timesteps).astype(np.int64)
        a = self.alphas_cumprod[t]
        return per_sample(np.sqrt(a), sample) * noise - per_sample(np.sqrt(np.float32(1.0) - a), sample) * sample

    def scale_model_input(self, sample, timestep=None):
        """Input scaling before the UNet; the identity for variance-preserving samplers."""
        return sample


class SigmaSchedulerMixin(SchedulerMixin):
    """Shared by the schedulers that walk a sigma table and count steps (Euler, DPM-Solver).

    `sigmas` has one entry more than `timesteps` (the final sigma). The step index is found from the
    first timestep passed to `step`/`scale_model_input`, then advances by one per step, like diffusers.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index of `timesteps` (img2img skips the first steps)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in `timesteps`; the second match when it occurs twice (diffusers' rule)."""
        hits = np.nonzero(self.timesteps == np.asarray(as_number(timestep), dtype=self.timesteps.dtype))[0]
        if len(hits) == 0:
            raise ValueError(f"timestep {as_number(timestep)} is not in this scheduler's timesteps; "
                             "call set_timesteps and pass values from .timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _sigma_indices(self, timesteps) -> list:
        """Schedule positions for `add_noise` (diffusers' rule: look up unless a begin index is set)."""
        ts = as_index_array(timesteps)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in ts]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(ts)
