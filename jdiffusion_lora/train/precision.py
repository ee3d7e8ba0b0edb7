"""Mixed precision: `mixed_precision = "no" | "bf16" | "fp16"` (the diffusers / kohya option).

What each part computes in:
- frozen base weights (UNet, text encoder, VAE): half precision (`cast_frozen`); the models' inputs
  are cast to the weights' dtype at the entry, so convolutions and matmuls run in half;
- trainable adapter tensors and the optimizer state: float32. A LoRA layer casts its matrices to the
  activation's dtype for the product (as torch.autocast does for a float32 weight) and the gradient
  flows back through the cast into the float32 tensor;
- softmax (attention) and GroupNorm / LayerNorm: float32 inside, output cast back to half;
- the loss: float32 (`per_sample_loss` casts the prediction).

Why explicit casts and not `jt.flags.amp_level`: at levels 4-6 Jittor gives every float op between two
non-scalar Vars a half dtype, float16 unless an input is bfloat16, even float32 x float32. So under
the flag the LoRA path, the loss, the scheduler maths and the optimizer update would all turn
half unless each were fenced off with `nn.fp32_guard` (which only acts while the flag is set). The
flag is also process-wide, and level 5 has a known problem under MPI (Jittor#559). With amp_level 0
(the default) an op's dtype follows its inputs (half x half -> half; half x float32 -> float32;
exp/pow -> float32), so casting the model inputs and weights gives autocast's dtypes for the
products, and the few float32 islands (norms, softmax) are written in our layers. A convolution must
get one dtype: Jittor's CPU (oneDNN) conv fails on a float32 input with a bfloat16 weight.

Device choice. On a GPU use bf16 or fp16 (fp16 needs the loss scaler below; bf16 has float32's
exponent range and needs none). On CPU, Jittor 1.3.11 has no good half path: its bf16 matmuls and
convolutions are fast (a 512^3 product 0.03 s) but accumulate in bfloat16 (measured relative error
5% at an inner dimension of 32, 21% at 144, 72% at 1024, against 0.3% for torch's bf16), and its fp16
ones accumulate in float16 (0.5% at 1024) through a generic loop about 50x slower than float32. So
`check_device` warns for both on CPU, and "no" stays the default; tests/test_precision.py holds the
comparison with torch.autocast (fp16 within 5%, bf16 an expected failure on CPU).

`GradScaler` is dynamic loss scaling (Micikevicius et al. 2018, "Mixed precision training"): the loss
is multiplied by `scale` before the backward pass so small fp16 gradients do not flush to zero; the
gradients are divided by it before clipping; a step with a non-finite gradient is skipped and the
scale multiplied by `backoff_factor`; after `growth_interval` good steps in a row it is multiplied by
`growth_factor`. Its state is saved in checkpoints, so a resumed run continues with the same scale.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence

from .._runtime import jt
from ..models.modeling import to_model_dtype

MODES = ("no", "bf16", "fp16")
DTYPE = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
HALF = ("float16", "bfloat16")
# A run stops (NonFiniteLoss) after this many non-finite steps in a row: by then the fp16 scale has
# shrunk 2^25-fold, and a bf16 run is diverging, not overflowing once.
MAX_CONSECUTIVE_SKIPS = 25


def compute_dtype(mode: str) -> str:
    """"no" | "bf16" | "fp16" -> the Jittor dtype the frozen models compute in."""
    if mode not in DTYPE:
        raise ValueError(f"mixed_precision must be one of {', '.join(MODES)}, got {mode!r}")
    return DTYPE[mode]


def check_device(mode: str, device: str, warn: Callable[[str], None] = print) -> str:
    """Validate `mode` for `device` ("cpu" | "cuda"); warn when a half mode is asked for on a CPU."""
    compute_dtype(mode)
    if mode == "fp16" and device != "cuda":
        warn("warning: mixed_precision fp16 on CPU: Jittor runs float16 matmuls as a generic loop (about 50x "
             "slower than float32) accumulating in float16; prefer mixed_precision = \"no\" on CPU")
    if mode == "bf16" and device != "cuda":
        warn("warning: mixed_precision bf16 on CPU: Jittor 1.3.11's CPU bfloat16 matmuls and convolutions "
             "accumulate in bfloat16 (relative error 20-70% at SD layer widths); use it to fit memory only, "
             "prefer mixed_precision = \"no\" on CPU and bf16/fp16 on a GPU")
    return mode


def cast_frozen(models: Iterable, mode: str) -> None:
    """Cast every parameter of `models` (base weights; adapter tensors are not parameters) to half."""
    dtype = compute_dtype(mode)
    for model in models:
        if model is not None and model.dtype != dtype:
            model.to_dtype(dtype)


# ------------------------------------------------------------------------------ loss scaling

@dataclass
class GradScaler:
    """Dynamic loss scale for fp16 (enabled) and the count of skipped steps (every mode)."""

    enabled: bool = True
    scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0          # finite steps since the scale last changed
    skipped_steps: int = 0       # steps skipped for a non-finite loss or gradient, in the whole run
    consecutive_skips: int = 0

    @classmethod
    def for_mode(cls, mode: str) -> "GradScaler":
        return cls(enabled=mode == "fp16")

    @property
    def factor(self) -> float:
        """What the loss is multiplied by before the backward pass (1 when disabled)."""
        return self.scale if self.enabled else 1.0

    def scale_loss(self, loss: "jt.Var") -> "jt.Var":
        """The loss to differentiate: loss * scale (a power of two: exact) when enabled, else the loss itself."""
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads: Sequence["jt.Var"]) -> list:
        """Gradients of the scaled loss -> gradients of the loss (before clipping and the norm)."""
        if not self.enabled:
            return list(grads)
        inv = 1.0 / self.scale
        return [g * inv for g in grads]

    def update(self, finite: bool) -> bool:
        """Record one step's outcome; returns True when the optimizer should step (the step was finite)."""
        if finite:
            self.consecutive_skips = 0
            if self.enabled:
                self.good_steps += 1
                if self.good_steps >= self.growth_interval:
                    self.scale *= self.growth_factor
                    self.good_steps = 0
            return True
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.enabled:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        return False

    def state_dict(self) -> Dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: Optional[Dict[str, float]]) -> None:
        """Restore a saved state; the `enabled` flag stays this run's (a checkpoint may come from another mode)."""
        if not state:
            return
        for key, value in state.items():
            if key != "enabled" and hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))


def all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)


__all__ = ["MODES", "DTYPE", "HALF", "MAX_CONSECUTIVE_SKIPS", "GradScaler", "all_finite", "cast_frozen", "check_device", "compute_dtype",
           "to_model_dtype"]
