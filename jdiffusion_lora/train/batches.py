"""Training samples: what sample i is, built from its own random streams.

Sample i (a global counter over the run) is the item at position i of the sampling order (a fresh
permutation of all (style, image) pairs each pass) and owns the numpy streams `sample_rng(seed, i, ...)`:
    STREAM_DATA   flip, crop box, caption (in this order)
    STREAM_VAE    the draw from the VAE posterior
    STREAM_NOISE  timestep, noise, input perturbation
So a sample does not depend on the batch it falls in. With `enable_bucket` the order is buckets.BucketOrder
(every batch from one aspect-ratio bucket) and each image is resized and cropped into its bucket's frame.
Latents come through the VAE posterior cache (`cache.LatentCache`): every (image, frame, crop box, flip)
is encoded once.

    builder = SampleBuilder(config, data, vae, num_train_timesteps, class_images)
    samples = builder.micro_batch(step, micro)      # -> [Sample] (instances, then class images)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from .._runtime import jt
from ..models.modeling import to_model_dtype
from ..image_files import list_images, save_png
from . import distributed as dist
from .buckets import BucketOrder, Frame, cover, make_buckets
from .cache import LatentCache, latent_key, sample_latent, vae_fingerprint
from .captions import CaptionOptions, caption_parts, render_caption, split_tags
from .data import (STREAM_CLASS, STREAM_DATA, STREAM_NOISE, STREAM_VAE, STREAM_VALIDATION, DataError,
                   ImageRecord, SampleOrder, crop_box, load_rgb, pixels, resized_size, sample_rng)
from .noise import draw_noise, draw_timestep

CLASS_OFFSET = 1 << 40      # noise streams of class sample i: index i + CLASS_OFFSET
LORA_GA_OFFSET = 1 << 41    # LoRA-GA's batches: sample indices from here on


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """Seed of Jittor's generator for micro-batch `micro` (counted over all ranks) of optimizer step `step`
    (LoRA dropout)."""
    key = [int(seed), int(step), 7] + ([int(micro)] if micro else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0] % (2 ** 31 - 1))


@dataclass
class Sample:
    index: int
    source: str                  # image path (or class image path)
    caption: str
    latent: np.ndarray           # (C, h, w), scaled by the VAE scaling factor
    noise: np.ndarray            # (C, h, w)
    timestep: int
    perturbation: Optional[np.ndarray] = None
    is_class: bool = False
    size: Optional[tuple] = None  # (W, H) in pixels: the bucket (or the square resolution)


def caption_parts_for(c, style, rec: ImageRecord, flip: bool):
    """The caption parts of one image: competition layout (trigger, style tags | item tags, stem,
    flip tag) or plain layout (trigger, style tags | the .txt caption's tags or the stem)."""
    if style.layout == "competition":
        return caption_parts(style.trigger, style.style_tags, rec.item_tags, rec.stem if c.use_file_stem else None,
                             flip, c.flip_tag, c.caption_prefix, c.caption_suffix)
    tags = split_tags(rec.caption) if rec.caption is not None else [rec.stem]
    if style.trigger and style.trigger in tags:
        tags.remove(style.trigger)
    return caption_parts(style.trigger, style.style_tags, tags, None, flip, c.flip_tag,
                         c.caption_prefix, c.caption_suffix)


@dataclass
class Augmented:
    record: ImageRecord
    pass_index: int
    flip: bool
    box: tuple
    caption: str
    frame: Frame


def frame_for(c, buckets, size) -> Frame:
    """How an image of `size` is resized and cropped: into its bucket, or square at `resolution`."""
    if buckets is not None:
        return buckets.frame_of(size)
    return Frame(resized_size(size[0], size[1], c.resolution), (c.resolution, c.resolution))


def augment(c, data, records: Sequence[ImageRecord], order, opts: CaptionOptions, index: int,
            step: int, buckets=None) -> Augmented:
    """Which image sample `index` is and how it is augmented (flip, crop box, caption): a function of
    (seed, index, step) only. Draw order in the sample's data stream: flip, crop, caption."""
    pass_index, item = order(index)
    rec = records[item]
    rng = sample_rng(c.seed, index, STREAM_DATA)
    flip = bool(rng.random() < c.flip_p)
    frame = buckets.frames[item] if buckets is not None else frame_for(c, None, rec.size)
    box = crop_box(frame.resized[0], frame.resized[1], frame.size, c.crop, rng)
    caption = render_caption(caption_parts_for(c, data.style(rec.style), rec, flip), opts, rng,
                             epoch=pass_index + 1, step=step)
    return Augmented(rec, pass_index, flip, box, caption, frame)


class SampleBuilder:
    """Sample index -> `Sample` (image, augmentation, latent, noise, timestep), latents cached."""

    def __init__(self, c, data, vae, num_train_timesteps: int, class_images: Sequence[str] = ()):
        self.c = c
        self.data = data
        self.records: List[ImageRecord] = data.records
        self.buckets = make_buckets([r.size for r in self.records], c) if c.enable_bucket else None
        if self.buckets is not None:
            self.order = BucketOrder(self.buckets, c.train_batch_size, c.seed)
        else:
            self.order = SampleOrder(len(self.records), c.seed)
        self.caption_options = CaptionOptions.from_config(c)
        self.class_images = list(class_images)
        self.vae = vae
        self.vae_id = vae_fingerprint(vae, c.base_model)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.num_train_timesteps = num_train_timesteps
        self.latent_cache = LatentCache(c.cache_latents, c.cache_dir or os.path.join(c.output_dir, "cache"),
                                        read_only=not dist.is_writer())
        # data parallel: this rank does micro-batches rank*accum .. rank*accum+accum-1 of each step's global batch
        self.world, self.rank, self.accum = 1, 0, c.gradient_accumulation_steps

    def split(self, world: int, rank: int, global_batch_size: int) -> int:
        """This rank's share of each step: accumulation steps per rank from the global batch
        (0: train_batch_size x gradient_accumulation_steps x world). Returns the global batch."""
        c = self.c
        self.accum, global_batch = dist.split_batch(c.train_batch_size, c.gradient_accumulation_steps,
                                                    global_batch_size, world)
        self.world, self.rank = world, rank
        return global_batch

    def micro_batch(self, step: int, micro: int) -> List[Sample]:
        """The samples of micro-batch `micro` of optimizer step `step` (plus as many class samples)."""
        c = self.c
        first = ((step * self.world + self.rank) * self.accum + micro) * c.train_batch_size
        samples = [self.instance(first + j, step) for j in range(c.train_batch_size)]
        if c.with_prior_preservation:
            size = samples[0].size if self.buckets is not None else None
            samples += [self.class_sample(first + j, size) for j in range(c.train_batch_size)]
        return samples

    def instance(self, index: int, step: int) -> Sample:
        c = self.c
        aug = augment(c, self.data, self.records, self.order, self.caption_options, index, step, self.buckets)
        moments = self.moments(aug.record.path, aug.frame, aug.box, aug.flip)
        shape = (moments.shape[0] // 2,) + moments.shape[1:]
        draw = sample_rng(c.seed, index, STREAM_VAE).standard_normal(shape, dtype=np.float32)
        latent = sample_latent(moments, draw, self.scaling_factor)
        t, noise, pert = self.noise(index, shape)
        return Sample(index, aug.record.path, aug.caption, latent, noise, t, pert, size=aug.frame.size)

    def class_sample(self, index: int, size=None) -> Sample:
        """Prior-preservation sample `index`: square at `resolution`, or fitted to `size` (the bucket of
        the instance samples it shares a batch with)."""
        c = self.c
        rng = sample_rng(c.seed, index, STREAM_CLASS)
        path = self.class_images[int(rng.integers(len(self.class_images)))]
        from PIL import Image
        with Image.open(path) as im:
            image_size = im.size
        frame = frame_for(c, None, image_size) if size is None else Frame(cover(*image_size, size), tuple(size))
        box = crop_box(frame.resized[0], frame.resized[1], frame.size, c.crop, rng)
        moments = self.moments(path, frame, box, False)
        shape = (moments.shape[0] // 2,) + moments.shape[1:]
        latent = sample_latent(moments, rng.standard_normal(shape, dtype=np.float32), self.scaling_factor)
        t, noise, pert = self.noise(index + CLASS_OFFSET, shape)
        return Sample(index, path, c.class_prompt, latent, noise, t, pert, is_class=True)

    def lora_ga_batch(self, b: int) -> List[Sample]:
        """Batch `b` of LoRA-GA's gradient estimate (samples of their own, not the training ones)."""
        first = LORA_GA_OFFSET + b * self.c.train_batch_size
        return [self.instance(first + j, 0) for j in range(self.c.train_batch_size)]

    def fixed(self, records: Sequence[ImageRecord], seed: int, repeats: int = 1) -> Iterator[Sample]:
        """Samples of `records` (each `repeats` times) with noise, timestep and caption fixed by `seed`,
        centre crops, no flip, no caption augmentation: the same every call (validation loss)."""
        c = self.c
        for j, rec in enumerate([r for r in records for _ in range(repeats)]):
            rng = sample_rng(seed, j, STREAM_VALIDATION)
            frame = frame_for(c, self.buckets, rec.size)
            box = crop_box(frame.resized[0], frame.resized[1], frame.size, "center", rng)
            parts = caption_parts_for(c, self.data.style(rec.style), rec, False)
            caption = render_caption(parts, CaptionOptions(), rng)
            moments = self.moments(rec.path, frame, box, False)
            shape = (moments.shape[0] // 2,) + moments.shape[1:]
            latent = sample_latent(moments, rng.standard_normal(shape, dtype=np.float32), self.scaling_factor)
            t = int(rng.integers(0, self.num_train_timesteps))
            noise = rng.standard_normal(shape, dtype=np.float32)
            yield Sample(j, rec.path, caption, latent, noise, t)

    def noise(self, index: int, shape) -> tuple:
        """(timestep, noise, input perturbation or None) of sample `index`."""
        rng = sample_rng(self.c.seed, index, STREAM_NOISE)
        t = draw_timestep(rng, self.c, self.num_train_timesteps)
        noise = draw_noise(rng, shape, self.c)
        pert = rng.standard_normal(shape, dtype=np.float32) if self.c.input_perturbation else None
        return t, noise, pert

    # ------------------------------------------------------------------ latents

    def frame_key(self, frame: Frame):
        """The resolution part of a latent-cache key: the square resolution, or the bucket and resize."""
        if self.buckets is None:
            return self.c.resolution
        return f"{frame.size[0]}x{frame.size[1]} from {frame.resized[0]}x{frame.resized[1]}"

    def moments(self, path: str, frame: Frame, box, flip: bool) -> np.ndarray:
        """VAE posterior parameters (2C, h, w) of one resized, cropped, maybe flipped image (cached)."""
        c = self.c
        key = latent_key(path, self.frame_key(frame), box, flip, self.vae_id)

        def encode():
            image = pixels(load_rgb(path, c.alpha_background), frame.size, box, flip, frame.resized)
            return self.encode_pixels(image[None])[0]

        return self.latent_cache.get_or_encode(key, encode)

    def encode_pixels(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> VAE posterior parameters (B, 2C, h, w)."""
        with jt.no_grad():
            posterior = self.vae.encode(to_model_dtype(jt.array(batch.astype(np.float32)), self.vae)).latent_dist
            out = posterior.parameters.numpy()
        return out.astype(np.float32)

    def precache(self) -> None:
        """Encode, `vae_batch_size` at a time, every (image, flip) whose crop is fixed (no random choice);
        with buckets, one bucket at a time (a VAE batch holds one size). Under mpirun a disk cache is filled
        by rank 0 alone; the other ranks wait, then read it."""
        c = self.c
        shared = c.cache_latents == "disk" and dist.active()
        if shared and not dist.is_writer():
            return dist.barrier("waiting for rank 0's latent cache", timeout=0)
        todo: dict = {}
        for item, rec in enumerate(self.records):
            frame = self.buckets.frames[item] if self.buckets is not None else frame_for(c, None, rec.size)
            if c.crop == "random" and frame.resized != frame.size:
                continue  # random crops are encoded when drawn
            box = crop_box(frame.resized[0], frame.resized[1], frame.size, "center", np.random.default_rng(0))
            flips = [f for f in (False, True) if (f and c.flip_p > 0) or (not f and c.flip_p < 1)]
            for flip in flips:
                key = latent_key(rec.path, self.frame_key(frame), box, flip, self.vae_id)
                if self.latent_cache.get(key) is None:
                    todo.setdefault(frame.size, []).append((key, rec.path, frame, box, flip))
        for group in todo.values():
            for i in range(0, len(group), c.vae_batch_size):
                chunk = group[i:i + c.vae_batch_size]
                batch = np.stack([pixels(load_rgb(p, c.alpha_background), fr.size, b, f, fr.resized)
                                  for _, p, fr, b, f in chunk])
                for (key, *_), moments in zip(chunk, self.encode_pixels(batch)):
                    self.latent_cache.put(key, moments)
        if shared:
            dist.barrier("waiting for rank 0's latent cache", timeout=0)


def prepare_class_images(c, pipe, printer: Callable[[str], None] = print) -> List[str]:
    """The class images for prior preservation; generated with the base model when too few."""
    have = list_images(c.class_data_dir)
    need = max(0, c.num_class_images - len(have))
    if need and dist.is_writer():   # under mpirun rank 0 makes them, the others wait
        printer(f"prior preservation: generating {need} class image(s) of {c.class_prompt!r} "
                f"into {c.class_data_dir}")
        os.makedirs(c.class_data_dir, exist_ok=True)
        pipe.set_progress_bar_config(disable=True)
        for k in range(need):
            seed = c.class_sample_seed + len(have) + k
            image = pipe(c.class_prompt, num_inference_steps=c.class_sample_steps, seed=seed,
                         height=c.resolution, width=c.resolution).images[0]
            save_png(image, os.path.join(c.class_data_dir, f"class_{seed:06d}.png"))
    if need:
        dist.barrier("waiting for rank 0's class images", timeout=0)
        have = list_images(c.class_data_dir)
    if not have:
        raise DataError(f"prior preservation: no class images in {c.class_data_dir} and num_class_images is 0")
    limit = c.num_class_images or len(have)
    return have[:limit]
