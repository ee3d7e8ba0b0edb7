"""The metadata in the header of the LoRA files a run writes (checkpoint.write_lora_files).

kohya's `ss_*` training settings (what A1111's and ComfyUI's metadata viewers show, incl.
`ss_tag_frequency` of the captions) and `modelspec.*`; our own `jdiffusion_lora.*` entries come with the
LoRA state, the `sshs_*` hashes are added when the file is written (lora/writing.py).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from ..lora.metadata import modelspec, ss_value, tag_frequency
from .batches import caption_parts_for
from .captions import join_tags


def plain_captions(c, data) -> Dict[str, List[str]]:
    """Each style's captions as written (no shuffle, dropout or flip): what kohya counts tags in."""
    out: Dict[str, List[str]] = {}
    for rec in data.records:
        parts = caption_parts_for(c, data.style(rec.style), rec, False)
        out.setdefault(rec.style, []).append(join_tags(parts.head + parts.body + parts.tail))
    return out


def training_metadata(c, data, *, prediction_type: str, network_dim: int, network_alpha: float,
                      base_model_version: str, started_at: float, finished_at: float, step: int,
                      bucket_info: Optional[dict] = None) -> Dict[str, str]:
    """kohya's ss_* keys (those with an equivalent here, in kohya's string forms) and modelspec.*."""
    n_images = len(data.records)
    per_step = c.train_batch_size * c.gradient_accumulation_steps
    batches_per_epoch = -(-n_images // c.train_batch_size)
    title = c.output_name or os.path.basename(os.path.abspath(c.output_dir))
    triggers = [s.trigger for s in data.styles if s.trigger]
    v_pred = prediction_type == "v_prediction"
    buckets = {"enable_bucket": bool(c.enable_bucket), "min_bucket_reso": c.min_bucket_reso,
               "max_bucket_reso": c.max_bucket_reso}
    ss = {
        "ss_session_id": int.from_bytes(os.urandom(4), "little") >> 1,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        "ss_output_name": c.output_name or None,
        "ss_learning_rate": c.learning_rate,
        "ss_text_encoder_lr": c.text_encoder_lr or c.learning_rate,
        "ss_unet_lr": c.unet_lr or c.learning_rate,
        "ss_num_train_images": n_images,
        "ss_num_reg_images": c.num_class_images if c.with_prior_preservation else 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": -(-c.max_train_steps * per_step // n_images),
        "ss_steps": step,
        "ss_epoch": step * per_step // n_images,
        "ss_gradient_checkpointing": c.gradient_checkpointing,
        "ss_gradient_accumulation_steps": c.gradient_accumulation_steps,
        "ss_max_train_steps": c.max_train_steps,
        "ss_lr_warmup_steps": c.lr_warmup_steps,
        "ss_lr_scheduler": c.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": c.lora_dropout,
        "ss_network_args": json.dumps({"unet_targets": list(c.unet_targets),
                                       "text_encoder_targets": list(c.text_encoder_targets)}),
        "ss_mixed_precision": c.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": base_model_version == "sd_v2",
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": None,
        "ss_max_token_length": c.max_token_length,
        "ss_cache_latents": c.cache_latents != "none",
        "ss_seed": c.seed,
        "ss_noise_offset": c.noise_offset or None,
        "ss_multires_noise_iterations": c.multires_noise_iterations or None,
        "ss_multires_noise_discount": c.multires_noise_discount,
        "ss_training_comment": "triggers: " + ",".join(triggers) if triggers else None,
        "ss_optimizer": c.optimizer,
        "ss_max_grad_norm": c.max_grad_norm,
        "ss_caption_dropout_rate": c.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": c.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": c.caption_tag_dropout_rate,
        "ss_prior_loss_weight": c.prior_loss_weight,
        "ss_min_snr_gamma": c.min_snr_gamma or None,
        "ss_loss_type": c.loss_type,
        "ss_huber_c": c.huber_c,
        "ss_batch_size_per_device": c.train_batch_size,
        "ss_total_batch_size": per_step,
        "ss_resolution": (c.resolution, c.resolution),
        "ss_color_aug": False,
        "ss_flip_aug": c.flip_p > 0,
        "ss_random_crop": c.crop == "random",
        "ss_shuffle_caption": c.shuffle_caption,
        "ss_enable_bucket": buckets["enable_bucket"],
        "ss_bucket_no_upscale": bool(c.bucket_no_upscale),
        "ss_min_bucket_reso": buckets["min_bucket_reso"],
        "ss_max_bucket_reso": buckets["max_bucket_reso"],
        "ss_keep_tokens": c.keep_tokens,
        "ss_dataset_dirs": json.dumps({s.name: {"n_repeats": 1, "img_count": len(s.images)} for s in data.styles}),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(tag_frequency(plain_captions(c, data))),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_sd_model_name": os.path.basename(os.path.normpath(c.base_model)) if c.base_model else "tiny-sd",
    }
    out = {k: ss_value(v) for k, v in ss.items()}
    out.update(modelspec(base_model_version, v_pred, title, (c.resolution, c.resolution), finished_at,
                         trigger_phrase=", ".join(triggers),
                         description=f"style LoRA ({len(data.styles)} style(s)) trained with jdiffusion-lora"))
    return out
