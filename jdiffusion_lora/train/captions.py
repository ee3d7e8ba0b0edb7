"""Training captions: the seed's form plus kohya's caption augmentations.

A caption is a comma-separated list of tags. We build it from three parts:

    head  fixed at the front: caption_prefix tags, the trigger token (`style_NN`), the style tags
    body  shuffled (the seed's `shuffle_item_tags`): item tags, the file stem, and `horizontal_flip`
          when the image was flipped
    tail  fixed at the end: caption_suffix tags

and join the tags with "," after stripping the spaces around them ("comma-normalised"), e.g.

    style_00,purple,lineart,dark_background,fruit,apple,apple

which is the seed's caption exactly. kohya's options act on top: `shuffle_caption` shuffles every tag
after the first `keep_tokens` (instead of the body only), `token_warmup_*` keeps only the first
tags of the shuffled part early in training, `caption_tag_dropout_rate` drops shuffleable tags (never
the flip tag: it labels a real transformation), `caption_dropout_rate` /
`caption_dropout_every_n_epochs` replace the whole caption by "". The text encoder's tokenizer
truncates to 77 tokens (`max_token_length`).

Every random choice comes from the numpy Generator passed in (one per training sample).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np


def split_tags(text: str) -> List[str]:
    """'a,  b c , ,d' -> ['a', 'b c', 'd'] (spaces collapsed, empty tags dropped)."""
    return [t for t in (re.sub(r"\s+", " ", part).strip() for part in (text or "").split(",")) if t]


def join_tags(tags: List[str]) -> str:
    return ",".join(tags)


@dataclass
class CaptionParts:
    head: List[str] = field(default_factory=list)
    body: List[str] = field(default_factory=list)
    tail: List[str] = field(default_factory=list)
    keep: List[str] = field(default_factory=list)  # body tags never dropped (the flip tag)


@dataclass
class CaptionOptions:
    """The caption fields of TrainConfig (see there)."""
    shuffle_item_tags: bool = True
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    max_train_steps: int = 1

    @classmethod
    def from_config(cls, c) -> "CaptionOptions":
        return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__})


def caption_parts(trigger: str, style_tags: List[str], item_tags: List[str], stem: Optional[str],
                  flipped: bool, flip_tag: str = "horizontal_flip", prefix: str = "", suffix: str = "") -> CaptionParts:
    """The parts of one image's caption (competition layout, or a plain caption given as `item_tags`)."""
    head = split_tags(prefix) + ([trigger] if trigger else []) + list(style_tags)
    body = list(item_tags) + ([stem] if stem else [])
    keep = []
    if flipped and flip_tag:
        body.append(flip_tag)
        keep.append(flip_tag)
    return CaptionParts(head=head, body=body, tail=split_tags(suffix), keep=keep)


def render_caption(parts: CaptionParts, opts: CaptionOptions, rng: np.random.Generator, epoch: int = 1,
                   step: int = 0) -> str:
    """Apply the augmentations and join. `epoch` is 1-based (kohya's `every_n_epochs` convention).

    The Generator is always consumed in the same order (dropout draw, shuffle, tag dropout draws),
    so turning one option on does not change the others' draws.
    """
    drop_whole = rng.random() < opts.caption_dropout_rate
    body = list(parts.body)
    order = rng.permutation(len(body))
    if opts.shuffle_item_tags:
        body = [body[i] for i in order]
    if opts.shuffle_caption:
        tags = parts.head + body
        fixed, flex = tags[:opts.keep_tokens], tags[opts.keep_tokens:]
        flex = [flex[i] for i in rng.permutation(len(flex))]
    else:
        fixed, flex = list(parts.head), body
    if opts.token_warmup_step > 0:
        warmup = opts.token_warmup_step
        if warmup < 1:
            warmup = math.floor(warmup * opts.max_train_steps)
        if step < warmup:
            n = math.floor(step * (len(flex) - opts.token_warmup_min) / warmup) + opts.token_warmup_min
            flex = flex[:max(n, 0)]
    draws = rng.random(len(flex))
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t, u in zip(flex, draws) if t in parts.keep or u >= opts.caption_tag_dropout_rate]
    if drop_whole:
        return ""
    n_epochs = opts.caption_dropout_every_n_epochs
    if n_epochs > 0 and epoch % n_epochs == 0:
        return ""
    return join_tags(fixed + flex + parts.tail)


def token_length(tokenizer, text: str) -> int:
    """Number of tokens of `text` including the start and end tokens."""
    return len(tokenizer.encode(text, add_special_tokens=True, truncation=False))


def truncated_text(tokenizer, text: str, max_length: int = 77) -> str:
    """The longest prefix of `text` whose tokens all survive truncation to `max_length` (for display;
    the token that straddles the cut, if any, is left out)."""
    if token_length(tokenizer, text) <= max_length:
        return text
    lo, hi = 0, len(text)            # token_length(text[:lo]) fits, text[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if token_length(tokenizer, text[:mid]) <= max_length:
            lo = mid
        else:
            hi = mid
    return text[:lo]
