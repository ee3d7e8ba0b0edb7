"""The one in-memory form of a LoRA file: adapter tensors per module, independent of file format.

Every reader in `formats.py` produces a `LoraState` and every writer consumes one, so a
conversion is always "read into LoraState, write from LoraState".

Module keys are "<component>.<diffusers module path>", for example
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. The tensors of each kind and the
update they make are in `adapter_math.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import numpy as np

from .adapter_math import KIND_TENSORS, KINDS, AdapterTensors, LoraError, delta_weight, weight_norm


@dataclasses.dataclass
class ModuleLora(AdapterTensors):
    """The adapter of one module: its kind, tensors (numpy) and alpha."""

    kind: str
    tensors: Dict[str, np.ndarray]
    alpha: Optional[float] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LoraError(f"unknown adapter kind {self.kind!r}; expected one of {KINDS}")
        extra = set(self.tensors) - KIND_TENSORS[self.kind] - {"magnitude"}
        if extra:
            raise LoraError(f"{self.kind} adapter cannot have tensors {sorted(extra)}")
        missing = self.missing_tensors()
        if missing:
            raise LoraError(f"{self.kind} adapter is missing tensors {missing} (has {sorted(self.tensors)})")

    def missing_tensors(self):
        t = self.tensors
        if self.kind == "lora":
            return [n for n in ("down", "up") if n not in t]
        if self.kind == "loha":
            need = ["w1_a", "w1_b", "w2_a", "w2_b"] + (["t2"] if "t1" in t else []) + (["t1"] if "t2" in t else [])
            return [n for n in need if n not in t]
        missing = []
        if "w1" not in t and not ("w1_a" in t and "w1_b" in t):
            missing.append("w1 (or w1_a + w1_b)")
        if "w2" not in t and not ("w2_a" in t and "w2_b" in t):
            missing.append("w2 (or w2_a + w2_b)")
        return missing

    def num_params(self) -> int:
        return int(sum(v.size for v in self.tensors.values()))

    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.tensors.values()))

    def weight_shape(self) -> Tuple[int, ...]:
        """The base weight shape this adapter fits, derived from its tensors."""
        return tuple(delta_weight(self.kind, {k: v for k, v in self.tensors.items() if k != "magnitude"},
                                  1.0, None).shape)

    def delta(self, weight_shape=None) -> np.ndarray:
        """scale * (closed-form weight update), float32, shaped like the base weight."""
        tensors = {k: np.asarray(v, dtype=np.float32) for k, v in self.tensors.items() if k != "magnitude"}
        return delta_weight(self.kind, tensors, self.scale, weight_shape)

    def merged_weight(self, weight: np.ndarray, multiplier: float = 1.0) -> np.ndarray:
        """The base weight with this adapter folded in (DoRA included), float32."""
        w = np.asarray(weight, dtype=np.float32)
        merged = w + np.float32(multiplier) * self.delta(w.shape)
        if self.uses_dora:
            magnitude = np.asarray(self.tensors["magnitude"], dtype=np.float32)
            merged = merged * (magnitude / weight_norm(merged, magnitude.shape))
        return merged


@dataclasses.dataclass
class LoraState:
    """All adapters of one LoRA file, keyed by "<component>.<module path>"."""

    modules: Dict[str, ModuleLora]
    metadata: Dict[str, str] = dataclasses.field(default_factory=dict)
    source_format: str = "unknown"
    # Textual Inversion embeddings travelling with the LoRA (kohya/A1111 `bundle_emb`): token -> (N, D)
    embeddings: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def components(self):
        return sorted({k.split(".", 1)[0] for k in self.modules})

    def component(self, name: str) -> Dict[str, ModuleLora]:
        """The modules of one component, keyed by module path without the component prefix."""
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.modules.items() if k.startswith(prefix)}

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())
