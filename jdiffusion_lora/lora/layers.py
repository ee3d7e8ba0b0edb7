"""Adapter layers: LoRA (Linear, Conv2d "LoCon"), LoHa, LoKr, each optionally with DoRA.

`LoraLayer` REPLACES a `nn.Linear` / `nn.Conv2d` in its parent module, so every adapted
module sits on the forward path (the seed system put its `to_out.0` adapter beside the layer,
where it never ran). The layer keeps the base layer's `weight` and `bias` Vars as its own
attributes under the same names, so the model's `state_dict()` keys do not change
(`...attn1.to_q.weight` stays `...attn1.to_q.weight`).

Adapter tensors live in plain Python objects (`Adapter`) held in `_adapters`: Jittor does not
walk into dicts, so they are not module parameters, not in `state_dict()`, and `model.eval()`
does not stop their gradients. Reach them with `lora_parameters(model)` (see `inject.py`).

Output of an adapted layer:
    y = base(x) + sum over active adapters a of  multiplier_a * scale_a * delta_a(x)
with scale = alpha / rank. LoRA computes delta(x) as up(down(x)) (no weight materialised);
LoHa, LoKr, LoCon-Tucker and DoRA build the weight update and apply it as a Linear / Conv2d.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Dict, List, Optional

import numpy as np

from .._runtime import jt
from ..models.lean_backward import lora_linear
from .adapter_math import AdapterTensors, delta_weight, norm_axes, rank_of, scale_of

nn = jt.nn


@dataclasses.dataclass
class AdapterConfig:
    """How to create a new adapter on each targeted layer.

    rank, alpha: scale = alpha / rank (alpha None -> alpha = rank).
    kind: "lora", "loha" or "lokr". use_dora: add a DoRA magnitude on top.
    init: down-matrix init for LoRA, "kaiming" (PEFT's default, uniform +-1/sqrt(fan_in))
        or "gaussian" (normal, std 1/rank). init_up: "zero" (the adapter starts as a no-op)
        or "gaussian" (normal, std 1/rank; changes the model from step 0).
    dropout: dropout on the rank activation (kohya's "dropout"); input_dropout: dropout on
        the layer input before the down matrix (PEFT's "lora_dropout", what the seed used);
        rank_dropout: drop whole rank channels per sample, rescaling by 1/(1-p);
        module_dropout: skip the whole adapter with probability p per forward. All only in training.
    conv_rank, conv_alpha: rank/alpha for convolutions with kernel > 1 (kohya conv_dim/conv_alpha).
    lokr_factor: Kronecker factor for LoKr (-1: as square as possible); decompose_both: also
        factor the left Kronecker matrix into a low-rank product.
    seed: numpy seed for the initial values (None: fresh randomness).
    """

    rank: int = 4
    alpha: Optional[float] = None
    kind: str = "lora"
    use_dora: bool = False
    init: str = "kaiming"
    init_up: str = "zero"
    dropout: float = 0.0
    input_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    lokr_factor: int = -1
    decompose_both: bool = False
    seed: Optional[int] = None

    def __post_init__(self):
        if self.kind not in ("lora", "loha", "lokr"):
            raise ValueError(f"kind must be lora, loha or lokr, got {self.kind!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.init_up not in ("zero", "gaussian"):
            raise ValueError(f"init_up must be 'zero' or 'gaussian', got {self.init_up!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        for name in ("dropout", "input_dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    def for_layer(self, weight_shape, rank=None, alpha=None) -> "AdapterConfig":
        """This config with rank/alpha resolved for one layer (overrides, then conv_rank for k>1 convs)."""
        is_spatial_conv = len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)
        r = rank if rank is not None else (self.conv_rank if is_spatial_conv and self.conv_rank else self.rank)
        if alpha is not None:
            a = alpha
        elif rank is None and is_spatial_conv and self.conv_rank:
            a = self.conv_alpha
        else:
            a = self.alpha
        return dataclasses.replace(self, rank=r, alpha=a)


# --------------------------------------------------------------------------- initial values

def factorization(dimension: int, factor: int = -1):
    """Split `dimension` into (m, n), m <= n, m * n = dimension, as LyCORIS does for LoKr.

    factor > 0 and dividing: (factor, dimension // factor) ordered; otherwise the most
    square split with m <= factor (factor -1: no limit).
    """
    if 0 < factor and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def _kaiming_uniform(rng, shape):
    """PyTorch's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = int(np.prod(shape[1:]))
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def init_adapter_tensors(config: AdapterConfig, weight_shape, rng: np.random.Generator,
                         weight: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Initial tensors (numpy float32) for a new adapter on a layer whose weight has `weight_shape`.

    The weight values themselves are only needed for DoRA (its magnitude starts at their norm).
    """
    shape = tuple(weight_shape)
    out, inp = shape[0], shape[1]
    kernel = tuple(shape[2:])
    r = config.rank
    t: Dict[str, np.ndarray] = {}
    if config.kind == "lora":
        down_shape = (r, inp) + kernel
        if config.init == "kaiming":
            t["down"] = _kaiming_uniform(rng, down_shape)
        else:
            t["down"] = rng.normal(0.0, 1.0 / r, size=down_shape).astype(np.float32)
        up_shape = (out, r) + (1,) * len(kernel)
        if config.init_up == "zero":
            t["up"] = np.zeros(up_shape, np.float32)
        else:
            t["up"] = rng.normal(0.0, 1.0 / r, size=up_shape).astype(np.float32)
    elif config.kind == "loha":
        fan = inp * int(np.prod(kernel or (1,)))
        t["w1_a"] = rng.normal(0.0, 0.1, size=(out, r)).astype(np.float32)
        t["w1_b"] = rng.normal(0.0, 1.0, size=(r, fan)).astype(np.float32)
        t["w2_b"] = rng.normal(0.0, 1.0, size=(r, fan)).astype(np.float32)
        if config.init_up == "zero":
            t["w2_a"] = np.zeros((out, r), np.float32)
        else:
            t["w2_a"] = rng.normal(0.0, 0.1, size=(out, r)).astype(np.float32)
    else:  # lokr: delta = kron(w1 (a, c), w2 (b, d[, kh, kw])), out = a*b, in = c*d
        a, b = factorization(out, config.lokr_factor)
        c, d = factorization(inp, config.lokr_factor)
        if config.decompose_both and r < max(a, c) / 2:
            t["w1_a"] = _kaiming_uniform(rng, (a, r))
            t["w1_b"] = _kaiming_uniform(rng, (r, c))
        else:
            t["w1"] = _kaiming_uniform(rng, (a, c))
        zero_or_random = (lambda s: np.zeros(s, np.float32)) if config.init_up == "zero" else \
            (lambda s: rng.normal(0.0, 0.1, size=s).astype(np.float32))
        if r < max(b, d) / 2:
            t["w2_a"] = _kaiming_uniform(rng, (b, r))
            t["w2_b"] = zero_or_random((r, d * int(np.prod(kernel or (1,)))))
        else:
            t["w2"] = zero_or_random((b, d) + kernel)
    if config.use_dora:
        if weight is None:
            raise ValueError("DoRA needs the base weight to initialise its magnitude")
        alpha = config.alpha if config.alpha is not None else r
        scale = scale_of(alpha, rank_of(config.kind, t))
        merged = weight.astype(np.float32) + delta_weight(config.kind, t, scale, shape)
        axes = tuple(range(1, len(shape)))
        t["magnitude"] = np.sqrt((merged ** 2).sum(axis=axes, keepdims=True)).astype(np.float32)
    return t


# --------------------------------------------------------------------------- one adapter

class Adapter(AdapterTensors):
    """One adapter's Vars on one layer, with its alpha and dropout settings.

    A plain object on purpose: Jittor's module traversal does not see it (see module docstring).
    """

    def __init__(self, kind: str, tensors: Dict[str, "jt.Var"], alpha: Optional[float] = None,
                 dropout: float = 0.0, input_dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0):
        self.kind = kind
        self.tensors = tensors
        self.alpha = alpha
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    @property
    def low_rank_path(self) -> bool:
        """True when the output can be computed as up(down(x)) without building the weight."""
        return self.kind == "lora" and "mid" not in self.tensors and not self.uses_dora

    def numpy_tensors(self) -> Dict[str, np.ndarray]:
        return {k: v.numpy().copy() for k, v in self.tensors.items()}

    def weight_update(self, weight, multiplier: float):
        """The change this adapter makes to `weight` at `multiplier` (a Var, float32)."""
        t = {k: v for k, v in self.tensors.items() if k != "magnitude"}
        delta = delta_weight(self.kind, t, self.scale * multiplier, tuple(weight.shape))
        if not self.uses_dora:
            return delta
        w = weight.float32()
        merged = w + delta
        magnitude = self.tensors["magnitude"]
        axes = norm_axes(tuple(magnitude.shape), len(weight.shape))
        # Norm treated as a constant, as in the DoRA paper (section 4.3) and PEFT.
        norm = jt.sqrt((merged * merged).sum(axes, keepdims=True)).detach()
        if len(magnitude.shape) == 1:
            magnitude = magnitude.reshape(-1, *([1] * (len(weight.shape) - 1)))
        return merged * (magnitude / norm) - w


# --------------------------------------------------------------------------- the layer

class LoraLayer(nn.Module):
    """A Linear or Conv2d with any number of named adapters; replaces the base layer in its parent."""

    def __init__(self, base):
        if isinstance(base, nn.Linear):
            self.layer_type = "linear"
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("adapters on grouped convolutions are not supported")
            self.layer_type = "conv"
            self.in_channels, self.out_channels = base.in_channels, base.out_channels
            self.kernel_size, self.stride = base.kernel_size, base.stride
            self.padding, self.dilation, self.groups = base.padding, base.dilation, base.groups
        else:
            raise TypeError(f"adapters need a jittor nn.Linear or nn.Conv2d, got {type(base).__name__}")
        # Same Var objects as the base layer: state_dict keys and loading are unchanged.
        self.weight = base.weight
        self.bias = base.bias
        self.is_train = getattr(base, "is_train", False)
        self._base_layer = (base,)    # in a tuple: Jittor's traversal must not see it as a child
        self._adapters: Dict[str, Adapter] = {}
        self._multipliers: Dict[str, float] = {}
        self._active: List[str] = []
        self._enabled = True          # False: adapters skipped (disable_lora)
        self._fused: List[str] = []
        self._unfused_weight = None   # (numpy copy, dtype) while adapters are fused

    # ----------------------------------------------------------------- adapters

    @property
    def base_layer(self):
        """The original layer object (sharing this layer's weight and bias)."""
        base = self._base_layer[0]
        base.weight, base.bias = self.weight, self.bias
        return base

    @property
    def adapter_names(self) -> List[str]:
        return list(self._adapters)

    def add_adapter(self, name: str, adapter: Adapter, multiplier: float = 1.0, active: bool = True):
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self._fused:
            raise RuntimeError("cannot add an adapter while adapters are fused; call unfuse first")
        self._adapters[name] = adapter
        self._multipliers[name] = float(multiplier)
        if active:
            self._active.append(name)

    def delete_adapter(self, name: str):
        if name in self._fused:
            raise RuntimeError(f"adapter {name!r} is fused into the weight; call unfuse first")
        self._adapters.pop(name)
        self._multipliers.pop(name)
        if name in self._active:
            self._active.remove(name)

    def set_active(self, names_and_multipliers: Dict[str, float]):
        """Activate exactly these adapters (those present on this layer) with these multipliers."""
        self._active = [n for n in names_and_multipliers if n in self._adapters]
        for n in self._active:
            self._multipliers[n] = float(names_and_multipliers[n])

    # ----------------------------------------------------------------- forward

    def _apply(self, x, w, spatial: bool = True):
        """x through a bias-free Linear/Conv2d with weight w; spatial=False: 1x1 conv, stride 1."""
        if self.layer_type == "linear":
            return nn.matmul_transpose(x, w)
        if spatial:
            return nn.conv2d(x, w, None, self.stride, self.padding, self.dilation, 1)
        return nn.conv2d(x, w, None, 1, 0, 1, 1)

    def _adapter_output(self, x, adapter: Adapter, multiplier: float):
        training = self.is_train
        # The product runs in the activation's dtype: half under mixed precision, where the float32
        # adapter tensors are cast on the way in (as torch.autocast does) and their gradients flow
        # back through the cast in float32.
        dtype = adapter.tensors["down" if adapter.kind == "lora" else next(iter(adapter.tensors))].dtype
        if str(x.dtype) in ("float16", "bfloat16"):
            dtype = x.dtype
        elif x.dtype != dtype:
            x = x.cast(dtype)
        if training and adapter.input_dropout > 0:
            x = nn.dropout(x, adapter.input_dropout, is_train=True)
        if not adapter.low_rank_path:
            return self._apply(x, adapter.weight_update(self.weight, multiplier).cast(dtype))
        down, up = (t if t.dtype == dtype else t.cast(dtype) for t in (adapter.tensors["down"], adapter.tensors["up"]))
        h = self._apply(x, down)                                           # (..., r) or (B, r, H', W')
        if training and adapter.dropout > 0:
            h = nn.dropout(h, adapter.dropout, is_train=True)
        scale = adapter.scale * multiplier
        if training and adapter.rank_dropout > 0:
            r = h.shape[1] if self.layer_type == "conv" else h.shape[-1]
            keep = (jt.rand((h.shape[0], r)) > adapter.rank_dropout).cast(h.dtype)   # (B, r)
            if self.layer_type == "conv":
                keep = keep.reshape(h.shape[0], r, 1, 1)
            elif h.ndim == 3:
                keep = keep.reshape(h.shape[0], 1, r)
            h = h * keep
            scale = scale / (1.0 - adapter.rank_dropout)
        return self._apply(h, up, spatial=False) * scale

    def _lean_adapter(self, x):
        """The one active plain LoRA adapter when the lean-backward Linear applies (frozen float32 Linear,
        no dropout of any kind, not fused, gradients on), else None."""
        if (self.layer_type != "linear" or not self._enabled or self._fused or len(self._active) != 1
                or jt.flags.no_grad or not self.weight.is_stop_grad()
                or (self.bias is not None and not self.bias.is_stop_grad())):
            return None
        adapter = self._adapters[self._active[0]]
        if (not adapter.low_rank_path or adapter.dropout or adapter.input_dropout or adapter.rank_dropout
                or adapter.module_dropout):
            return None
        tensors = (x, self.weight, adapter.tensors["down"], adapter.tensors["up"])
        return adapter if all(str(t.dtype) == "float32" for t in tensors) else None

    def execute(self, x):
        adapter = self._lean_adapter(x)
        if adapter is not None:   # training a LoRA: save x and the rank-r activation only (models/lean_backward)
            return lora_linear(x, self.weight, self.bias, adapter.tensors["down"], adapter.tensors["up"],
                               adapter.scale * self._multipliers[self._active[0]])
        out = self.base_layer(x)
        if not self._enabled:
            return out
        for name in self._active:
            if name in self._fused:
                continue
            adapter = self._adapters[name]
            if self.is_train and adapter.module_dropout > 0 and random.random() < adapter.module_dropout:
                continue
            out = out + self._adapter_output(x, adapter, self._multipliers[name]).cast(out.dtype)
        return out

    # ----------------------------------------------------------------- fuse / unfuse

    def fuse(self, names: Optional[List[str]] = None, scale: float = 1.0):
        """Add the given (default: active) adapters into `weight`, keeping an exact copy to restore."""
        if self._fused:
            raise RuntimeError(f"adapters {self._fused} are already fused; call unfuse first")
        names = [n for n in (self._active if names is None else names) if n in self._adapters]
        if not names:
            return
        weight = self.weight
        dtype = str(weight.dtype)
        original = weight.float32().numpy().copy() if dtype == "bfloat16" else weight.numpy().copy()
        w32 = weight.float32()
        update = None
        for n in names:
            u = self._adapters[n].weight_update(w32, self._multipliers[n] * scale)
            update = u if update is None else update + u
        new = (w32 + update).cast(dtype)
        new.sync()
        self._unfused_weight = (original, dtype)
        weight.assign(new)
        self._fused = list(names)

    def unfuse(self):
        """Restore the exact weight saved by `fuse` (a copy, not a subtraction)."""
        if not self._fused:
            return
        original, dtype = self._unfused_weight
        self.weight.assign(jt.array(original).cast(dtype))
        self._unfused_weight = None
        self._fused = []

    def extra_repr(self):
        return f"{self.layer_type}, adapters={self.adapter_names}, active={self._active}, fused={self._fused}"
