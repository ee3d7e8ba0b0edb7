"""The trainer's view of the LoRA adapters (`jdiffusion_lora.lora`): create, list, read, write.

The adapter is named `ADAPTER`. Its trainable tensors are `LoraPair`s (down A (r, in), up B (out, r))
keyed "<component>.<module path>", the same keys as a `LoraState`.

LoRA-GA (Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"):
G = mean gradient of the loss wrt the base weight W (out, in) over a few batches, SVD G = U S V^T;
B0 = U[:, :r] and A0 = V^T[r:2r] (the seed: first r singular vectors for one matrix, r+1..2r for the
other), both times out**0.25 / sqrt(gamma). Since B0 A0 != 0 the base weight is offset,
W' = W - s B0 A0, so the model starts where it was. The update relative to the original model is
s (B A - B0 A0) = s [B | B0] [A ; -A0]: a LoRA of rank 2r, which is what we save, so the file
applies to the unmodified base model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._runtime import jt
from ..lora.inject import adapted_layers, find_target_modules, get_adapter_weights, inject_adapter
from ..lora.layers import AdapterConfig
from ..lora.state import LoraState, ModuleLora


@dataclass
class LoraPair:
    """One adapted layer as the trainer sees it."""
    name: str          # module path with its component, e.g. "unet.down_blocks.0...attn1.to_q"
    component: str     # unet | text_encoder
    down: "jt.Var"     # A, (r, in) for a Linear
    up: "jt.Var"       # B, (out, r)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(np.prod(self.down.shape[1:]))

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])


ADAPTER = "style"
COMPONENTS = ("unet", "text_encoder")


def total_rank(c, n_styles: int) -> int:
    """The LoRA rank: `rank` per style times the number of styles in the pack (unless pack_rank is off)."""
    return c.rank * (n_styles if c.pack_rank else 1)


def lora_alpha(c, n_styles: int) -> float:
    return float(c.lora_alpha) if c.lora_alpha > 0 else float(total_rank(c, n_styles))


def attach(models: Dict[str, object], c, n_styles: int, seed: int) -> List[LoraPair]:
    """Inject a fresh adapter into each model with targets; returns the pairs (unet first)."""
    rank = total_rank(c, n_styles)
    init = "gaussian" if c.lora_init == "lora_ga" else c.lora_init
    pairs = []
    for k, component in enumerate(COMPONENTS):
        targets = c.unet_targets if component == "unet" else c.text_encoder_targets
        if not targets:
            continue
        config = AdapterConfig(rank=rank, alpha=lora_alpha(c, n_styles), kind="lora", init=init,
                               input_dropout=c.lora_dropout, seed=int(seed) + k)
        inject_adapter(models[component], ADAPTER, config, targets=list(targets))
        pairs += pairs_of(models[component], component)
    return pairs


def freeze_base(models: Sequence[object]) -> int:
    """stop_grad on every module parameter of `models` (the base weights; adapter tensors are not module
    parameters). Jittor keeps every computed Var that lies on a path from a Var that may need a gradient
    to a held Var, so unfrozen base weights would keep activations alive that no gradient needs, and
    gradient checkpointing would differentiate them. Returns how many were frozen.

    Jittor's `Module.eval()` records each parameter's grad state the first time it runs and `train()` restores
    it, so a model that was ever in eval mode before this call would get its base weights back as trainable
    at the next `train()`. The record is updated too: frozen stays frozen through eval/train."""
    n = 0
    for model in models:
        for p in model.parameters():
            if not p.is_stop_grad():
                p.stop_grad()
                n += 1
        for module in model.modules():
            record = getattr(module, "backup_grad_state", None)
            if record is not None:
                for p in module.parameters():
                    record[id(p)] = False
    return n


def pairs_of(model, component: str) -> List[LoraPair]:
    out = []
    for name, layer in adapted_layers(model).items():
        adapter = layer._adapters.get(ADAPTER)
        if adapter is None:
            continue
        out.append(LoraPair(name=f"{component}.{name}", component=component,
                            down=adapter.tensors["down"], up=adapter.tensors["up"]))
    return out


def count_target_params(models: Dict[str, object], c, n_styles: int) -> Dict[str, Tuple[int, int]]:
    """{component: (number of adapted layers, adapter parameters)} without creating adapters."""
    rank = total_rank(c, n_styles)
    out = {}
    for component in COMPONENTS:
        targets = c.unet_targets if component == "unet" else c.text_encoder_targets
        if not targets:
            continue
        found = find_target_modules(models[component], list(targets))
        n = 0
        for m in found.values():
            shape = tuple(m.weight.shape)
            n += rank * (int(np.prod(shape[1:])) + shape[0])
        out[component] = (len(found), n)
    return out


def adapter_arrays(pairs: Sequence[LoraPair]) -> Dict[str, np.ndarray]:
    """Trainable tensors as numpy, keyed "<pair>.down" / "<pair>.up" (the training-state file)."""
    arrays = {}
    for p in pairs:
        arrays[p.name + ".down"] = p.down.numpy()
        arrays[p.name + ".up"] = p.up.numpy()
    return arrays


def load_adapter_arrays(pairs: Sequence[LoraPair], arrays: Dict[str, np.ndarray]) -> None:
    expected = {p.name + s for p in pairs for s in (".down", ".up")}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ValueError(f"checkpoint adapter does not match this run's LoRA layers (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); were the targets, rank or pack changed?")
    for p in pairs:
        for var, key in ((p.down, p.name + ".down"), (p.up, p.name + ".up")):
            arr = arrays[key]
            if tuple(arr.shape) != tuple(var.shape):
                raise ValueError(f"checkpoint tensor {key} has shape {arr.shape}, this run's is {tuple(var.shape)}")
            var.update(jt.array(arr.astype(np.float32)))
    jt.sync_all()


def lora_state(pairs: Sequence[LoraPair], alpha: float, arrays: Optional[Dict[str, np.ndarray]] = None,
               ga_offsets: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
               metadata: Optional[Dict[str, str]] = None) -> LoraState:
    """A `LoraState` of the current (or given: `arrays`, e.g. EMA) tensors, ready for any file format.

    ga_offsets: LoRA-GA's (B0, A0) per pair: saved as the rank-2r LoRA [B | B0] [A ; -A0].
    """
    modules = {}
    for p in pairs:
        down = arrays[p.name + ".down"] if arrays is not None else p.down.numpy()
        up = arrays[p.name + ".up"] if arrays is not None else p.up.numpy()
        a = alpha
        if ga_offsets and p.name in ga_offsets:
            b0, a0 = ga_offsets[p.name]
            r = down.shape[0]
            up = np.concatenate([up, b0], axis=1)
            down = np.concatenate([down, -a0], axis=0)
            a = alpha * 2  # keep the scale alpha / rank with the doubled rank
            assert up.shape[1] == 2 * r
        modules[p.name] = ModuleLora("lora", {"down": down.astype(np.float32), "up": up.astype(np.float32)}, a)
    return LoraState(modules=modules, metadata=dict(metadata or {}), source_format="jdiffusion-train")


def trained_layers(models: Dict[str, object]) -> Dict[str, object]:
    """"<component>.<module path>" -> LoraLayer holding our adapter."""
    out = {}
    for component in COMPONENTS:
        if component in models:
            for name, layer in adapted_layers(models[component]).items():
                if ADAPTER in layer._adapters:
                    out[f"{component}.{name}"] = layer
    return out


def module_weights(models: Dict[str, object]) -> Dict[str, ModuleLora]:
    out = {}
    for component in COMPONENTS:
        if component in models:
            try:
                for k, v in get_adapter_weights(models[component], ADAPTER).items():
                    out[f"{component}.{k}"] = v
            except Exception:
                continue
    return out


# ---------------------------------------------------------------------------- LoRA-GA

def mean_base_gradients(pairs: Sequence[LoraPair], layers: Dict[str, object], losses) -> Dict[str, np.ndarray]:
    """{pair name: mean gradient of the losses wrt its layer's base weight}; `losses` yields loss Vars."""
    names = [p.name for p in pairs]
    weights = [layers[n].weight for n in names]
    sums, n = None, 0
    for loss in losses:
        arrays = [g.numpy().astype(np.float64) for g in jt.grad(loss, weights)]
        sums = arrays if sums is None else [s + a for s, a in zip(sums, arrays)]
        n += 1
    return {name: s / n for name, s in zip(names, sums)}


def lora_ga_init(pairs: Sequence[LoraPair], layers: Dict[str, object], grads: Dict[str, np.ndarray],
                 alpha: float, gamma: float) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Set A, B from the SVD of each base weight's gradient and offset the base weights.

    grads: "<pair name>" -> mean gradient wrt the base weight (out, in). Returns {pair: (B0, A0)}.
    """
    offsets = {}
    for p in pairs:
        g = grads[p.name].astype(np.float64).reshape(p.out_features, -1)     # (out, in)
        r = p.rank
        u, _, vt = np.linalg.svd(g, full_matrices=False)                     # u (out, k), vt (k, in)
        k = u.shape[1]
        if 2 * r > k:
            raise ValueError(f"LoRA-GA needs 2 * rank ({2 * r}) <= min(out, in) ({k}) for {p.name}; "
                             "lower the rank or use lora_init='gaussian'")
        factor = p.out_features ** 0.25 / np.sqrt(gamma)
        b0 = (u[:, :r] * factor).astype(np.float32)                           # (out, r)
        a0 = (vt[r:2 * r] * factor).astype(np.float32).reshape(tuple(p.down.shape))  # (r, in)
        p.up.update(jt.array(b0.reshape(tuple(p.up.shape))))
        p.down.update(jt.array(a0))
        layer = layers[p.name]
        scale = alpha / r
        w = layer.weight
        offset = (scale * (b0.reshape(p.out_features, r) @ a0.reshape(r, -1))).reshape(tuple(w.shape))
        w.update((w.float32() - jt.array(offset.astype(np.float32))).cast(w.dtype))
        offsets[p.name] = (b0.reshape(tuple(p.up.shape)), a0)
    jt.sync_all()
    return offsets


def reapply_ga_offsets(pairs: Sequence[LoraPair], layers: Dict[str, object],
                       offsets: Dict[str, Tuple[np.ndarray, np.ndarray]], alpha: float) -> None:
    """On resume: offset the freshly loaded base weights again by s B0 A0."""
    for p in pairs:
        if p.name not in offsets:
            continue
        b0, a0 = offsets[p.name]
        w = layers[p.name].weight
        offset = (alpha / p.rank) * (b0.reshape(p.out_features, -1) @ a0.reshape(p.rank, -1))
        w.update((w.float32() - jt.array(offset.reshape(tuple(w.shape)).astype(np.float32))).cast(w.dtype))
    jt.sync_all()
