"""Gradient checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory cost").

A checkpointed block keeps only its inputs from the forward pass; the backward pass runs the block
again and differentiates that second run. Jittor has no checkpoint primitive, so it is built on
`jt.Function` (custom forward `execute` and backward `grad`):

    execute(inputs)   the block under jt.no_grad(): its activations are not kept for a backward
    grad(dout)        rebuild the block's forward from the saved inputs, with gradients on, and
                      return d(sum(out * dout)) for every input and every trainable tensor inside
                      the block (LoRA matrices, which Jittor's module traversal does not see)

Random numbers (dropout) drawn during `execute` are recorded and handed back, in the same order,
to the recomputation, so the rebuilt forward is the forward that ran.

    unet.enable_gradient_checkpointing()    # every ResnetBlock2D and BasicTransformerBlock
    y = block(x, ...)                        # checkpointed while gradients are on
"""
from __future__ import annotations

import contextlib
import random
from typing import List, Optional

from .._runtime import jt

nn = jt.nn


class Checkpointable:
    """Mixin for an nn.Module whose forward may be checkpointed: set `gradient_checkpointing = True`."""

    gradient_checkpointing = False

    def __call__(self, *args, **kw):
        if self.gradient_checkpointing and not jt.flags.no_grad and not kw:
            return checkpoint(self.execute, trainable_vars(self), *args)
        return self.execute(*args, **kw)


def trainable_vars(module) -> List["jt.Var"]:
    """The Vars inside `module` that receive gradients: unfrozen parameters and adapter tensors."""
    out, seen = [], set()
    for m in module.modules():
        found = [p for p in m.parameters(recurse=False) if not p.is_stop_grad()] if hasattr(m, "parameters") else []
        for adapter in getattr(m, "_adapters", {}).values():
            found += [v for v in adapter.tensors.values() if not v.is_stop_grad()]
        for v in found:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def set_gradient_checkpointing(model, enabled: bool = True) -> int:
    """Switch checkpointing on (off) for every Checkpointable module of `model`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Checkpointable):
            m.gradient_checkpointing = bool(enabled)
            n += 1
    return n


# ------------------------------------------------------------------------------ random replay

class _RandomTape:
    """Records the Vars `jt.random` returns (dropout masks come from it) and replays them in order;
    Python's `random` (module dropout draws from it) restarts from the state the forward saw."""

    def __init__(self):
        self.values: List["jt.Var"] = []
        self.python_state = None

    @contextlib.contextmanager
    def recording(self):
        original = jt.random
        self.python_state = random.getstate()

        def record(*args, **kw):
            v = original(*args, **kw).stop_grad()
            self.values.append(v)
            return v

        jt.random = record
        try:
            yield
        finally:
            jt.random = original

    @contextlib.contextmanager
    def replaying(self):
        original, queue = jt.random, list(self.values)

        def replay(shape, dtype="float32", type="uniform"):
            if not queue:
                raise RuntimeError("gradient checkpointing: the recomputed forward drew more random numbers "
                                   "than the original one (is the block's forward deterministic?)")
            v = queue.pop(0)
            if tuple(v.shape) != tuple(shape):
                raise RuntimeError(f"gradient checkpointing: random draw of shape {tuple(shape)} replayed "
                                   f"from one of shape {tuple(v.shape)}")
            return v

        jt.random = replay
        outside = random.getstate()
        random.setstate(self.python_state)
        try:
            yield
        finally:
            jt.random = original
            random.setstate(outside)


# ------------------------------------------------------------------------------ the function

_REBUILDING = [0]
# Jittor syncs every Var it creates once this many ops are alive (var_holder.cc, add_hold_vars; not a flag).
JITTOR_LIVE_OP_LIMIT = 100_000


class LiveOpLimitError(RuntimeError):
    """A checkpointed backward would cross Jittor's live-op limit (see `_Checkpoint.grad`)."""


def rebuilding() -> bool:
    """True while a checkpointed block's forward is rebuilt inside the backward pass. Nothing may sync then:
    jt.grad is still building the backward graph, and a sync would run it half-built, materialising every
    gradient built so far (a convolution's generic 7-D gradient: a segfault at SD 2.1 / 512 px)."""
    return _REBUILDING[0] > 0


class _Checkpoint(jt.Function):
    """jt.Function over (inputs..., trainables...); `fn` closes over the trainables itself."""

    def __init__(self, fn, trainables: List["jt.Var"], n_inputs: int):
        self.fn = fn
        self.trainables = trainables       # the real Vars: gradients are taken with respect to them
        self.n_inputs = n_inputs
        self.tape = _RandomTape()
        self.saved: list = []

    def execute(self, *args):
        inputs = args[:self.n_inputs]
        # detached copies: the saved inputs do not hold the graph that produced them
        self.saved = [a.detach() if isinstance(a, jt.Var) else a for a in inputs]
        self.needs = [isinstance(a, jt.Var) and not a.is_stop_grad() and a.dtype.is_float() for a in inputs]
        before = jt.number_of_lived_ops()
        with jt.no_grad(), self.tape.recording():
            out = self.fn(*self.saved)
        self.block_ops = max(0, jt.number_of_lived_ops() - before)    # the block's graph, built lazily
        if not isinstance(out, jt.Var):
            raise TypeError("gradient checkpointing: the block must return one Var")
        self.out_dtype = out.dtype
        return out

    def grad(self, dout):
        # Rebuilding creates Vars while jt.grad is still building the backward graph. Past Jittor's live-op
        # limit each new Var is synced at once, which runs the half-built backward: a segfault (seen at SD 2.1,
        # 512 px, batch 2, with checkpointing). Stop with a clear error before that instead. The rebuild needs
        # about as many ops as the block's forward (counted in `execute`); twice that is the margin.
        live = jt.number_of_lived_ops()
        if live + 2 * self.block_ops + 1000 >= JITTOR_LIVE_OP_LIMIT:
            raise LiveOpLimitError(
                f"gradient checkpointing: the backward graph holds {live:,} ops and rebuilding a block adds about "
                f"{self.block_ops:,}; Jittor syncs every new tensor past {JITTOR_LIVE_OP_LIMIT:,} live ops, which "
                "breaks a backward pass under construction. Use a smaller batch (with gradient accumulation for "
                "the same effective batch), a smaller resolution, or turn gradient checkpointing off.")
        xs = []
        for a, need in zip(self.saved, self.needs):
            if need:
                a = a.detach()
                a.start_grad()
            xs.append(a)
        _REBUILDING[0] += 1
        try:
            with self.tape.replaying():
                out = self.fn(*xs)                                       # the forward, rebuilt
        finally:
            _REBUILDING[0] -= 1
        wrt = [x for x, need in zip(xs, self.needs) if need] + list(self.trainables)
        if dout is None or not wrt:
            return [None] * (self.n_inputs + len(self.trainables))
        grads = iter(jt.grad((out.float32() * dout.float32().detach()).sum(), wrt))
        result = [next(grads).cast(x.dtype) if need else None for x, need in zip(xs, self.needs)]
        result += [next(grads) for _ in self.trainables]
        self.saved, self.tape = [], _RandomTape()                         # free the inputs once used
        return result


def checkpoint(fn, trainables: Optional[List["jt.Var"]], *inputs):
    """fn(*inputs) computed so that only `inputs` are kept for the backward pass.

    trainables: every Var that `fn` uses and that needs a gradient besides `inputs` (see `trainable_vars`).
    Non-Var inputs (None, numbers) are passed through.
    """
    trainables = list(trainables or [])
    func = _Checkpoint(fn, trainables, len(inputs))
    return func(*inputs, *trainables)


__all__ = ["Checkpointable", "LiveOpLimitError", "checkpoint", "rebuilding", "set_gradient_checkpointing", "trainable_vars"]
