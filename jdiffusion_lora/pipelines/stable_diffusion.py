"""Text-to-image Stable Diffusion (Rombach et al. 2022) with classifier-free guidance (Ho & Salimans 2022).

Usage mirrors diffusers:

    pipe = StableDiffusionPipeline.from_pretrained("path/to/stable-diffusion-2-1")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe("a red circle", num_inference_steps=30, seed=1234).images

Reproducibility contract: every image owns a numpy `Generator` built from its own seed. From it
we draw, in this order, the image's starting latent (drawn even when `latents` are given) and then
(only for stochastic samplers) one noise tensor per step. Nothing else touches it, so an image is
the same whether it is made alone or in a batch, and whatever its position in the batch.
"""
from __future__ import annotations

import gc
import json
import os
import warnings
from dataclasses import dataclass
from contextlib import contextmanager
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .._runtime import jt
from ..hub import resolve_model
from ..lora import LoraLoaderMixin
from ..models.autoencoder_kl import AutoencoderKL
from ..models.clip import CLIPTextModel
from ..models.clip_tokenizer import CLIPTokenizer
from ..models.modeling import config_from_dict, to_model_dtype
from ..models.unet_2d_condition import UNet2DConditionModel
from ..schedulers import SCHEDULERS, DDIMScheduler
from .single_file import is_single_file
from .textual_inversion import TextualInversionLoaderMixin

PromptArg = Union[str, Sequence[str]]


@dataclass
class StableDiffusionOutput:
    images: Union[List[Image.Image], np.ndarray, "jt.Var"]  # PIL list, (B, H, W, 3) floats in [0, 1], or latents
    seeds: List[Optional[int]]


def numpy_to_pil(images: np.ndarray) -> List[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded like diffusers: x * 255, round)."""
    return [Image.fromarray((img * 255).round().astype("uint8")) for img in images]


def _as_list(prompt: PromptArg) -> List[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _read_model_index(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    with open(path) as f:
        return json.load(f)


class DeferredModel:
    """A component of a low-memory pipeline: its config now, its weights only while it runs."""

    def __init__(self, cls, folder: str, variant: Optional[str]):
        self.cls, self.folder, self.variant = cls, folder, variant
        self.config = config_from_dict(cls.config_class, cls.load_config(folder), ignore=cls.config_ignore,
                                       source=os.path.join(folder, "config.json"))

    def load(self):
        return self.cls.from_pretrained(self.folder, variant=self.variant, low_memory=True)


@contextmanager
def loaded(component):
    """Yield the model itself, or load a `DeferredModel` for the duration of the block and free it after."""
    if not isinstance(component, DeferredModel):
        yield component
        return
    model = component.load()
    try:
        yield model
    finally:
        del model
        gc.collect()   # a model caught in a reference cycle would otherwise stay until Python's collector runs
        jt.sync_all()
        jt.gc()


class StableDiffusionPipeline(LoraLoaderMixin, TextualInversionLoaderMixin):
    """Holds the five components and runs text -> latents -> image.

    LoRA methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...) come from `LoraLoaderMixin`,
    `load_textual_inversion` from `TextualInversionLoaderMixin`.
    """

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: UNet2DConditionModel, scheduler, **ignored_components):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.progress_bar_disabled = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str, dtype: Optional[str] = None, variant: Optional[str] = None,
                        scheduler=None, revision: Optional[str] = None, low_memory: bool = False, **components):
        """Load a diffusers-layout folder (`model_index.json` + one subfolder per component).

        `folder` may also be a HuggingFace repository id (`org/name`, found in the local HF cache at
        `revision`, never downloaded) or a single-file checkpoint (see `from_single_file`).
        Components passed as keyword arguments (`unet=my_unet`) are used instead of loading them.
        low_memory: load each model only while it runs (text encoder -> UNet -> VAE), its Linear/Conv2d
        weights in bfloat16 computed in float32, the VAE decoding in tiles (about half the weights' memory).
        """
        folder = resolve_model(folder, revision)
        if is_single_file(folder):
            return cls.from_single_file(folder, dtype=dtype, scheduler=scheduler, **components)
        index = _read_model_index(folder)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if name not in index and name not in components and not (name == "scheduler" and scheduler):
                raise FileNotFoundError(f"{folder}/model_index.json lists no '{name}' component")

        def sub(name):
            path = os.path.join(folder, name)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"component folder missing: {path}")
            return path

        parts = dict(components)   # what the caller passed wins over the folder
        models = (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel))
        if low_memory:
            if dtype not in (None, "float32", "fp32"):
                raise ValueError("low_memory stores weights in bfloat16 itself; leave dtype unset")
            for name, model_cls in models:
                parts.setdefault(name, DeferredModel(model_cls, sub(name), variant))
        for name, model_cls in models:
            if name not in parts:
                parts[name] = model_cls.from_pretrained(sub(name), dtype=dtype, variant=variant)
        if "tokenizer" not in parts:
            parts["tokenizer"] = CLIPTokenizer.from_pretrained(sub("tokenizer"))
        if scheduler is None:
            class_name = index["scheduler"][1] if isinstance(index.get("scheduler"), list) else "DDIMScheduler"
            scheduler_cls = SCHEDULERS.get(class_name)
            if scheduler_cls is None:
                warnings.warn(f"{class_name} is not implemented here; using DDIMScheduler with its config")
                scheduler_cls = DDIMScheduler
            scheduler = scheduler_cls.from_pretrained(sub("scheduler"))
        return cls(scheduler=scheduler, **parts)

    @classmethod
    def from_single_file(cls, path: str, config: Optional[str] = None, original_config: Optional[str] = None,
                         prediction_type: Optional[str] = None, dtype: Optional[str] = None, scheduler=None,
                         **components):
        """Load an original-layout checkpoint (`.safetensors` / `.ckpt`, as A1111 and ComfyUI use).

        SD 1.x / 2.x and the prediction type are read from the weights; `original_config` (the
        original `.yaml`), `config` (a diffusers folder or `org/name` in the HF cache) or
        `prediction_type` say otherwise. See `pipelines/single_file.py`.
        """
        from .single_file import load_single_file
        parts = load_single_file(path, config=resolve_model(config) if config else None,
                                original_config=original_config, prediction_type=prediction_type, dtype=dtype)
        parts.update(components)
        if scheduler is not None:
            parts["scheduler"] = scheduler
        return cls(**parts)

    def save_single_file(self, path: str, dtype: Optional[str] = None) -> None:
        """Write UNet, VAE and text encoder as one original-layout `.safetensors` (A1111 / ComfyUI)."""
        from .single_file import save_single_file
        save_single_file(self, path, dtype=dtype)

    def save_pretrained(self, folder: str, dtype: Optional[str] = None) -> None:
        """Write a diffusers-layout folder that diffusers' `from_pretrained` can read."""
        from ..weights import atomic_write_bytes

        self.unet.save_pretrained(os.path.join(folder, "unet"), dtype=dtype)
        self.vae.save_pretrained(os.path.join(folder, "vae"), dtype=dtype)
        self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype)
        self.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        atomic_write_bytes(os.path.join(folder, "model_index.json"), [json.dumps(index, indent=2).encode()])

    # ------------------------------------------------------------------ helpers

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_bar_disabled = disable

    def encode_prompt(self, prompts: List[str], clip_skip: Optional[int] = None, text_encoder=None) -> "jt.Var":
        """Prompts -> CLIP hidden states (B, 77, D). clip_skip=1 uses the penultimate layer (A1111 convention)."""
        prompts = self.maybe_convert_prompt(list(prompts))
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True)["input_ids"]
        with jt.no_grad(), loaded(text_encoder or self.text_encoder) as text_encoder:
            if clip_skip is None:
                return text_encoder(jt.array(ids)).last_hidden_state.sync()
            out = text_encoder(jt.array(ids), output_hidden_states=True)
            hidden = out.hidden_states[-(clip_skip + 1)]
            return text_encoder.text_model.final_layer_norm(hidden).sync()

    @staticmethod
    def make_generators(batch: int, seed=None, generator=None) -> (List[np.random.Generator], List[Optional[int]]):
        """One numpy Generator per image.

        seed: int (image i gets seed + i) or a list of ints, one per image.
        generator: a numpy Generator (shared, in batch order) or a list of them, one per image.
        """
        if generator is not None:
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch
            if len(gens) != batch:
                raise ValueError(f"got {len(gens)} generators for {batch} images")
            return gens, [None] * batch
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        seeds = [int(seed) + i for i in range(batch)] if np.isscalar(seed) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} images")
        return [np.random.default_rng(s) for s in seeds], seeds

    @staticmethod
    def draw(gens: List[np.random.Generator], shape) -> "jt.Var":
        """Stack one standard-normal draw of `shape` (without batch) per generator -> (B, *shape)."""
        return jt.array(np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens]))

    def decode_latents(self, latents) -> np.ndarray:
        """Latents (B, 4, h, w) -> images (B, H, W, 3) in [0, 1]."""
        with jt.no_grad(), loaded(self.vae) as vae:
            if isinstance(self.vae, DeferredModel):   # low memory: one image at a time, in tiles above 512 px
                vae.enable_slicing()
                vae.tile_sample_min_size = min(vae.tile_sample_min_size, 512)
                vae.tile_latent_min_size = min(vae.tile_latent_min_size, 512 // self.vae_scale_factor)
                vae.enable_tiling()
            image = vae.decode(to_model_dtype(latents / vae.config.scaling_factor, vae)).sample.sync()
        image = (image / 2 + 0.5).clamp(0, 1)
        return image.float32().numpy().transpose(0, 2, 3, 1)

    # ------------------------------------------------------------------ sampling

    @property
    def components(self) -> dict:
        """The five models by name, as diffusers' `pipe.components`: `OtherPipeline(**pipe.components)`
        shares them (no copy)."""
        return dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                    scheduler=self.scheduler)

    @classmethod
    def from_pipe(cls, pipe: "StableDiffusionPipeline") -> "StableDiffusionPipeline":
        """A pipeline of this class on the same models (diffusers' `from_pipe`), e.g. img2img from txt2img."""
        new = cls(**pipe.components)
        new.progress_bar_disabled = pipe.progress_bar_disabled
        return new

    def _check_call(self, prompt: PromptArg, negative_prompt: Optional[PromptArg], num_images_per_prompt: int,
                    output_type: str) -> (List[str], List[str]):
        """Validated (prompts, negatives), one entry per image, ordered prompt by prompt: p0, p0, ..., p1, ..."""
        prompts = _as_list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _as_list(negative_prompt)
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        return prompts, negatives

    def _image_size(self, height: Optional[int], width: Optional[int]) -> (int, int):
        scale = self.vae_scale_factor
        height = height or self.unet.config.sample_size * scale
        width = width or self.unet.config.sample_size * scale
        if height % scale or width % scale:
            raise ValueError(f"height and width must be multiples of {scale}, got {height}x{width}")
        return height, width

    def _guidance_context(self, prompts: List[str], negatives: List[str], guidance_scale: float,
                          clip_skip: Optional[int]) -> "jt.Var":
        """(B, 77, D) text states, or (2B, 77, D) [negatives; prompts] when guidance is on (scale > 1)."""
        with loaded(self.text_encoder) as text_encoder:   # a low-memory pipeline loads it for this block only
            context = self.encode_prompt(prompts, clip_skip, text_encoder)
            if guidance_scale > 1.0:
                context = jt.concat([self.encode_prompt(negatives, clip_skip, text_encoder), context], dim=0)
        return context

    def denoise(self, latents, timesteps, context, gens: List[np.random.Generator], guidance_scale: float,
                eta: float = 0.0, callback=None) -> "jt.Var":
        """The sampling loop shared by text-to-image and image-to-image: walk `timesteps` from `latents`.

        Classifier-free guidance (Ho & Salimans 2022) when guidance_scale > 1: eps = eps_u + s (eps_c - eps_u).
        Stochastic samplers get one fresh noise draw per step from each image's own generator.
        """
        batch, shape = latents.shape[0], tuple(latents.shape[1:])
        do_cfg = guidance_scale > 1.0
        # Samplers that add fresh noise at each step (DDPM, Euler ancestral, DDIM with eta > 0).
        stochastic = getattr(self.scheduler, "stochastic", False) or eta > 0
        step_kwargs = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
        if eta > 0 and not step_kwargs:
            raise ValueError(f"eta is only used by DDIMScheduler, not {type(self.scheduler).__name__}")

        with loaded(self.unet) as unet:   # a low-memory pipeline loads it for the loop only
            for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=self.progress_bar_disabled)):
                with jt.no_grad():
                    x = jt.concat([latents, latents], dim=0) if do_cfg else latents
                    x = self.scheduler.scale_model_input(x, t)
                    # the UNet's prediction: the noise (epsilon) or v, as the scheduler's prediction_type says
                    model_output = unet(to_model_dtype(x, unet), float(t),   # (2B or B, 4, h, w)
                                         to_model_dtype(context, unet)).sample.float32()
                    if do_cfg:   # classifier-free guidance (Ho & Salimans 2022)
                        out_uncond, out_text = model_output[:batch], model_output[batch:]
                        model_output = out_uncond + guidance_scale * (out_text - out_uncond)
                    noise = self.draw(gens, shape) if stochastic else None
                    latents = self.scheduler.step(model_output, t, latents, noise=noise, **step_kwargs).prev_sample
                    latents.sync()
                if callback is not None:
                    callback(i, t, latents)
        return latents

    def _output(self, latents, seeds: List[Optional[int]], output_type: str) -> StableDiffusionOutput:
        if output_type == "latent":
            return StableDiffusionOutput(images=latents, seeds=seeds)
        images = self.decode_latents(latents)
        return StableDiffusionOutput(images=numpy_to_pil(images) if output_type == "pil" else images, seeds=seeds)

    def __call__(self, prompt: PromptArg, negative_prompt: Optional[PromptArg] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, seed=None, generator=None, latents=None, eta: float = 0.0,
                 output_type: str = "pil", clip_skip: Optional[int] = None, callback=None) -> StableDiffusionOutput:
        prompts, negatives = self._check_call(prompt, negative_prompt, num_images_per_prompt, output_type)
        batch = len(prompts)
        height, width = self._image_size(height, width)
        context = self._guidance_context(prompts, negatives, guidance_scale, clip_skip)  # (2B or B, 77, D)

        gens, seeds = self.make_generators(batch, seed, generator)
        shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        self.scheduler.set_timesteps(num_inference_steps)
        start = self.draw(gens, shape)                                        # (B, 4, h, w), always drawn
        if latents is None:
            latents = start * self.scheduler.init_noise_sigma
        else:
            latents = jt.array(np.asarray(latents, dtype=np.float32)) if not isinstance(latents, jt.Var) else latents
            if tuple(latents.shape) != (batch, *shape):
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {(batch, *shape)}")
            latents = latents * self.scheduler.init_noise_sigma
        latents = self.denoise(latents, self.scheduler.timesteps, context, gens, guidance_scale, eta, callback)
        return self._output(latents, seeds, output_type)


def load_pipeline(model: Optional[str] = None, dtype: Optional[str] = None,
                  scheduler: Optional[str] = None, low_memory: bool = False) -> StableDiffusionPipeline:
    """The pipeline of a diffusers folder (None or "": the built-in tiny model), optionally cast to
    `dtype` and with another scheduler (a diffusers class name, e.g. "DDIMScheduler"); low_memory: see
    `StableDiffusionPipeline.from_pretrained`."""
    from ..tiny import tiny_model_path

    pipe = StableDiffusionPipeline.from_pretrained(model or tiny_model_path(), dtype=dtype, low_memory=low_memory)
    if scheduler:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose from {sorted(SCHEDULERS)}")
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe
