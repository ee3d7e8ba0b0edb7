"""LoRA file formats: detection and reading into a `LoraState` (writing from one: `writing.py`).

Read (auto-detected):
- diffusers / PEFT: `unet.<path>.lora_A.weight` (down), `.lora_B.weight` (up),
  `.lora_magnitude_vector` (DoRA), text keys `text_encoder.<path>...`; alphas come from the
  `lora_adapter_metadata` JSON in the safetensors header (what diffusers >= 0.35 writes:
  PEFT LoraConfig fields per component, `unet.lora_alpha`, `unet.alpha_pattern`, ...);
  without it alpha = rank. PEFT's LoHa/LoKr names (`.hada_w1_a`, `.lokr_w1`) too.
- diffusers legacy: `.lora.down.weight` / `.lora.up.weight`, `.processor.to_q_lora.down.weight`,
  `to_out_lora` (-> `to_out.0`), text `.lora_linear_layer.down.weight`, text `to_q_lora` (-> q_proj).
- JDiffusion saves: the above in a torch pickle, with `base_model.model.` after the component.
- kohya / A1111 / ComfyUI: `lora_unet_<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
  `lora_te_` / `lora_te1_` / `lora_te2_`; LyCORIS suffixes `hada_w1_a` ... (LoHa),
  `lokr_w1`, `lokr_w1_a/_b`, `lokr_w2`, `lokr_w2_a/_b`, `lokr_t2` (LoKr), `lora_mid` (LoCon
  Tucker), `dora_scale` (DoRA). kohya names become module paths through a table built from
  the module names (`path.replace(".", "_") -> path`), never by replacing "_" with ".".

Write: "diffusers" (PEFT names + `lora_adapter_metadata`) or "kohya" (kohya/LyCORIS names,
`.alpha`, `ss_*` metadata), as safetensors in fp32/fp16/bf16.

Anything that cannot be mapped is an error naming the keys, or with strict=False a warning
listing exactly what was skipped.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..weights import WeightsError, read_safetensors, read_torch_pickle
from .adapter_math import LoraError, strict_or_warn
from .state import LoraState, ModuleLora

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te_", "text_encoder"))
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"   # diffusers' header key for PEFT LoraConfig fields

# kohya/LyCORIS key suffix -> (kind, tensor role); kind None: fits any kind
_KOHYA_SUFFIXES = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1_a"), "hada_w1_b": ("loha", "w1_b"), "hada_w2_a": ("loha", "w2_a"),
    "hada_w2_b": ("loha", "w2_b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1_a"), "lokr_w1_b": ("lokr", "w1_b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2_a"), "lokr_w2_b": ("lokr", "w2_b"),
    "lokr_t2": ("lokr", "t2"),
    "dora_scale": (None, "magnitude"), "alpha": (None, "alpha"),
}
LYCORIS_ROLE_TO_SUFFIX = {(k, r): s for s, (k, r) in _KOHYA_SUFFIXES.items() if k in ("loha", "lokr")}

# diffusers-side key patterns: (regex on the key after the component prefix, kind, role, family)
_ADAPTER = r"(?:\.[A-Za-z0-9_\-]+)?"   # PEFT's optional adapter name (".default")
_DIFFUSERS_PATTERNS = [
    (re.compile(rf"^(?P<m>.+)\.lora_A{_ADAPTER}\.weight$"), "lora", "down", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_B{_ADAPTER}\.weight$"), "lora", "up", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$"), None, "magnitude", "peft"),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<r>down|up)\.weight$"), "lora", None, "legacy"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.(?P<r>down|up)\.weight$"), "lora", None, "legacy"),
    (re.compile(r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)"
                r"_lora\.(?P<r>down|up)\.weight$"), "lora", None, "legacy"),
    (re.compile(r"^(?P<m>.+)\.(?P<r>lora_down|lora_up|lora_mid)\.weight$"), "lora", None, "kohya-suffix"),
    (re.compile(r"^(?P<m>.+)\.(?P<s>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|dora_scale)"
                rf"{_ADAPTER}$"), None, None, "lycoris"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), None, "alpha", "alpha"),
]
_LEGACY_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                     "add_q_proj": "add_q_proj", "add_k_proj": "add_k_proj", "add_v_proj": "add_v_proj"}
_LEGACY_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding")


# --------------------------------------------------------------------------- reading files

def find_lora_file(path: str, weight_name: Optional[str] = None) -> str:
    """A LoRA file path, or the LoRA file inside a folder (diffusers' names first)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LoRA file or folder not found: {path}")
    if weight_name:
        p = os.path.join(path, weight_name)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{path} has no {weight_name}")
        return p
    for name in LORA_WEIGHT_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    candidates = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if len(candidates) == 1:
        return os.path.join(path, candidates[0])
    raise FileNotFoundError(f"{path}: expected {LORA_WEIGHT_NAMES[0]} or exactly one .safetensors/.bin file, "
                            f"found {candidates}; pass weight_name")


def read_lora_file(path: str, weight_name: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, safetensors header metadata) of a LoRA file; torch pickles have no metadata."""
    path = find_lora_file(path, weight_name)
    if path.endswith(".safetensors"):
        tensors, _, metadata = read_safetensors(path)
        return tensors, metadata
    try:
        return read_torch_pickle(path), {}
    except WeightsError:
        # A safetensors file with another extension?
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            tensors, _, metadata = read_safetensors(path)
            return tensors, metadata
        raise


# --------------------------------------------------------------------------- name tables

def kohya_name(path: str) -> str:
    return path.replace(".", "_")


def kohya_name_table(module_names: Iterable[str], component: str = "unet") -> Dict[str, Optional[str]]:
    """kohya name (without the lora_unet_/lora_te_ prefix) -> module path, from real module names.

    Text encoders are written by real tools with and without the `text_model_` level
    (`lora_te_text_model_encoder_layers_0_...` by kohya and older tools, `lora_te_encoder_layers_0_...`
    by lycoris-lora under transformers 5, which flattened CLIPTextModel): both spellings map to the
    live model's own path, whichever root it has.
    Two paths with the same kohya name map to None (ambiguous) and are refused when used.
    """
    table: Dict[str, Optional[str]] = {}

    def add(key, path):
        if key in table and table[key] != path:
            table[key] = None
        else:
            table[key] = path

    for path in module_names:
        if not path:
            continue
        add(kohya_name(path), path)
        if component.startswith("text_encoder"):
            if path.startswith("text_model."):
                add(kohya_name(path[len("text_model."):]), path)
            else:
                add(kohya_name("text_model." + path), path)
    return table


def standard_module_names(component: str) -> List[str]:
    """Linear/Conv2d names of the Stable Diffusion 1.x/2.x/XL UNet or CLIP text encoders.

    Used to map kohya names when no live model is at hand (`lora inspect`, `lora convert`).
    A superset: every block index any SD variant uses.
    """
    names: List[str] = []
    if component == "unet":
        names += ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                  "add_embedding.linear_1", "add_embedding.linear_2"]
        blocks = [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)] + ["mid_block"]
        for block in blocks:
            for j in range(4):
                names += [f"{block}.resnets.{j}.{n}" for n in ("conv1", "conv2", "time_emb_proj", "conv_shortcut")]
                att = f"{block}.attentions.{j}"
                names += [f"{att}.proj_in", f"{att}.proj_out"]
                for k in range(10):
                    tb = f"{att}.transformer_blocks.{k}"
                    for a in ("attn1", "attn2"):
                        names += [f"{tb}.{a}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
                    names += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
            names += [f"{block}.downsamplers.0.conv", f"{block}.upsamplers.0.conv"]
    else:
        for i in range(48):
            layer = f"text_model.encoder.layers.{i}"
            names += [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            names += [f"{layer}.mlp.fc1", f"{layer}.mlp.fc2"]
        names.append("text_projection")
    return names


def standard_name_tables() -> Dict[str, Dict[str, Optional[str]]]:
    return {c: kohya_name_table(standard_module_names(c), c) for c in COMPONENTS}


def canonical_text_path(path: str) -> str:
    """Text-encoder module paths as stored in files: rooted at `text_model.` (CLIPTextModel)."""
    if path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


# --------------------------------------------------------------------------- detection and parsing

def _is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(p for p, _ in KOHYA_PREFIXES))


def detect_format(keys: Iterable[str]) -> str:
    """"kohya", "lycoris", "diffusers", "diffusers-legacy", "jdiffusion", "mixed" or "unknown"."""
    keys = list(keys)
    kohya = [k for k in keys if _is_kohya_key(k)]
    other = [k for k in keys if not _is_kohya_key(k)]
    if kohya and other:
        return "mixed"
    if kohya:
        lyco = any(k.split(".", 1)[-1] in ("hada_w1_a", "lokr_w1", "lokr_w1_a", "lora_mid.weight", "dora_scale")
                   for k in kohya)
        return "lycoris" if lyco else "kohya"
    if not other:
        return "unknown"
    if any(".base_model.model." in k or k.startswith("base_model.model.") for k in other):
        return "jdiffusion"
    if any(".lora_A." in k or ".lora_B." in k or ".lokr_" in k or ".hada_" in k or "lora_magnitude_vector" in k
           for k in other):
        legacy = any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in other)
        return "diffusers-legacy" if legacy else "diffusers"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in other):
        return "diffusers-legacy"
    return "unknown"


def _split_component(key: str) -> Tuple[Optional[str], str]:
    """(component, rest) of a diffusers-style key; strips PEFT's `base_model.model.` wrapper."""
    first, _, rest = key.partition(".")
    if first in COMPONENTS:
        component = first
    else:
        component, rest = None, key
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model."):]
    if component is None:
        if rest.startswith(_UNET_ROOTS):
            component = "unet"
        elif rest.startswith("text_model."):
            component = "text_encoder"
    return component, rest


class _Collector:
    """Gathers (module key, role) -> tensor, noticing duplicates and kind conflicts."""

    def __init__(self):
        self.tensors: Dict[str, Dict[str, np.ndarray]] = collections.OrderedDict()
        self.kinds: Dict[str, set] = collections.defaultdict(set)
        self.alphas: Dict[str, float] = {}
        self.sources: Dict[Tuple[str, str], str] = {}
        self.problems: List[str] = []

    def add(self, module: str, kind: Optional[str], role: str, value: np.ndarray, key: str):
        if (module, role) in self.sources:
            self.problems.append(f"{key}: same tensor as {self.sources[(module, role)]}")
            return
        self.sources[(module, role)] = key
        if role == "alpha":
            self.alphas[module] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
            return
        if kind:
            self.kinds[module].add(kind)
        self.tensors.setdefault(module, {})[role] = value

    def build(self) -> Tuple[Dict[str, ModuleLora], List[str]]:
        modules, problems = {}, list(self.problems)
        for module, tensors in self.tensors.items():
            kinds = self.kinds.get(module) or {"lora"}
            keys = [self.sources[(module, r)] for r in tensors]
            if len(kinds) > 1:
                problems.append(f"{module}: mixes adapter kinds {sorted(kinds)} in keys {keys}")
                continue
            try:
                modules[module] = ModuleLora(kinds.pop(), tensors, self.alphas.get(module))
            except LoraError as e:
                problems.append(f"{module}: {e} (keys {keys})")
        for module in self.alphas:
            if module not in self.tensors:
                problems.append(f"{self.sources[(module, 'alpha')]}: alpha without adapter weights")
        return modules, problems


def _parse_kohya(tensors, tables, col: _Collector, leftover: List[str]):
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        prefix, component = next((p, c) for p, c in KOHYA_PREFIXES if name.startswith(p))
        if suffix not in _KOHYA_SUFFIXES:
            leftover.append(f"{key} (unknown suffix {suffix!r})")
            continue
        table = tables.get(component) or {}
        path = table.get(name[len(prefix):], "") if table else ""
        if path is None:
            leftover.append(f"{key} (ambiguous kohya name)")
            continue
        if not path:
            leftover.append(f"{key} (no module {name[len(prefix):]!r} in {component})")
            continue
        if component.startswith("text_encoder"):
            path = canonical_text_path(path)
        kind, role = _KOHYA_SUFFIXES[suffix]
        col.add(f"{component}.{path}", kind, role, value, key)


def _parse_diffusers(tensors, col: _Collector, leftover: List[str]):
    for key, value in tensors.items():
        component, rest = _split_component(key)
        if component is None:
            leftover.append(f"{key} (no unet./text_encoder. prefix and not a UNet/CLIP name)")
            continue
        for pattern, kind, role, family in _DIFFUSERS_PATTERNS:
            m = pattern.match(rest)
            if not m:
                continue
            path = m.group("m")
            groups = m.groupdict()
            if groups.get("p"):
                table = _LEGACY_TEXT_PROJ if component.startswith("text_encoder") else _LEGACY_UNET_PROJ
                if groups["p"] not in table:
                    continue
                path = f"{path}.{table[groups['p']]}"
            if family == "legacy":
                role = groups["r"]
            elif family == "kohya-suffix":
                kind, role = _KOHYA_SUFFIXES[groups["r"] + ".weight"]
            elif family == "lycoris":
                kind, role = _KOHYA_SUFFIXES[groups["s"]]
            if component.startswith("text_encoder"):
                path = canonical_text_path(path)
            if role == "magnitude" and family == "peft":
                value = value.reshape(-1)   # PEFT: (out,) for Linear, (1, out, 1, 1) for Conv2d
            col.add(f"{component}.{path}", kind, role, value, key)
            break
        else:
            if re.search(r"\.lora_B(\.[^.]+)?\.bias$", rest):
                leftover.append(f"{key} (LoRA bias is not supported)")
            else:
                leftover.append(f"{key} (not a LoRA tensor name)")


def _pattern_lookup(patterns: Dict[str, float], path: str):
    """PEFT's rank/alpha pattern rule: the key matches the end of the module path."""
    for candidate in (path, path[len("text_model."):] if path.startswith("text_model.") else None):
        if candidate is None:
            continue
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key.lstrip('^')})$", candidate):
                return value
    return None


def _apply_diffusers_metadata(modules: Dict[str, ModuleLora], metadata: Dict[str, str]):
    """Set alphas from diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields per component)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"unreadable {METADATA_KEY} in the file header ({e})") from None
    for component in COMPONENTS:
        cfg = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
        if not cfg:
            continue
        base_r = cfg.get("r", 8)
        base_alpha = cfg.get("lora_alpha", cfg.get("alpha", base_r))
        for key, entry in modules.items():
            if not key.startswith(component + ".") or entry.alpha is not None or entry.rank is None:
                continue
            path = key[len(component) + 1:]
            r = _pattern_lookup(cfg.get("rank_pattern") or {}, path) or base_r
            alpha = _pattern_lookup(cfg.get("alpha_pattern") or {}, path) or base_alpha
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            if abs(scale - 1.0) > 1e-12:
                entry.alpha = scale * entry.rank


BUNDLE_PREFIX = "bundle_emb."


def split_bundle_embeddings(tensors: Dict[str, np.ndarray], source: str = "LoRA file"):
    """(LoRA tensors, {token: (N, D)}) from a LoRA file's keys: `bundle_emb.<token>.<anything>` is a Textual
    Inversion embedding bundled with the LoRA (A1111 reads `bundle_emb.<token>.string_to_param.*`)."""
    rest, embeddings = {}, {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = value
            continue
        parts = key.split(".")
        if len(parts) < 3 or not parts[1]:
            raise LoraError(f"{source}: malformed bundled embedding key {key!r}")
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.ndim not in (1, 2) or value.size == 0:
            raise LoraError(f"{source}: bundled embedding {key} must be a (D,) or (N, D) float array")
        if parts[1] in embeddings:
            raise LoraError(f"{source}: embedding {parts[1]!r} is bundled twice")
        embeddings[parts[1]] = value.astype(np.float32).reshape(-1, value.shape[-1])
    return rest, embeddings


def bundle_embedding_tensors(embeddings: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """{token: (N, D)} -> `bundle_emb.<token>.string_to_param.*` tensors (the keys A1111 reads)."""
    out = {}
    for token, vec in embeddings.items():
        if not token or "." in token:
            raise LoraError(f"cannot bundle embedding {token!r}: a bundled token may not contain '.'")
        vec = np.asarray(vec, dtype=np.float32)
        out[f"{BUNDLE_PREFIX}{token}.string_to_param.*"] = vec.reshape(-1, vec.shape[-1])
    return out


def parse_lora_state_dict(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None,
                          name_tables: Optional[Dict[str, Dict[str, Optional[str]]]] = None,
                          strict: bool = True, source: str = "LoRA state dict") -> LoraState:
    """Turn the tensors of any supported format into a `LoraState`.

    name_tables: component -> kohya name table (see `kohya_name_table`); default: the
    standard Stable Diffusion names. Keys that cannot be mapped raise `LoraError` listing
    them; with strict=False they are skipped with a warning that lists them.
    """
    metadata = dict(metadata or {})
    tensors = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    if not tensors:
        raise LoraError(f"{source}: no tensors")
    tensors, embeddings = split_bundle_embeddings(tensors, source)
    if not tensors and embeddings:
        return LoraState({}, metadata, "embeddings", embeddings)
    fmt = detect_format(tensors)
    if fmt == "mixed":
        kohya = [k for k in tensors if _is_kohya_key(k)][:3]
        other = [k for k in tensors if not _is_kohya_key(k)][:3]
        raise LoraError(f"{source}: mixes kohya keys (e.g. {kohya}) with diffusers keys (e.g. {other}); "
                        "one file must use one format")
    if fmt == "unknown":
        raise LoraError(f"{source}: not a LoRA file: no key has a LoRA name (first keys: {sorted(tensors)[:5]})")
    col, leftover = _Collector(), []
    if fmt in ("kohya", "lycoris"):
        _parse_kohya(tensors, name_tables or standard_name_tables(), col, leftover)
    else:
        _parse_diffusers(tensors, col, leftover)
    modules, problems = col.build()
    if fmt in ("kohya", "lycoris"):
        for entry in modules.values():   # kohya: alpha 0 means "alpha = rank"
            if entry.alpha == 0:
                entry.alpha = None
    else:
        _apply_diffusers_metadata(modules, metadata)
    bad = leftover + problems
    if bad:
        msg = f"{source} ({fmt} format): {len(bad)} key(s)/module(s) could not be used: " + "; ".join(bad)
        strict_or_warn(msg, strict)
    if not modules:
        raise LoraError(f"{source}: no usable LoRA modules (format {fmt})")
    return LoraState(modules, metadata, fmt, embeddings)


def load_lora_state(path_or_tensors, name_tables=None, strict: bool = True,
                    weight_name: Optional[str] = None) -> LoraState:
    """Read a LoRA file / folder / dict of arrays into a `LoraState`."""
    if isinstance(path_or_tensors, LoraState):
        return path_or_tensors
    if isinstance(path_or_tensors, dict):
        tensors = {k: _to_numpy(v) for k, v in path_or_tensors.items()}
        return parse_lora_state_dict(tensors, {}, name_tables, strict)
    path = find_lora_file(str(path_or_tensors), weight_name)
    tensors, metadata = read_lora_file(path)
    return parse_lora_state_dict(tensors, metadata, name_tables, strict, source=path)


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):   # a torch tensor handed over by a caller
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    if hasattr(v, "numpy"):
        return v.numpy()
    return np.asarray(v)
