"""Load a pipeline once and make images for a list of Items, skipping the ones already done.

Exactness: in the default `batch_mode="exact"` every image is denoised on its own (its own
conditional/unconditional pair through the UNet, its own text encoding and VAE decode). Jittor's
fused kernels differ by ~1e-6 when the batch size changes, enough to flip an 8-bit pixel, so
this is what makes an image's bytes independent of the batch size, the order and the worker.
`batch_size` then only sets how many images a worker takes at a time. `batch_mode="batched"`
sends a whole batch through the UNet at once (faster on a GPU); images may then differ by a
rounding step between batch sizes, and the mode is recorded in the manifest.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..image_files import png_bytes
from .manifest import fingerprint, is_done, model_fingerprint, sha256_bytes, sha256_file, write_record
from .plan import Item


@dataclass
class LoraSpec:
    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "LoraSpec":
        """"file" or "file:scale" (a Windows drive letter "C:\\x" is not taken for a scale)."""
        head, sep, tail = spec.rpartition(":")
        if sep and head and _is_float(tail):
            return cls(head, float(tail))
        return cls(spec, 1.0)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@dataclass
class GenerateSettings:
    model: str
    loras: List[LoraSpec] = field(default_factory=list)
    scheduler: Optional[str] = None          # a SCHEDULERS name; None = the model's own
    steps: int = 100
    guidance: float = 7.5
    height: Optional[int] = None             # None = the model's default size
    width: Optional[int] = None
    batch_size: int = 1
    batch_mode: str = "exact"                # "exact" | "batched" (see the module docstring)
    fuse_lora: bool = False                  # fold LoRA into the weights (faster; same maths)
    attention_slicing: bool = False          # no-op: attention always chunks its queries by free memory
    vae_slicing: bool = False
    vae_tiling: bool = False
    dtype: str = "fp32"                      # "fp32" | "fp16" (CUDA only) | "bf16" (see train/precision.py)
    start: str = "noise"                     # noise | reference | flat | blur | latents (see generate/start.py)
    strength: float = 0.8                    # img2img strength when start is not "noise"
    data_root: Optional[str] = None          # the dataset root whose <NN>/images the start is built from
    low_memory: bool = False                 # bf16 weights, models loaded in turn (see StableDiffusionPipeline)

    def check(self) -> None:
        if self.batch_mode not in ("exact", "batched"):
            raise ValueError(f"batch mode must be 'exact' or 'batched', got {self.batch_mode!r}")
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("batch size and steps must be at least 1")
        from .start import START_KINDS
        if self.start not in START_KINDS:
            raise ValueError(f"start must be one of {START_KINDS}, got {self.start!r}")
        if self.start != "noise":
            from ..pipelines.img2img import check_strength
            check_strength(self.strength)
            if not self.data_root or not os.path.isdir(self.data_root):
                raise ValueError(f"start={self.start!r} needs the dataset root (--data) with <NN>/images")
        if self.low_memory and (self.loras or self.dtype != "fp32"):
            raise ValueError("low_memory loads the base model only, in bfloat16: no LoRA, no dtype with it")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        if self.dtype == "bf16":
            from .._runtime import DEVICE
            from ..train.precision import check_device
            check_device("bf16", DEVICE, warn=lambda msg: warnings.warn(msg.replace("warning: ", "")))
        if self.dtype == "fp16":
            from .._runtime import DEVICE
            if DEVICE != "cuda":
                raise ValueError("fp16 needs a CUDA GPU; on CPU Jittor has no fast fp16 kernels and "
                                 "results would be slower and less exact -- use fp32")
        from ..hub import resolve_model
        if not os.path.exists(resolve_model(self.model)):  # a folder, a single file or org/name in the HF cache
            raise FileNotFoundError(f"model not found: {self.model}")
        for spec in self.loras:
            if not os.path.exists(spec.path):
                raise FileNotFoundError(f"LoRA file not found: {spec.path}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerateSettings":
        d = dict(d)
        d["loras"] = [LoraSpec(**x) for x in d.get("loras", [])]
        return cls(**d)


def job_description(settings: GenerateSettings) -> dict:
    """What decides the pixels (besides each item's text, negative and seed): goes into every record."""
    from ..lora.formats import find_lora_file

    loras = []
    for spec in settings.loras:
        path = find_lora_file(spec.path) if os.path.isdir(spec.path) else spec.path
        loras.append({"path": os.path.abspath(path), "sha256": sha256_file(path), "scale": spec.scale})
    return {
        "model": {"path": os.path.abspath(settings.model), "fingerprint": model_fingerprint(settings.model)},
        "loras": loras,
        "scheduler": settings.scheduler,
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "height": settings.height,
                     "width": settings.width, "batch_mode": settings.batch_mode, "dtype": settings.dtype,
                     "fuse_lora": settings.fuse_lora, "vae_tiling": settings.vae_tiling,
                     **({"start": settings.start, "strength": settings.strength,
                         "data_root": os.path.abspath(settings.data_root)} if settings.start != "noise" else {}),
                     **({"low_memory": True} if settings.low_memory else {})},
    }


def pending_items(items: Sequence[Item], out_dir: str, job: dict, overwrite: bool = False) -> List[Item]:
    """Items whose image is missing, damaged or made with other settings (all of them with overwrite)."""
    if overwrite:
        return list(items)
    return [it for it in items if not is_done(out_dir, it.relpath, fingerprint(job, it.to_dict()))]


# ----------------------------------------------------------------------------- the pipeline

def load_job_pipeline(settings: GenerateSettings):
    """Pipeline with scheduler, LoRAs (checked against the base model), memory options. Loaded once per worker."""
    from ..lora import LoraError, guess_base_model, load_lora_state
    from ..pipelines import load_pipeline

    settings.check()
    pipe = load_pipeline(settings.model, {"fp16": "float16", "bf16": "bfloat16"}.get(settings.dtype),
                         settings.scheduler, low_memory=settings.low_memory)
    pipe.set_progress_bar_config(disable=True)
    names, scales = [], []
    for i, spec in enumerate(settings.loras):
        state = load_lora_state(spec.path, pipe.lora_name_tables(), strict=False)
        theirs, ours = guess_base_model(state), pipe._guess_base_model()
        if theirs and ours and theirs != ours:
            raise LoraError(f"LoRA {spec.path} was made for {theirs} but the model {settings.model} is {ours}")
        try:
            name = pipe.load_lora_weights(spec.path, adapter_name=f"lora{i}")
            if name in pipe._all_adapters():   # a file of bundled embeddings only adds tokens, no adapter
                names.append(name)
                scales.append(spec.scale)
        except LoraError as e:
            raise LoraError(f"{e} -- is this LoRA made for another base model than {settings.model}?") from None
    if names:
        pipe.set_adapters(names, scales)
        if settings.fuse_lora:
            pipe.fuse_lora()
    if settings.vae_slicing and not settings.low_memory:
        pipe.vae.enable_slicing()
    if settings.vae_tiling and not settings.low_memory:
        pipe.vae.enable_tiling()
    return pipe


def _render(pipe, items: Sequence[Item], settings: GenerateSettings) -> List[np.ndarray]:
    kwargs = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, height=settings.height,
                  width=settings.width, output_type="np")
    if settings.start != "noise":
        return _render_from_start(pipe, items, settings, kwargs)
    if settings.batch_mode == "batched":
        out = pipe([it.text for it in items], negative_prompt=[it.negative for it in items],
                   seed=[it.seed for it in items], **kwargs)
        return list(out.images)
    # exact: one image at a time through text encoder, UNet (its CFG pair) and VAE
    return [pipe([it.text], negative_prompt=[it.negative], seed=[it.seed], **kwargs).images[0] for it in items]


def _render_from_start(pipe, items: Sequence[Item], settings: GenerateSettings, kwargs: dict) -> List[np.ndarray]:
    """img2img from a start built from each item's style references (one image at a time)."""
    from ..pipelines.img2img import StableDiffusionImg2ImgPipeline
    from .start import StartMaker

    img2img = getattr(pipe, "_img2img", None)
    if img2img is None:
        height, width = pipe._image_size(settings.height, settings.width)
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        img2img.start_maker = StartMaker(settings.start, settings.data_root, pipe, (width, height))
        pipe._img2img = img2img
    return [img2img([it.text], image=img2img.start_maker(it.style, it.seed), strength=settings.strength,
                    negative_prompt=[it.negative], seed=[it.seed], **kwargs).images[0] for it in items]


def generate_items(pipe, items: Sequence[Item], settings: GenerateSettings, out_dir: str, job: dict,
                   worker: str = "main", on_done: Optional[Callable[[Item], None]] = None) -> int:
    """Make `items` in groups of `batch_size`; each PNG and then its record are written atomically."""
    from ..weights import atomic_write_bytes

    count = 0
    for start in range(0, len(items), settings.batch_size):
        group = list(items[start:start + settings.batch_size])
        t0 = time.time()
        images = _render(pipe, group, settings)
        seconds = (time.time() - t0) / len(group)
        for it, image in zip(group, images):
            data = png_bytes(image)
            atomic_write_bytes(os.path.join(out_dir, it.relpath), [data])
            rec = dict(it.to_dict(), **job)
            rec.update(sha256=sha256_bytes(data), fingerprint=fingerprint(job, it.to_dict()),
                       size=[int(image.shape[1]), int(image.shape[0])], seconds=round(seconds, 4),
                       created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), worker=worker)
            write_record(out_dir, it.relpath, rec)
            count += 1
            if on_done is not None:
                on_done(it)
    return count
