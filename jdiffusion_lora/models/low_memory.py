"""Low-memory weights: Linear and Conv2d weights stored in bfloat16, computed in float32.

On CPU, oneDNN runs bfloat16 matmuls fast but Jittor's bfloat16 convolution is a generic loop (a 320-channel
3x3 conv at 64x64: 30 s against 0.44 s in float32, measured), so storing the weights in half precision and
computing in float32 is what halves the memory without slowing down. Each wrapped layer casts its weight (and
bias) to float32 when called and computes its output at once (`sync`), so a single layer's float32 copy
exists at a time: Jittor's lazy graph would otherwise cast every weight of the model before the first matmul.
Norm layers and embeddings stay in float32 (a few MB). Inference only: gradients do not reach the stored weights.

The wrapper reaches its layer through a weak reference: a closure holding the layer itself would make every
layer a reference cycle, and a model made of cycles is only freed when Python's cyclic collector happens to
run (the low-memory pipeline then held the text encoder through the UNet's loop, and the UNet through the
VAE's decoding: 1-2 GB, measured).
"""
from __future__ import annotations

import weakref

from .._runtime import jt

nn = jt.nn

STORAGE_DTYPE = "bfloat16"
# Jittor's allocator keeps freed blocks for reuse; float32 weight copies of ever-different sizes would pile up
# there, so after a layer whose weight has at least this many values the cache is emptied (`jt.gc()`).
GC_ABOVE = 2 ** 20


def _wrap(module, storage: str) -> None:
    if getattr(module, "_low_memory_storage", None):
        return
    compute = type(module).execute           # the class's function: no reference to this layer
    layer = weakref.ref(module)

    def execute(*args, **kwargs):
        module = layer()
        weight, bias = module.weight, getattr(module, "bias", None)
        module.weight = weight.float32()
        if bias is not None:
            module.bias = bias.float32()
        try:
            out = compute(module, *args, **kwargs)
        finally:
            module.weight, module.bias = weight, bias
        out.sync()
        if module.weight.numel() >= GC_ABOVE:
            jt.gc()
        return out

    module.execute = execute
    module._low_memory_storage = storage
    module.weight.assign(module.weight.cast(storage))
    if getattr(module, "bias", None) is not None:
        module.bias.assign(module.bias.cast(storage))


def store_weights_low_memory(model, storage: str = STORAGE_DTYPE):
    """Wrap every Linear / Conv2d of `model` (LoRA-adapted base layers included) to keep its weights in
    `storage` and compute in float32. Call before loading weights: they are then cast tensor by tensor."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _wrap(module, storage)
    model._low_memory_storage = storage   # its `dtype` (what inputs are cast to) stays float32
    return model


def is_low_memory(model) -> bool:
    return any(getattr(m, "_low_memory_storage", None) for _, m in model.named_modules())
