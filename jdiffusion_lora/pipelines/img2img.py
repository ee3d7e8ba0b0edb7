"""Image-to-image Stable Diffusion: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing
with Stochastic Differential Equations").

Encode the start image, noise it to the level of step `(1 - strength) * num_inference_steps`, and run
the rest of the text-to-image schedule from there (the same loop: `StableDiffusionPipeline.denoise`).
strength 1 starts from (almost) pure noise; small strengths keep the image's layout and colours.

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)          # same models, no copy
    images = img2img("a cat, watercolor", image=start, strength=0.8, seed=1).images

Randomness, per image from its own seed (see stable_diffusion.py): first the noise added to the start
latent (the draw text-to-image uses for its starting latent), then the VAE posterior sample, then
one draw per step for stochastic samplers.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .._runtime import jt
from .stable_diffusion import PromptArg, StableDiffusionOutput, StableDiffusionPipeline

ImageArg = Union[Image.Image, np.ndarray, "jt.Var", Sequence[Image.Image], Sequence[np.ndarray]]


def check_strength(strength: float) -> float:
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}: 1 repaints everything, "
                         "small values keep more of the start image")
    return strength


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float) -> np.ndarray:
    """The tail of the schedule img2img runs: the last int(steps * strength) steps (as diffusers' get_timesteps).

    Call after `scheduler.set_timesteps`. Tells sigma samplers where they start (`set_begin_index`).
    """
    n_run = min(int(num_inference_steps * strength), num_inference_steps)
    if n_run == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps runs no step: raise either")
    start = (num_inference_steps - n_run) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def images_to_array(image: ImageArg, height: int, width: int) -> np.ndarray:
    """PIL image(s) or (H, W, 3) / (B, H, W, 3) arrays (floats in [0, 1] or uint8) -> (B, 3, H, W) in [-1, 1].

    Images of another size are resized (Lanczos, as diffusers' image processor) with a warning.
    """
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(items) == 1 and isinstance(items[0], np.ndarray) and items[0].ndim == 4:
        items = list(items[0])
    if not items:
        raise ValueError("image is empty")
    arrays = []
    for k, item in enumerate(items):
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] != 3:
                raise ValueError(f"image {k}: expected an (H, W, 3) array, got shape {item.shape}")
            if item.dtype == np.uint8:
                item = Image.fromarray(item)
            else:
                item = np.asarray(item, dtype=np.float32)
                if item.min() < 0 or item.max() > 1:
                    raise ValueError(f"image {k}: float arrays must hold values in [0, 1]")
                if item.shape[:2] != (height, width):
                    item = Image.fromarray((item * 255).round().astype(np.uint8))
        elif not isinstance(item, Image.Image):
            raise TypeError(f"image {k}: expected a PIL image or a numpy array, got {type(item).__name__}")
        if isinstance(item, Image.Image):
            item = item.convert("RGB")
            if item.size != (width, height):
                warnings.warn(f"image {k} is {item.size[0]}x{item.size[1]}; resized to {width}x{height}",
                              stacklevel=3)
                item = item.resize((width, height), Image.LANCZOS)
            item = np.asarray(item, dtype=np.float32) / 255.0
        arrays.append(item)
    return np.stack(arrays).transpose(0, 3, 1, 2) * 2.0 - 1.0                  # (B, 3, H, W)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """diffusers' `StableDiffusionImg2ImgPipeline`: `pipe(prompt, image=..., strength=0.8, ...)`."""

    def encode_image(self, pixels: np.ndarray, gens: List[np.random.Generator]) -> "jt.Var":
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w): a posterior sample, one draw per image."""
        with jt.no_grad():
            posterior = self.vae.encode(jt.array(pixels.astype(np.float32))).latent_dist
            noise = self.draw(gens, tuple(posterior.mean.shape[1:]))
            return posterior.sample(noise) * self.vae.config.scaling_factor

    def __call__(self, prompt: PromptArg, image: ImageArg = None, strength: float = 0.8,
                 negative_prompt: Optional[PromptArg] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, seed=None, generator=None, eta: float = 0.0,
                 output_type: str = "pil", clip_skip: Optional[int] = None, callback=None) -> StableDiffusionOutput:
        """`image`: the start image(s), one for all or one per output image; or latents (B, 4, h, w) already
        scaled, as diffusers accepts. height/width default to the model's size; other sizes are resized."""
        if image is None:
            raise ValueError("img2img needs a start image: pass image=...")
        strength = check_strength(strength)
        prompts, negatives = self._check_call(prompt, negative_prompt, num_images_per_prompt, output_type)
        batch = len(prompts)
        height, width = self._image_size(height, width)
        shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        context = self._guidance_context(prompts, negatives, guidance_scale, clip_skip)  # (2B or B, 77, D)

        gens, seeds = self.make_generators(batch, seed, generator)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = img2img_timesteps(self.scheduler, num_inference_steps, strength)
        noise = self.draw(gens, shape)                                          # (B, 4, h, w)
        given_latents = isinstance(image, jt.Var) or (isinstance(image, np.ndarray) and image.ndim == 4
                                                       and image.shape[1] == shape[0])
        if given_latents:
            init = image if isinstance(image, jt.Var) else jt.array(image.astype(np.float32))
            if tuple(init.shape[1:]) != shape:
                raise ValueError(f"image latents have shape {tuple(init.shape)}, expected (B, *{shape})")
            init = self._repeat_to(init, batch)
        else:
            pixels = images_to_array(image, height, width)                      # (n, 3, H, W)
            init = self.encode_image(self._repeat_to(pixels, batch), gens)      # (B, 4, h, w)
        latents = self.scheduler.add_noise(init, noise, np.repeat(timesteps[:1], batch))
        latents = self.denoise(latents, timesteps, context, gens, guidance_scale, eta, callback)
        return self._output(latents, seeds, output_type)

    @staticmethod
    def _repeat_to(x, batch: int):
        """One start image for all outputs, or one per prompt repeated for num_images_per_prompt, or one each."""
        n = x.shape[0]
        if n == batch:
            return x
        if batch % n:
            raise ValueError(f"got {n} start images for {batch} output images: give 1, or one per image")
        index = np.repeat(np.arange(n), batch // n)
        return x[index] if isinstance(x, np.ndarray) else x[jt.array(index)]
