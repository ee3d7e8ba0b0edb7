"""Optimisation: parameter groups with their learning rates, LR schedules, clipping, the optimizer.

Learning rates of a LoRA pair W + s * B A (A = down (r, in), B = up (out, r)):
- base: `unet_lr` or `text_encoder_lr` (0 = `learning_rate`);
- adaptive LR (the seed, after LoRA+, Hayou et al. 2024): one matrix of each pair gets
  lr * max(1, sqrt(n / r)), n the width of that matrix's other side (out for B, in for A), r the
  pair's (total) rank; `adaptive_lr_matrix` picks B ("up", the seed README) or A ("down", its code);
- LoRA+ plain ratio: B gets lr * `loraplus_ratio`.
Parameters with the same learning rate share one group; `describe_groups` lists them.

The optimizers are Jittor's own (`jt.optim.AdamW`, ...) driven with gradients we computed and
accumulated ourselves; their state (moments and step count) is saved and restored by us, since
Jittor's `state_dict` does not hold it. AdamW gets PyTorch's defaults (betas 0.9/0.999, eps 1e-8,
weight_decay 1e-2; Jittor's own default weight_decay is 0).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import numpy as np

from .._runtime import jt
from .adapters import LoraPair


# ---------------------------------------------------------------------------- parameter groups

def pair_learning_rates(pair: LoraPair, c) -> Dict[str, float]:
    """{'down': lr, 'up': lr} for one pair under the config's rules (see the module docstring)."""
    base = (c.unet_lr if pair.component == "unet" else c.text_encoder_lr) or c.learning_rate
    lrs = {"down": base, "up": base}
    if c.adaptive_lr:
        side = c.adaptive_lr_matrix
        n = pair.out_features if side == "up" else pair.in_features
        lrs[side] = base * max(1.0, math.sqrt(n / pair.rank))
    elif c.loraplus_ratio > 0:
        lrs["up"] = base * c.loraplus_ratio
    return lrs


def build_param_groups(pairs: Sequence[LoraPair], c, extra: Sequence = ()) -> List[dict]:
    """Groups {"name", "params", "param_names", "lr", "initial_lr"}, one per (component, lr).

    `extra`: (name, var, component) of other trainable parameters (base lr of their component), or
    (name, var, component, lr) with a learning rate of their own (Textual Inversion vectors).
    """
    groups: Dict[tuple, dict] = {}

    def add(component, lr, name, var):
        key = (component, float(lr))
        if key not in groups:
            groups[key] = {"name": f"{component} lr={lr:.6g}", "params": [], "param_names": [],
                           "lr": float(lr), "initial_lr": float(lr)}
        groups[key]["params"].append(var)
        groups[key]["param_names"].append(name)

    for pair in pairs:
        lrs = pair_learning_rates(pair, c)
        add(pair.component, lrs["down"], pair.name + ".lora_A.weight", pair.down)
        add(pair.component, lrs["up"], pair.name + ".lora_B.weight", pair.up)
    for name, var, component, *own_lr in extra:
        lr = own_lr[0] if own_lr else (c.unet_lr if component == "unet" else c.text_encoder_lr) or c.learning_rate
        add(component, lr, name, var)
    return list(groups.values())


def describe_groups(groups: Sequence[dict]) -> str:
    lines = []
    for g in groups:
        n = sum(int(np.prod(p.shape)) for p in g["params"])
        lines.append(f"  {g['name']}: {len(g['params'])} tensors, {n:,} parameters")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- LR schedules

def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              lr_init: float = 1.0, lr_end: float = 1e-7) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `s` (0-based), as diffusers' `get_scheduler`.

    As in diffusers, "cosine" is a half cosine (num_cycles 0.5) whatever `num_cycles` says; the
    cycles count only for "cosine_with_restarts".
    """
    def warm(s):
        return s / max(1, warmup)

    if name == "constant":
        return lambda s: 1.0
    if name == "constant_with_warmup":
        return lambda s: warm(s) if s < warmup else 1.0
    if name == "linear":
        return lambda s: warm(s) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        def cosine(s):
            if s < warmup:
                return warm(s)
            progress = (s - warmup) / max(1, total - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        return cosine
    if name == "cosine_with_restarts":
        def restarts(s):
            if s < warmup:
                return warm(s)
            progress = (s - warmup) / max(1, total - warmup)
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
        return restarts
    if name == "polynomial":
        if not lr_init > lr_end:
            raise ValueError(f"polynomial schedule: lr_end ({lr_end}) must be below the learning rate ({lr_init})")

        def poly(s):
            if s < warmup:
                return warm(s)
            if s > total:
                return lr_end / lr_init
            decay = (lr_init - lr_end) * (1 - (s - warmup) / (total - warmup)) ** power + lr_end
            return decay / lr_init
        return poly
    raise ValueError(f"unknown lr_scheduler {name!r}")


def schedule_for(c) -> Callable[[int], float]:
    return lr_lambda(c.lr_scheduler, c.lr_warmup_steps, c.max_train_steps, c.lr_num_cycles, c.lr_power,
                     lr_init=c.learning_rate)


# ---------------------------------------------------------------------------- clipping

def global_grad_norm(grads: Sequence["jt.Var"]) -> float:
    """sqrt(sum of squares of every gradient), computed in float64 on the host side of the sum."""
    total = 0.0
    sums = [(g.float32() * g.float32()).sum() for g in grads]
    jt.sync(sums)
    for s in sums:
        total += float(s.item())
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float) -> float:
    """Factor torch's clip_grad_norm_ applies: min(1, max_norm / (norm + 1e-6)); 1 when clipping is off."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


# ---------------------------------------------------------------------------- optimizer

STATE_SKIP = ("params", "grads", "param_names", "name", "lr", "initial_lr")


class Optimizer:
    """Jittor's optimizer `kind` over `groups`, stepped with gradients we pass in."""

    def __init__(self, groups: List[dict], c):
        self.groups = groups
        self.params = [p for g in groups for p in g["params"]]
        self.names = [n for g in groups for n in g["param_names"]]
        kind = c.optimizer
        if kind == "AdamW":
            self.inner = jt.optim.AdamW(groups, c.learning_rate, eps=c.adam_epsilon,
                                        betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay)
        elif kind == "Adam":
            self.inner = jt.optim.Adam(groups, c.learning_rate, eps=c.adam_epsilon,
                                       betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay)
        elif kind == "SGD":
            self.inner = jt.optim.SGD(groups, c.learning_rate, momentum=c.momentum, weight_decay=c.weight_decay)
        elif kind == "RMSprop":
            self.inner = jt.optim.RMSprop(groups, c.learning_rate, eps=c.adam_epsilon)
        elif kind == "Adan":
            self.inner = jt.optim.Adan(groups, c.learning_rate, eps=c.adam_epsilon, weight_decay=c.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {kind!r}")
        self.step_count = 0

    def set_lr_scale(self, scale: float) -> None:
        for g in self.groups:
            g["lr"] = g["initial_lr"] * scale

    def step(self, grads: Sequence["jt.Var"]) -> None:
        """One update with `grads` (aligned with `self.params`)."""
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.params)} parameters")
        i = 0
        for g in self.groups:
            n = len(g["params"])
            g["grads"] = [x.stop_grad() for x in grads[i:i + n]]
            i += n
        self.step_count += 1
        self.inner.n_step = self.step_count   # Jittor counts steps in backward(), which we do not call
        self.inner._Optimizer__zero_grad = False
        self.inner.step()
        jt.sync(self.params)
        for g in self.groups:
            g.pop("grads", None)

    # ------------------------------------------------------------------ state

    def state_arrays(self) -> Dict[str, np.ndarray]:
        """Every state tensor, keyed "<group index>.<state name>.<param index>"."""
        out = {}
        for gi, g in enumerate(self.groups):
            for key, values in g.items():
                if key in STATE_SKIP or not isinstance(values, list):
                    continue
                for pi, v in enumerate(values):
                    if isinstance(v, jt.Var):
                        out[f"{gi}.{key}.{pi}"] = v.numpy()
        return out

    def load_state_arrays(self, arrays: Dict[str, np.ndarray], step_count: int) -> None:
        expected = set(self.state_arrays())
        if set(arrays) != expected:
            missing, extra = expected - set(arrays), set(arrays) - expected
            raise ValueError(f"optimizer state does not match this optimizer (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}); was it saved with another optimizer?")
        for key, arr in arrays.items():
            gi, name, pi = key.split(".")
            var = self.groups[int(gi)][name][int(pi)]
            if tuple(var.shape) != tuple(arr.shape):
                raise ValueError(f"optimizer state {key} has shape {arr.shape}, expected {tuple(var.shape)}")
            var.update(jt.array(arr.astype(np.float32)))
        self.step_count = int(step_count)
        jt.sync_all()


def update_ema(ema: Sequence, params: Sequence, decay: float) -> None:
    """Exponential moving average of the trained weights: e <- decay * e + (1 - decay) * p."""
    for e, p in zip(ema, params):
        e.update(e * decay + p * (1.0 - decay))
    jt.sync(list(ema))
