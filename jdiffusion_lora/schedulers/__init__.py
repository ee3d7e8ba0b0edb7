"""Noise schedulers matching diffusers 0.42 step for step (DDPM, DDIM, DPM-Solver, Euler, PNDM).

    scheduler = load_scheduler("path/to/sd", subfolder="scheduler")   # class from _class_name
    scheduler = DDIMScheduler.from_config(scheduler.config)           # or switch sampler
    scheduler.set_timesteps(30)
    latents = randn * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(latents, t), t, ...)
        latents = scheduler.step(eps, t, latents, noise=per_image_noise).prev_sample
"""
from typing import Optional

from .scheduling_ddim import DDIMConfig, DDIMScheduler
from .scheduling_ddpm import DDPMConfig, DDPMScheduler
from .scheduling_dpmsolver_multistep import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from .scheduling_euler import (EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler, EulerDiscreteConfig,
                               EulerDiscreteScheduler)
from .scheduling_pndm import PNDMConfig, PNDMScheduler
from .scheduling_utils import ConfigError, SchedulerConfig, SchedulerMixin, SchedulerOutput

# diffusers class name -> our class
SCHEDULERS = {cls.__name__: cls for cls in (
    DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler, PNDMScheduler)}


def load_scheduler(folder: str, subfolder: Optional[str] = None, class_name: Optional[str] = None, **overrides):
    """Load the scheduler a folder's `scheduler_config.json` names (`_class_name`), or `class_name` instead."""
    config = SchedulerMixin.load_config(folder, subfolder)
    name = class_name or config.get("_class_name")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name!r} is not supported; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config, **overrides)


__all__ = [
    "SCHEDULERS", "load_scheduler", "ConfigError", "SchedulerConfig", "SchedulerMixin", "SchedulerOutput",
    "DDPMScheduler", "DDPMConfig", "DDIMScheduler", "DDIMConfig", "DPMSolverMultistepScheduler",
    "DPMSolverMultistepConfig", "EulerDiscreteScheduler", "EulerDiscreteConfig", "EulerAncestralDiscreteScheduler",
    "EulerAncestralDiscreteConfig", "PNDMScheduler", "PNDMConfig",
]
