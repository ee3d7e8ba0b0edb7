"""Adapters on any jt.nn.Module tree: targeting, injection, weights in and out, fuse/unfuse.

Module names are the model's own (diffusers / transformers names), e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`.

Targets are module-name suffixes ("to_q" matches "...attn1.to_q", "to_out.0" matches
"...attn1.to_out.0"), regular expressions written "re:<pattern>" (matched against the
whole name), or preset names (`PRESETS`). Each target (a preset counts as one) must match
at least one Linear/Conv2d, otherwise `LoraError` names it.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._runtime import jt
from .layers import Adapter, AdapterConfig, LoraLayer, init_adapter_tensors
from .adapter_math import LoraError, strict_or_warn
from .state import ModuleLora

nn = jt.nn

_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
_MLP = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
PRESETS: Dict[str, List[str]] = {
    "attn": _ATTN,                                     # UNet attention projections
    "attn-mlp": _ATTN + _MLP,                          # + transformer in/out projections and feed-forward
    "full": _ATTN + _MLP + _CONV,                      # + resnet convs, time embedding projections, resamplers
    "text-attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "text": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

ADAPTABLE = (nn.Linear, nn.Conv2d, LoraLayer)
TargetSpec = Union[str, Sequence[str]]


# --------------------------------------------------------------------------- names and matching

def named_modules(model) -> Dict[str, "nn.Module"]:
    return {name: m for name, m in model.named_modules()}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _expand(targets: TargetSpec) -> List[Tuple[str, List[str]]]:
    """[(what the user wrote, [patterns])]: presets expand, other strings stay one pattern."""
    if isinstance(targets, str):
        targets = [targets]
    out = []
    for t in targets:
        out.append((t, list(PRESETS[t]) if t in PRESETS else [t]))
    return out


def find_target_modules(model, targets: TargetSpec, exclude: Optional[TargetSpec] = None) -> Dict[str, "nn.Module"]:
    """Names -> Linear/Conv2d modules selected by `targets`, minus `exclude`. Errors name empty targets."""
    modules = named_modules(model)
    found: Dict[str, nn.Module] = {}
    empty, wrong_type = [], []
    for written, patterns in _expand(targets):
        hits = 0
        for name, m in modules.items():
            if not name or not any(_matches(p, name) for p in patterns):
                continue
            if isinstance(m, ADAPTABLE):
                found[name] = m
                hits += 1
            elif not written.startswith("re:"):
                wrong_type.append(f"{written!r} matched {name!r}, a {type(m).__name__} (not Linear/Conv2d)")
        if hits == 0:
            empty.append(written)
    if wrong_type:
        raise LoraError("LoRA targets must be Linear or Conv2d layers: " + "; ".join(wrong_type[:5]) +
                        (" (did you mean 'to_out.0'?)" if any("'to_out'" in w for w in wrong_type) else ""))
    if empty:
        examples = [n for n, m in modules.items() if isinstance(m, ADAPTABLE)][:6]
        raise LoraError(f"LoRA target(s) {empty} match no Linear/Conv2d module of {type(model).__name__}; "
                        f"its layers are named like {examples}")
    if exclude:
        for _, patterns in _expand(exclude):
            for name in [n for n in found if any(_matches(p, n) for p in patterns)]:
                del found[name]
    return dict(sorted(found.items()))


def _pattern_value(patterns: Optional[Dict[str, float]], name: str):
    if not patterns:
        return None
    for p, v in patterns.items():
        if _matches(p, name):
            return v
    return None


def _replace_module(model, name: str, new, modules: Optional[Dict[str, "nn.Module"]] = None):
    """Put `new` at `name`. `modules`: a `named_modules` dict, to avoid walking the model again."""
    parent_name, _, child = name.rpartition(".")
    if not parent_name:
        parent = model
    else:
        parent = (modules if modules is not None else named_modules(model))[parent_name]
    if isinstance(parent, nn.Sequential):
        parent.layers[child] = new
    else:
        setattr(parent, child, new)


def _layer(model, name: str, module, modules: Optional[Dict[str, "nn.Module"]] = None) -> LoraLayer:
    """The LoraLayer at `name`, replacing the plain Linear/Conv2d there on first use."""
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module)
    _replace_module(model, name, layer, modules)
    return layer


def adapted_layers(model) -> Dict[str, LoraLayer]:
    """Module name -> LoraLayer for every adapted layer."""
    return {n: m for n, m in named_modules(model).items() if isinstance(m, LoraLayer)}


def list_adapters(model) -> List[str]:
    names = []
    for layer in adapted_layers(model).values():
        for n in layer.adapter_names:
            if n not in names:
                names.append(n)
    return names


def active_adapters(model) -> List[str]:
    names = []
    for layer in adapted_layers(model).values():
        for n in layer._active:
            if n not in names:
                names.append(n)
    return names


# --------------------------------------------------------------------------- creating adapters

def inject_adapter(model, adapter_name: str = "default", config: Optional[AdapterConfig] = None,
                   targets: TargetSpec = "attn", exclude: Optional[TargetSpec] = None,
                   rank_pattern: Optional[Dict[str, int]] = None,
                   alpha_pattern: Optional[Dict[str, float]] = None) -> List[str]:
    """Add a new, freshly initialised adapter named `adapter_name` on every targeted layer.

    rank_pattern / alpha_pattern: per-module overrides, {target pattern: value}, first match wins.
    Returns the adapted module names. The adapter is active with multiplier 1.
    """
    config = config or AdapterConfig()
    if adapter_name in list_adapters(model):
        raise LoraError(f"adapter {adapter_name!r} already exists on {type(model).__name__}")
    found = find_target_modules(model, targets, exclude)
    for patterns, what in ((rank_pattern, "rank_pattern"), (alpha_pattern, "alpha_pattern")):
        for p in (patterns or {}):
            if not any(_matches(p, n) for n in found):
                raise LoraError(f"{what} key {p!r} matches none of the targeted modules")
    rng = np.random.default_rng(config.seed)
    live = named_modules(model)
    for name, module in found.items():
        shape = tuple(module.weight.shape)
        layer_config = config.for_layer(shape, _pattern_value(rank_pattern, name),
                                        _pattern_value(alpha_pattern, name))
        weight = module.weight.float32().numpy() if layer_config.use_dora else None
        tensors = init_adapter_tensors(layer_config, shape, rng, weight)
        adapter = Adapter(layer_config.kind, {k: jt.array(v) for k, v in tensors.items()}, layer_config.alpha,
                          dropout=layer_config.dropout, input_dropout=layer_config.input_dropout,
                          rank_dropout=layer_config.rank_dropout, module_dropout=layer_config.module_dropout)
        _layer(model, name, module, live).add_adapter(adapter_name, adapter)
    return list(found)


# --------------------------------------------------------------------------- weights in and out

def resolve_module_name(modules: Dict[str, "nn.Module"], path: str) -> Optional[str]:
    """The live module name for `path`, allowing CLIP's optional `text_model.` root."""
    if path in modules:
        return path
    if path.startswith("text_model.") and path[len("text_model."):] in modules:
        return path[len("text_model."):]
    if "text_model." + path in modules:
        return "text_model." + path
    return None


def _fit_tensors(entry: ModuleLora, weight_shape: Tuple[int, ...]) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
    """Tensors reshaped to fit a base weight of `weight_shape`, or (None, reason)."""
    t = dict(entry.tensors)
    out, inp = weight_shape[0], weight_shape[1]
    kernel = tuple(weight_shape[2:])
    if entry.kind == "lora":
        down, up = t["down"], t["up"]
        r = down.shape[0]
        if up.shape[0] != out or up.shape[1] != r or int(np.prod(up.shape[2:] or (1,))) != 1:
            return None, f"up {tuple(up.shape)} does not fit weight {weight_shape} at rank {r}"
        t["up"] = up.reshape((out, r) + (1,) * len(kernel))
        if "mid" in t:
            if t["mid"].shape[2:] != kernel or down.shape[1] != inp:
                return None, f"down {tuple(down.shape)} / mid {tuple(t['mid'].shape)} do not fit weight {weight_shape}"
            t["down"] = down.reshape(r, inp, 1, 1)
        else:
            # Linear <-> 1x1 conv (SD1 uses conv proj_in/proj_out, SD2 linear): reshape freely.
            if down.shape[1] != inp or int(np.prod(down.shape[2:] or (1,))) != int(np.prod(kernel or (1,))):
                return None, f"down {tuple(down.shape)} does not fit weight {weight_shape}"
            if len(down.shape) > 2 and len(kernel) and tuple(down.shape[2:]) != kernel:
                return None, f"down kernel {tuple(down.shape[2:])} != layer kernel {kernel}"
            t["down"] = down.reshape((r, inp) + kernel)
    else:
        try:
            d = entry.delta()
        except Exception as e:  # shapes that cannot even multiply
            return None, f"{entry.kind} factors do not combine ({e})"
        if d.size != int(np.prod(weight_shape)) or d.shape[0] != out:
            return None, f"{entry.kind} update has shape {tuple(d.shape)}, weight is {weight_shape}"
    if "magnitude" in t:
        m = t["magnitude"]
        if m.ndim == 1 and m.shape[0] == out:
            pass
        elif m.ndim == len(weight_shape) and (tuple(m.shape) == (out,) + (1,) * (len(weight_shape) - 1) or
                                              tuple(m.shape) == (1, inp) + (1,) * len(kernel)):
            pass
        else:
            return None, f"DoRA magnitude {tuple(m.shape)} does not fit weight {weight_shape}"
    return t, ""


def check_adapter_weights(model, modules: Dict[str, ModuleLora], adapter_name: str = "default"):
    """(plan, problems): what `apply_adapter_plan` would add, and why other entries cannot be added.

    Changes nothing. A problem is "<path>: <reason>" (no such module, not Linear/Conv2d,
    shapes that do not fit, adapter name already used there).
    """
    live = named_modules(model)
    plan, problems = [], []
    for path, entry in modules.items():
        name = resolve_module_name(live, path)
        if name is None:
            problems.append(f"{path}: no such module in {type(model).__name__}")
            continue
        module = live[name]
        if not isinstance(module, ADAPTABLE):
            problems.append(f"{path}: is a {type(module).__name__}, not Linear/Conv2d")
            continue
        if isinstance(module, LoraLayer) and adapter_name in module.adapter_names:
            problems.append(f"{path}: already has an adapter named {adapter_name!r}")
            continue
        tensors, why = _fit_tensors(entry, tuple(module.weight.shape))
        if tensors is None:
            problems.append(f"{path}: {why}")
            continue
        plan.append((name, entry, tensors))
    return plan, problems


def apply_adapter_plan(model, plan, adapter_name: str, multiplier: float = 1.0) -> List[str]:
    """Add the adapters of a plan from `check_adapter_weights` (active, with `multiplier`)."""
    live = named_modules(model)
    for name, entry, tensors in plan:
        adapter = Adapter(entry.kind, {k: jt.array(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()},
                          entry.alpha)
        _layer(model, name, live[name], live).add_adapter(adapter_name, adapter, multiplier)
    return [p[0] for p in plan]


def load_adapter_weights(model, modules: Dict[str, ModuleLora], adapter_name: str = "default",
                         strict: bool = True, multiplier: float = 1.0, source: str = "LoRA") -> List[str]:
    """Add adapter `adapter_name` with the given weights (module path -> ModuleLora).

    Every entry is checked before anything is changed. strict=True: any problem raises
    `LoraError` naming the modules; strict=False: a warning lists exactly what was skipped.
    Returns the names of the adapted modules.
    """
    plan, problems = check_adapter_weights(model, modules, adapter_name)
    if problems:
        msg = (f"{source}: {len(problems)} of {len(modules)} module(s) cannot be loaded into "
               f"{type(model).__name__}: " + "; ".join(problems))
        strict_or_warn(msg, strict)
    return apply_adapter_plan(model, plan, adapter_name, multiplier)


def get_adapter_weights(model, adapter_name: str) -> Dict[str, ModuleLora]:
    """Module name -> ModuleLora (numpy copies) of one adapter."""
    out = {}
    for name, layer in adapted_layers(model).items():
        if adapter_name in layer._adapters:
            a = layer._adapters[adapter_name]
            out[name] = ModuleLora(a.kind, a.numpy_tensors(), a.alpha)
    if not out:
        raise LoraError(f"no adapter named {adapter_name!r} in {type(model).__name__}; "
                        f"it has {list_adapters(model)}")
    return out


def named_lora_parameters(model, adapter_name: Optional[str] = None) -> List[Tuple[str, "jt.Var"]]:
    """[("<module>.<adapter>.<tensor>", Var)], tensor in down/up/magnitude/w1_a/... (for the optimizer)."""
    out = []
    for name, layer in adapted_layers(model).items():
        for a_name, adapter in layer._adapters.items():
            if adapter_name is not None and a_name != adapter_name:
                continue
            for t_name, var in adapter.tensors.items():
                out.append((f"{name}.{a_name}.{t_name}", var))
    return out


def lora_parameters(model, adapter_name: Optional[str] = None) -> List["jt.Var"]:
    """The trainable adapter Vars (not in `model.parameters()` / `state_dict()`)."""
    return [v for _, v in named_lora_parameters(model, adapter_name)]


# --------------------------------------------------------------------------- using adapters

def _check_names(model, names: Iterable[str]):
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoraError(f"unknown adapter(s) {unknown}; loaded: {known}")


def set_adapters(model, adapter_names: Union[str, Sequence[str]],
                 weights: Union[None, float, Sequence[float]] = None, check: bool = True) -> None:
    """Make exactly these adapters active, each with its multiplier (default 1.0).

    check=False allows names this model does not have (a pipeline sets all its models at once).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    if check:
        _check_names(model, names)
    wanted = dict(zip(names, (float(w) for w in weights)))
    for layer in adapted_layers(model).values():
        layer.set_active(wanted)


def enable_adapters(model, enabled: bool = True) -> None:
    for layer in adapted_layers(model).values():
        layer._enabled = enabled


def fuse(model, scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None, check: bool = True) -> None:
    """Fold the active (or named) adapters, times `scale`, into the base weights."""
    if adapter_names is not None and check:
        _check_names(model, adapter_names)
    for layer in adapted_layers(model).values():
        layer.fuse(None if adapter_names is None else list(adapter_names), scale)


def unfuse(model) -> None:
    """Restore the exact base weights saved by `fuse`."""
    for layer in adapted_layers(model).values():
        layer.unfuse()


def delete_adapter(model, adapter_name: str) -> None:
    """Remove one adapter; layers left without adapters get their original layer back."""
    _check_names(model, [adapter_name])
    live = named_modules(model)
    for name, layer in adapted_layers(model).items():
        if adapter_name in layer._adapters:
            layer.delete_adapter(adapter_name)
            if not layer._adapters:
                _replace_module(model, name, layer.base_layer, live)


def unload(model) -> None:
    """Remove all adapters and put the original layers back.

    Fused weights stay fused (as in diffusers: `fuse_lora()` then `unload_lora_weights()`
    bakes the LoRA in); unfused adapters simply disappear.
    """
    live = named_modules(model)
    for name, layer in adapted_layers(model).items():
        _replace_module(model, name, layer.base_layer, live)
