"""Option names of kohya's sd-scripts (train_network.py) and of diffusers' example scripts
(train_text_to_image_lora.py, train_dreambooth_lora.py), read as ours.

A user's existing TOML file or command line works as it is: each name below is translated into our
option(s) and a one-line note names ours (`note: kohya's --network_dim 32 is our rank = 32, pack_rank =
false`). Names that would change nothing here (performance switches of PyTorch) are accepted with a note
saying so; kohya names with no equivalent stay errors that say what to use instead.

Our own option names always take precedence over the same option given under an alias: giving both with
different values is an error.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple


def _truthy(value: Any) -> bool:
    """A kohya switch: true on the command line (store_true), a boolean in TOML."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class Alias:
    source: str                            # "kohya" | "diffusers" | "kohya/diffusers"
    convert: Callable[[Any], Dict[str, Any]]  # the alias's value -> {our field: value}
    switch: bool = False                   # on the command line a flag without a value (store_true)


def same(field: str) -> Callable[[Any], Dict[str, Any]]:
    return lambda v: {field: v}


def switch_to(field: str, on: Any, off: Any) -> Callable[[Any], Dict[str, Any]]:
    return lambda v: {field: on if _truthy(v) else off}


def _network_dim(v) -> Dict[str, Any]:
    return {"rank": v, "pack_rank": False}


def _cache_to_disk(v) -> Dict[str, Any]:
    return {"cache_latents": "disk"} if _truthy(v) else {}


def _reg_data_dir(v) -> Dict[str, Any]:
    return {"class_data_dir": v, "with_prior_preservation": bool(v)}


def _optimizer_type(v) -> Dict[str, Any]:
    names = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "rmsprop": "RMSprop", "adan": "Adan",
             "torch.optim.adamw": "AdamW", "torch.optim.adam": "Adam", "torch.optim.sgd": "SGD"}
    key = str(v).lower()
    if key not in names:
        raise ValueError(f"optimizer {v!r} has no equivalent here; ours are AdamW, Adam, SGD, RMSprop, Adan "
                         f"(Jittor's) - set optimizer")
    return {"optimizer": names[key]}


def _optimizer_args(v) -> Dict[str, Any]:
    """kohya's `--optimizer_args weight_decay=0.01 betas=0.9,0.99 eps=1e-8` (a list or one string)."""
    items = shlex.split(v) if isinstance(v, str) else [str(x) for x in v]
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optimizer_args entries are key=value, got {item!r}")
        key = key.strip()
        if key == "weight_decay":
            out["weight_decay"] = float(value)
        elif key == "eps":
            out["adam_epsilon"] = float(value)
        elif key == "momentum":
            out["momentum"] = float(value)
        elif key == "betas":
            b1, b2 = (float(b) for b in value.strip("()[] ").split(","))
            out.update(adam_beta1=b1, adam_beta2=b2)
        else:
            raise ValueError(f"optimizer_args {key!r} has no equivalent here (weight_decay, betas, eps, momentum)")
    return out


def _save_precision(v) -> Dict[str, Any]:
    table = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
    if str(v) not in table:
        raise ValueError(f"save precision {v!r}: expected float, fp16 or bf16")
    return {"save_dtype": table[str(v)]}


def _log_with(v) -> Dict[str, Any]:
    if str(v) not in ("tensorboard", "all"):
        raise ValueError(f"log_with {v!r}: only TensorBoard logs are written here (tensorboard = true)")
    return {"tensorboard": True}


def _network_module(v) -> Dict[str, Any]:
    if str(v) != "networks.lora":
        raise ValueError(f"network_module {v!r}: only LoRA (networks.lora) is trained here")
    return {}


def _save_model_as(v) -> Dict[str, Any]:
    if str(v) != "safetensors":
        raise ValueError(f"save_model_as {v!r}: LoRA files are written as safetensors")
    return {}


def _validation_prompt(v) -> Dict[str, Any]:
    return {"sample_prompts": [v] if isinstance(v, str) else list(v)}


def _train_text_encoder(v) -> Dict[str, Any]:
    return {"text_encoder_targets": ["q_proj", "k_proj", "v_proj", "out_proj"]} if _truthy(v) else {}


def _ignored(v) -> Dict[str, Any]:
    return {}


K, D, KD = "kohya", "diffusers", "kohya and diffusers"

ALIASES: Dict[str, Alias] = {
    # the model, the data, the output
    "pretrained_model_name_or_path": Alias(KD, same("base_model")),
    "train_data_dir": Alias(KD, same("data_root")),
    "instance_data_dir": Alias(D, same("data_root")),
    "reg_data_dir": Alias(K, _reg_data_dir),
    "caption_extention": Alias(K, same("caption_extension")),     # kohya's own misspelt alias
    "v_parameterization": Alias(K, switch_to("prediction_type", "v_prediction", ""), switch=True),
    "random_flip": Alias(D, switch_to("flip_p", 0.5, 0.0), switch=True),
    "flip_aug": Alias(K, switch_to("flip_p", 0.5, 0.0), switch=True),
    "random_crop": Alias(K, switch_to("crop", "random", "center"), switch=True),
    "center_crop": Alias(D, switch_to("crop", "center", "random"), switch=True),
    # caching
    "cache_latents_to_disk": Alias(K, _cache_to_disk, switch=True),
    # the network
    "network_dim": Alias(K, _network_dim),
    "network_alpha": Alias(K, same("lora_alpha")),
    "network_dropout": Alias(K, same("lora_dropout")),
    "network_train_unet_only": Alias(K, lambda v: {"text_encoder_targets": []} if _truthy(v) else {}, switch=True),
    "train_text_encoder": Alias(D, _train_text_encoder, switch=True),
    "network_module": Alias(K, _network_module),
    # the objective
    "snr_gamma": Alias(D, same("min_snr_gamma")),
    "min_timestep": Alias(K, same("timestep_min")),
    "max_timestep": Alias(K, same("timestep_max")),
    # optimisation
    "optimizer_type": Alias(K, _optimizer_type),
    "optimizer_args": Alias(K, _optimizer_args),
    "adam_weight_decay": Alias(D, same("weight_decay")),
    "lr_scheduler_num_cycles": Alias(K, same("lr_num_cycles")),
    "lr_scheduler_power": Alias(K, same("lr_power")),
    # checkpoints, logs, samples
    "save_every_n_steps": Alias(K, same("save_every")),
    "checkpointing_steps": Alias(D, same("save_every")),
    "checkpoints_total_limit": Alias(D, same("keep_last")),
    "resume_from_checkpoint": Alias(D, same("resume")),
    "save_precision": Alias(K, _save_precision),
    "save_model_as": Alias(K, _save_model_as),
    "log_with": Alias(K, _log_with),
    "report_to": Alias(D, _log_with),
    "sample_every_n_steps": Alias(K, same("sample_every")),
    "validation_prompt": Alias(D, _validation_prompt),
    "validate_every_n_steps": Alias(K, same("validation_every")),
}

# Accepted and ignored: they change speed or memory in PyTorch, not what is trained.
IGNORED: Dict[str, str] = {
    "xformers": "attention is Jittor's own",
    "sdpa": "attention is Jittor's own",
    "mem_eff_attn": "attention is Jittor's own",
    "enable_xformers_memory_efficient_attention": "attention is Jittor's own",
    "max_data_loader_n_workers": "images are loaded in the training process",
    "dataloader_num_workers": "images are loaded in the training process",
    "persistent_data_loader_workers": "images are loaded in the training process",
    "lowram": "no effect on Jittor",
    "highvram": "no effect on Jittor",
    "no_half_vae": "the VAE follows mixed_precision here",
    "save_state": "every checkpoint holds the full training state",
    "use_safetensors": "files are always safetensors",
    "v2": "SD 2.x is recognised from the model's own config",
}
SWITCHES_IGNORED = {"xformers", "sdpa", "mem_eff_attn", "enable_xformers_memory_efficient_attention",
                    "persistent_data_loader_workers", "lowram", "highvram", "no_half_vae", "save_state",
                    "use_safetensors", "v2"}

# kohya/diffusers names that exist but have no equivalent: the error says what to do instead.
NO_EQUIVALENT: Dict[str, str] = {
    "max_train_epochs": "give max_train_steps (steps = epochs x images / batch)",
    "num_train_epochs": "give max_train_steps (steps = epochs x images / batch)",
    "save_every_n_epochs": "give save_every (in steps)",
    "sample_every_n_epochs": "give sample_every (in steps)",
    "clip_skip": "not supported: the text encoder's last layer is used",
    "color_aug": "not supported (only flips keep cached latents valid)",
    "network_weights": "not supported: a run starts from a fresh LoRA or resumes a checkpoint (resume)",
    "dataset_config": "not supported: give data_root and the caption options",
    "use_8bit_adam": "not supported: optimizers are Jittor's (AdamW, Adam, SGD, RMSprop, Adan)",
    "full_fp16": "not supported: give mixed_precision (LoRA, optimizer state and loss stay float32)",
    "full_bf16": "not supported: give mixed_precision (LoRA, optimizer state and loss stay float32)",
}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value) if value != "" else '""'


def _note(name: str, value: Any, changes: Dict[str, Any]) -> str:
    alias = ALIASES[name]
    given = f"{alias.source}'s --{name}" + ("" if alias.switch and value is True else f" {_show(value)}")
    if not changes:
        return f"{given}: accepted, nothing to change here"
    return f"{given} is our " + ", ".join(f"{k} = {_show(v)}" for k, v in changes.items())


def translate(values: Dict[str, Any], coerce: Callable[[str, Any], Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Replace alias names in `values` (one source: a file or the command line) by our fields.

    Returns (values, notes). `coerce(field, value)` types a value (for comparing): an option given under
    our name and under an alias, or under two aliases, must agree, else an error names both.
    """
    out = {k: v for k, v in values.items() if k not in ALIASES and k not in IGNORED}
    set_by: Dict[str, str] = {k: f"--{k}" for k in out}
    notes: List[str] = []
    for name, value in values.items():
        if name in NO_EQUIVALENT:
            raise ValueError(f"{name} (a kohya / diffusers option) has no equivalent here: {NO_EQUIVALENT[name]}")
        if name in IGNORED:
            notes.append(f"--{name}: ignored ({IGNORED[name]})")
            continue
        if name not in ALIASES or value is None:
            continue
        try:
            changes = ALIASES[name].convert(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--{name} {value!r}: {e}") from None
        for field, new in changes.items():
            if field in out and coerce(field, out[field]) != coerce(field, new):
                raise ValueError(f"--{name} {_show(value)} means {field} = {_show(new)}, but {set_by[field]} gives "
                                 f"{field} = {_show(out[field])}: keep one")
            out.setdefault(field, new)
            set_by.setdefault(field, f"--{name}")
        notes.append(_note(name, value, changes))
    return out, notes


def kohya_values(values: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Our own option names given kohya-shaped values: `cache_latents = true` (a switch there),
    `resolution = "512,512"`, `sample_prompts = "prompts.txt"` (a file there, a list of prompts here)."""
    out, notes = dict(values), []
    if isinstance(out.get("cache_latents"), bool):
        out["cache_latents"] = "memory" if out["cache_latents"] else "none"
        notes.append(f"kohya's cache_latents = {str(values['cache_latents']).lower()} is our "
                     f"cache_latents = {out['cache_latents']!r} (none | memory | disk)")
    reso = out.get("resolution")
    if isinstance(reso, (str, list, tuple)) and not (isinstance(reso, str) and reso.strip().isdigit()):
        parts = [p for p in (reso.split(",") if isinstance(reso, str) else reso) if str(p).strip()]
        try:
            sizes = [int(str(p).strip()) for p in parts]
        except ValueError:
            raise ValueError(f"resolution must be a number (or kohya's 'W,H'), got {reso!r}") from None
        if len(sizes) not in (1, 2) or len(set(sizes)) != 1:
            raise ValueError(f"resolution {reso!r}: give one size; the training area is resolution x resolution "
                             f"(with enable_bucket each image trains at its aspect ratio within that area)")
        out["resolution"] = sizes[0]
    if isinstance(out.get("sample_prompts"), str):
        if out.get("sample_prompts_file") not in (None, "", out["sample_prompts"]):
            raise ValueError("sample_prompts (kohya: a prompt file) and sample_prompts_file are both given: keep one")
        out["sample_prompts_file"] = out.pop("sample_prompts")
        notes.append(f"kohya's sample_prompts = {values['sample_prompts']!r} (a file) is our sample_prompts_file")
    return out, notes


def cli_flags() -> List[Tuple[str, Optional[Alias], str]]:
    """(name, alias or None for an ignored name, help) for every alias the command line accepts."""
    rows = [(name, alias, f"{alias.source}'s name, see the note it prints") for name, alias in ALIASES.items()]
    rows += [(name, None, f"ignored: {why}") for name, why in IGNORED.items()]
    return rows
