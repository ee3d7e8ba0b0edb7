"""Training configuration: one flat dataclass, read from TOML, overridable on the command line.

Every field can be set in a TOML file, at the top level or inside any table (tables only group
keys for the reader: `[optim] learning_rate = 1e-4` and `learning_rate = 1e-4` mean the same),
and on the command line as `--learning-rate 1e-4` (booleans: `--flag` / `--no-flag`; lists:
comma-separated, except sample prompts: `--sample-prompt` once per prompt). Unknown keys are errors,
so a typo never silently falls back to a default. kohya's and diffusers' names are read as ours, with a
note naming ours (train/aliases.py).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.9 / 3.10: the same parser as a package (a dependency there)
    import tomli as tomllib

from .aliases import ALIASES, IGNORED, NO_EQUIVALENT, SWITCHES_IGNORED, kohya_values, translate

from ..configuration import (AT_LEAST_0, AT_LEAST_1, BELOW_1, GUIDANCE, PIXELS, POSITIVE, PROBABILITY, SEED_RANGE,
                             ConfigError, Range, check_ranges)


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ run
    base_model: str = ""                  # diffusers folder; "" = the built-in tiny model
    output_dir: str = "outputs/train"
    seed: int = 123456
    max_train_steps: int = 1000           # optimizer steps
    prediction_type: str = ""             # "" = the base model's scheduler config; epsilon | v_prediction
    resume: str = ""                      # "" | "latest" | path of a checkpoint folder
    output_name: str = ""                 # names the LoRA files: <output_name>.safetensors ("" = see below)
    overwrite: bool = False               # a fresh run may delete the checkpoints already in output_dir

    # ------------------------------------------------------------------ data
    data_root: str = "styles"
    styles: List[str] = field(default_factory=list)  # the pack; [] = every style found under data_root
    trigger_template: str = "style_{style}"           # "" = no trigger token
    resolution: int = 512
    crop: str = "random"                  # random | center (after resizing the short side to `resolution`)
    flip_p: float = 0.5                   # horizontal flip probability
    flip_tag: str = "horizontal_flip"     # tag added to the caption of a flipped image ("" = none)
    alpha_background: str = "white"       # RGBA images are composited on white | black
    bad_image_policy: str = "skip"        # skip | error: unreadable, empty or corrupt image files
    small_image_policy: str = "upscale"   # upscale | skip | error: images smaller than `resolution`
    # Aspect-ratio buckets (kohya's): each image trains at the bucket (W, H), W*H <= resolution**2, closest
    # to its aspect ratio; every batch is drawn from one bucket (train/buckets.py).
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False       # buckets from the image's own size (downscaled only), no fixed table

    # ------------------------------------------------------------------ captions
    use_style_tags: bool = True           # tag.json "style"
    use_item_tags: bool = True            # tag.json "item"[stem]
    use_file_stem: bool = True            # the file stem names the object (competition layout)
    use_llm_hypernyms: bool = False       # llm_prompt.json "hypernyms" of the stem join the item tags
    caption_extension: str = ".txt"       # plain-folder layout: caption file next to each image
    shuffle_item_tags: bool = True        # the seed's shuffle of item tags + stem (+ flip tag)
    shuffle_caption: bool = False         # kohya: shuffle every tag after the first `keep_tokens`
    keep_tokens: int = 0
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout_rate: float = 0.0     # probability of training on the empty caption
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0  # probability of dropping each shuffleable tag
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0        # 0 = off; < 1 = fraction of max_train_steps
    max_token_length: int = 77

    # ------------------------------------------------------------------ prior preservation (DreamBooth)
    with_prior_preservation: bool = False
    class_data_dir: str = ""
    class_prompt: str = ""
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    class_sample_steps: int = 30
    class_sample_seed: int = 0

    # ------------------------------------------------------------------ caching
    cache_latents: str = "memory"         # none | memory | disk
    cache_dir: str = ""                   # disk cache folder; "" = <output_dir>/cache
    vae_batch_size: int = 1
    cache_text_embeddings: bool = True    # only when the text encoder is frozen

    # ------------------------------------------------------------------ LoRA
    rank: int = 4                         # per style; the pack's LoRA has rank len(styles) * rank
    pack_rank: bool = True                # False: rank as given whatever the pack size
    lora_alpha: float = 0.0               # 0 = alpha equals the total rank (scale 1)
    lora_dropout: float = 0.0
    lora_init: str = "gaussian"           # gaussian | kaiming | lora_ga
    lora_ga_batches: int = 4              # batches whose mean gradient LoRA-GA decomposes
    lora_ga_gamma: float = 16.0           # LoRA-GA stable scale: A, B *= out**0.25 / sqrt(gamma)
    unet_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: List[str] = field(default_factory=list)  # e.g. q_proj, k_proj, v_proj

    # ------------------------------------------------------------------ Textual Inversion
    textual_inversion: bool = False       # learn a new token per style (its trigger), alone or with the LoRA
    ti_num_vectors: int = 1               # vectors per token (token, token_1, ...)
    ti_init_word: str = "style"           # every vector starts as this word's (mean) embedding
    ti_learning_rate: float = 5e-3

    # ------------------------------------------------------------------ objective
    loss_type: str = "l2"                 # l2 | l1 | huber
    huber_c: float = 0.1
    min_snr_gamma: float = 0.0            # 0 = off
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    perlin_noise_octaves: int = 0         # 0 = off
    perlin_noise_persistence: float = 0.5
    perlin_noise_perturbation: float = 0.1  # weight of the Perlin field added to the gaussian noise
    input_perturbation: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 0                 # 0 = num_train_timesteps
    timestep_sampling: str = "uniform"    # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    # ------------------------------------------------------------------ optimisation
    optimizer: str = "AdamW"              # AdamW | Adam | SGD | RMSprop | Adan (Jittor's)
    learning_rate: float = 1e-4
    unet_lr: float = 0.0                  # 0 = learning_rate
    text_encoder_lr: float = 0.0          # 0 = learning_rate
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    momentum: float = 0.0                 # SGD
    adaptive_lr: bool = False             # one matrix of each pair gets lr * max(1, sqrt(n / r))
    adaptive_lr_matrix: str = "up"        # up (B, the seed README) | down (A, the seed code)
    loraplus_ratio: float = 0.0           # LoRA+: up matrices get lr * ratio (0 = off)
    lr_scheduler: str = "constant"        # constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Data parallel (mpirun -np N): 0 = the global batch is train_batch_size x accumulation x N; else it is
    # fixed and each rank's accumulation follows, so one config trains the same under any N (train/distributed.py).
    global_batch_size: int = 0
    allreduce_dtype: str = "float32"      # float32 | float16 (GPUs: half the bytes of the gradient all-reduce)
    max_grad_norm: float = 1.0            # 0 = no clipping
    gradient_checkpointing: bool = False  # recompute each UNet (and trained text-encoder) block in the backward
    mixed_precision: str = "no"           # no | bf16 | fp16: frozen weights in half; LoRA, optimizer, loss in fp32
    ema_decay: float = 0.0                # 0 = no EMA

    # ------------------------------------------------------------------ checkpoints
    save_every: int = 0                   # steps; 0 = only at the end
    keep_last: int = 3
    save_formats: List[str] = field(default_factory=lambda: ["diffusers"])  # diffusers | kohya
    save_dtype: str = "fp32"              # fp32 | fp16 | bf16

    # ------------------------------------------------------------------ observability
    log_every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    sample_every: int = 0                 # steps; 0 = off
    sample_prompts: List[str] = field(default_factory=list)   # command line: --sample-prompt, once per prompt
    sample_prompts_file: str = ""         # kohya's format: a prompt a line, with --n --w --h --d --l --s options
    sample_seed: int = 114514
    sample_steps: int = 20
    sample_guidance: float = 7.5
    # Score each sample round with the local scorer (competition layout, default prompts only):
    # metrics logged as score/<name>; hist needs no weights, the others need score_weights.
    sample_scores: List[str] = field(default_factory=lambda: ["hist"])
    score_weights: str = ""               # folder of scorer networks (see metrics/evaluate.py)
    # After training: each style's prompts from the base model, and with the LoRA without and with the
    # trigger, scored with hist; prints a table and writes before_after.png / .json (train/compare.py).
    before_after: bool = False
    before_after_prompts: int = 0         # prompts per style; 0 = all of prompt.json
    before_after_seeds: int = 8           # seeds per prompt; a prompt's score is their mean
    validation_every: int = 0             # steps; 0 = off
    validation_images: List[str] = field(default_factory=list)  # held out: "<style>/<file name>"
    validation_seed: int = 0

    # ------------------------------------------------------------------ helpers

    def with_updates(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


FIELD_TYPES: Dict[str, Any] = get_type_hints(TrainConfig)
CHOICES: Dict[str, tuple] = {
    "crop": ("random", "center"),
    "alpha_background": ("white", "black"),
    "bad_image_policy": ("skip", "error"),
    "small_image_policy": ("upscale", "skip", "error"),
    "cache_latents": ("none", "memory", "disk"),
    "lora_init": ("gaussian", "kaiming", "lora_ga"),
    "loss_type": ("l2", "l1", "huber"),
    "timestep_sampling": ("uniform", "logit_normal"),
    "optimizer": ("AdamW", "Adam", "SGD", "RMSprop", "Adan"),
    "adaptive_lr_matrix": ("up", "down"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "save_dtype": ("fp32", "fp16", "bf16"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "prediction_type": ("", "epsilon", "v_prediction"),
    "allreduce_dtype": ("float32", "float16"),
}


# Every int / float option of TrainConfig (a test checks none is missing).
RANGES: Dict[str, Range] = {
    "seed": SEED_RANGE, "max_train_steps": AT_LEAST_1, "resolution": PIXELS, "flip_p": PROBABILITY,
    "keep_tokens": AT_LEAST_0, "caption_dropout_rate": PROBABILITY, "caption_dropout_every_n_epochs": AT_LEAST_0,
    "caption_tag_dropout_rate": PROBABILITY, "token_warmup_min": AT_LEAST_1, "token_warmup_step": AT_LEAST_0,
    "max_token_length": AT_LEAST_1, "num_class_images": AT_LEAST_0, "prior_loss_weight": AT_LEAST_0,
    "class_sample_steps": AT_LEAST_1, "class_sample_seed": SEED_RANGE, "vae_batch_size": AT_LEAST_1,
    "rank": AT_LEAST_1, "lora_alpha": AT_LEAST_0, "lora_dropout": BELOW_1, "lora_ga_batches": AT_LEAST_1,
    "lora_ga_gamma": POSITIVE, "huber_c": POSITIVE, "min_snr_gamma": AT_LEAST_0, "noise_offset": AT_LEAST_0,
    "multires_noise_iterations": AT_LEAST_0, "multires_noise_discount": PROBABILITY,
    "perlin_noise_octaves": AT_LEAST_0, "perlin_noise_persistence": Range(0, 1, lo_open=True),
    "perlin_noise_perturbation": AT_LEAST_0, "input_perturbation": AT_LEAST_0, "timestep_min": AT_LEAST_0,
    "timestep_max": AT_LEAST_0, "logit_mean": Range(), "logit_std": POSITIVE,
    "learning_rate": POSITIVE, "unet_lr": AT_LEAST_0, "text_encoder_lr": AT_LEAST_0, "adam_beta1": BELOW_1,
    "adam_beta2": BELOW_1, "adam_epsilon": POSITIVE, "weight_decay": AT_LEAST_0, "momentum": BELOW_1,
    "loraplus_ratio": AT_LEAST_0, "lr_warmup_steps": AT_LEAST_0, "lr_num_cycles": AT_LEAST_1, "lr_power": POSITIVE,
    "train_batch_size": AT_LEAST_1, "gradient_accumulation_steps": AT_LEAST_1, "max_grad_norm": AT_LEAST_0,
    "global_batch_size": AT_LEAST_0,
    "ema_decay": BELOW_1, "save_every": AT_LEAST_0, "keep_last": AT_LEAST_0, "log_every": AT_LEAST_1,
    "sample_every": AT_LEAST_0, "sample_seed": SEED_RANGE, "sample_steps": AT_LEAST_1, "sample_guidance": GUIDANCE,
    "before_after_prompts": AT_LEAST_0, "before_after_seeds": AT_LEAST_1, "validation_every": AT_LEAST_0,
    "validation_seed": SEED_RANGE,
    "min_bucket_reso": PIXELS, "max_bucket_reso": PIXELS, "bucket_reso_steps": PIXELS,
    "ti_num_vectors": AT_LEAST_1, "ti_learning_rate": POSITIVE,
}


def _is_list(tp) -> bool:
    return get_origin(tp) in (list, List)


def coerce(name: str, value: Any) -> Any:
    """Convert a TOML or command-line value to the type of field `name`."""
    if name not in FIELD_TYPES:
        raise ConfigError(f"unknown option {name!r}{_suggest(name)}")
    tp = FIELD_TYPES[name]
    if _is_list(tp):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (inner,) = get_args(tp) or (str,)
        return [inner(v) if not isinstance(v, inner) else v for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}") from None
    return value


def _suggest(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, FIELD_TYPES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flatten_toml(data: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    """Tables only group keys: merge them into one level; a key given twice is an error."""
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            inner = flatten_toml(value, f"{path}{key}.")
            for k, v in inner.items():
                if k in flat:
                    raise ConfigError(f"option {k!r} is set twice in the config file")
                flat[k] = v
        else:
            if key in flat:
                raise ConfigError(f"option {key!r} is set twice in the config file")
            flat[key] = value
    return flat


def load_toml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return flatten_toml(data)


# Config files shipped under configs/ that were renamed: old file name -> new one (old spellings keep working).
RENAMED_CONFIGS = {"seed.toml": "jittor-2024-pack.toml"}


def renamed_config(path: str) -> str:
    """`path`, or the renamed shipped config when `path` is an old name that no longer exists (with a note)."""
    folder, name = os.path.split(path)
    new = os.path.join(folder, RENAMED_CONFIGS.get(name, name))
    if not os.path.exists(path) and new != path and os.path.isfile(new):
        print(f"note: {path} is now {new} (the old name is deprecated)", file=sys.stderr)
        return new
    return path


def read_values(values: Dict[str, Any]) -> tuple:
    """One source's raw values (a file's or the command line's) -> (values under our names, notes)."""
    try:
        values, notes = translate(values, coerce)
        values, more = kohya_values(values)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return values, notes + more


def build_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                 note: Optional[Callable[[str], None]] = None) -> TrainConfig:
    """Defaults <- TOML file <- overrides (already parsed, e.g. from the command line). Validated.

    Paths in the file are relative to the working directory, as on the command line. kohya / diffusers
    names are translated (train/aliases.py); `note` receives one line per translation.
    """
    path = renamed_config(path) if path else path
    values, notes = read_values(load_toml(path)) if path else ({}, [])
    given, more = read_values({k: v for k, v in (overrides or {}).items() if v is not None})
    values.update(given)
    config = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    validate(config)
    for line in notes + more:
        if note is not None:
            note(line)
    return config


def validate(c: TrainConfig) -> None:
    for name, choices in CHOICES.items():
        if getattr(c, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(repr(x) for x in choices)}, got {getattr(c, name)!r}")
    for fmt in c.save_formats:
        if fmt not in ("diffusers", "kohya"):
            raise ConfigError(f"save_formats entries must be 'diffusers' or 'kohya', got {fmt!r}")
    if not c.save_formats:
        raise ConfigError("save_formats must name at least one format (diffusers, kohya)")
    check_ranges(as_dict(c), RANGES)
    if c.adaptive_lr and c.loraplus_ratio > 0:
        raise ConfigError("choose adaptive_lr or loraplus_ratio, not both")
    if c.lora_init == "lora_ga" and c.lora_dropout > 0:
        raise ConfigError("lora_init='lora_ga' needs lora_dropout = 0 (its gradient is taken without dropout)")
    if c.timestep_max and c.timestep_max <= c.timestep_min:
        raise ConfigError(f"timestep_max ({c.timestep_max}) must be above timestep_min ({c.timestep_min})")
    if c.with_prior_preservation and not c.class_prompt:
        raise ConfigError("with_prior_preservation needs class_prompt")
    if c.with_prior_preservation and not c.class_data_dir:
        raise ConfigError("with_prior_preservation needs class_data_dir")
    if not c.unet_targets and not c.text_encoder_targets and not c.textual_inversion:
        raise ConfigError("nothing to train: unet_targets and text_encoder_targets are both empty "
                          "and textual_inversion is off")
    if c.textual_inversion and not c.trigger_template:
        raise ConfigError("textual_inversion learns each style's trigger token: set trigger_template")
    if c.output_name and (os.sep in c.output_name or c.output_name in (".", "..") or
                          c.output_name.endswith(".safetensors")):
        raise ConfigError(f"output_name is a file name without folder or extension, got {c.output_name!r}")
    if c.enable_bucket:
        if not c.bucket_reso_steps <= c.min_bucket_reso <= c.resolution <= c.max_bucket_reso:
            raise ConfigError(f"buckets need bucket_reso_steps <= min_bucket_reso <= resolution <= max_bucket_reso, "
                              f"got {c.bucket_reso_steps}, {c.min_bucket_reso}, {c.resolution}, {c.max_bucket_reso}")


def to_toml(c: TrainConfig) -> str:
    """The resolved config as TOML (what --print-config shows; loads back to the same config)."""
    lines = []
    for f in dataclasses.fields(c):
        lines.append(f"{f.name} = {_toml_value(getattr(c, f.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def as_dict(c: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(c)


# ---------------------------------------------------------------------------- command line

def add_arguments(parser) -> None:
    """One `--option` per config field (default None: only options given override the file), plus the
    kohya / diffusers names of train/aliases.py."""
    import argparse
    accept_negative_numbers(parser)
    group = parser.add_argument_group("config options (override the TOML file)")
    for f in dataclasses.fields(TrainConfig):
        tp = FIELD_TYPES[f.name]
        flag = "--" + f.name.replace("_", "-")
        alias = "--" + f.name
        names = [flag] if alias == flag else [flag, alias]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"(default: {default!r})"
        if f.name == "sample_prompts":   # a prompt may hold commas: one flag per prompt
            group.add_argument("--sample-prompt", dest="cfg_sample_prompts", action="append", default=None,
                               metavar="PROMPT", help="a sample prompt (repeat the flag for more)")
        elif f.name == "sample_prompts_file":   # kohya's --sample_prompts names a file
            group.add_argument(*names, "--sample-prompts", "--sample_prompts", dest=f"cfg_{f.name}", default=None,
                               metavar="FILE", help="prompt file, kohya's format (--n --w --h --d --l --s per line)")
        elif f.name == "cache_latents":  # kohya: a switch
            group.add_argument(*names, dest=f"cfg_{f.name}", nargs="?", const="memory", default=None,
                               metavar="none|memory|disk", help=help_text + "; alone: memory (kohya's switch)")
        elif tp is bool:
            group.add_argument(*names, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            meta = "A,B,..." if _is_list(tp) else f.name.upper()
            group.add_argument(*names, dest=f"cfg_{f.name}", default=None, metavar=meta, help=help_text)
    kohya = parser.add_argument_group("kohya sd-scripts / diffusers example names (each prints a note naming ours)")
    for name, a in ALIASES.items():
        if a.switch:
            kohya.add_argument("--" + name, dest=f"alias_{name}", action="store_const", const=True, default=None,
                               help=f"{a.source}'s switch")
        elif name == "optimizer_args":
            kohya.add_argument("--" + name, dest=f"alias_{name}", nargs="+", default=None, metavar="KEY=VALUE",
                               help=f"{a.source}'s name")
        else:
            kohya.add_argument("--" + name, dest=f"alias_{name}", default=None, metavar="VALUE",
                               help=f"{a.source}'s name")
    for name, why in IGNORED.items():
        if name in SWITCHES_IGNORED:
            kohya.add_argument("--" + name, dest=f"alias_{name}", action="store_const", const=True, default=None,
                               help=f"ignored: {why}")
        else:
            kohya.add_argument("--" + name, dest=f"alias_{name}", default=None, metavar="VALUE",
                               help=f"ignored: {why}")
    for name, why in NO_EQUIVALENT.items():   # recognised, so that the error says what to do instead
        kohya.add_argument("--" + name, dest=f"alias_{name}", nargs="?", const=True, default=None,
                           help=argparse.SUPPRESS)


# argparse takes "-1e-3" for an option name unless told that such strings are numbers.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-inf$|^-nan$")


def accept_negative_numbers(parser) -> None:
    """Let `--learning-rate -1e-3` (space form) reach the range check instead of failing to parse."""
    parser._negative_number_matcher = _NEGATIVE_NUMBER


def overrides_from_args(args) -> Dict[str, Any]:
    """The options given on the command line, by name (ours, or an alias's: build_config translates)."""
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    out.update({k[6:]: v for k, v in vars(args).items() if k.startswith("alias_") and v is not None})
    return out
