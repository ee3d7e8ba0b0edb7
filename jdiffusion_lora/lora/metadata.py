"""The header metadata that A1111, ComfyUI and kohya's tools show for a LoRA file.

- `ss_*`: kohya sd-scripts' training settings (`ss_network_dim`, `ss_tag_frequency`, ...), all strings
  (Python's `str()` of the value, as kohya writes them: "True", "None", "(512, 512)").
- `sshs_model_hash` / `sshs_legacy_hash`: the hashes sd-webui-additional-networks indexes files by,
  computed as kohya's `precalculate_safetensors_hashes` does: the file is laid out with only its `ss_*`
  metadata (so editing other metadata later keeps the hash); the model hash is the sha256 of the tensor
  data (everything after the header), the legacy hash the first 8 hex digits of the sha256 of the 64 KiB
  at offset 1 MiB of that layout (of nothing, for a file under 1 MiB).
- `modelspec.*`: Stability AI's model spec 1.0.1 (architecture, implementation, title, resolution, ...).
"""
from __future__ import annotations

import datetime
import hashlib
import json
from collections import Counter
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from ..weights import safetensors_bytes

MODELSPEC_VERSION = "1.0.1"
ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                 "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


def addnet_hashes(tensors: Dict[str, np.ndarray], metadata: Mapping[str, str],
                  dtype: Optional[str] = None) -> Tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of the file `tensors` + `metadata` would make (see above)."""
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    chunks = safetensors_bytes(tensors, training, dtype)
    data = hashlib.sha256()
    for chunk in chunks[2:]:
        data.update(chunk)
    blob = b"".join(chunks)
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return data.hexdigest(), legacy


def with_hashes(tensors: Dict[str, np.ndarray], metadata: Mapping[str, str],
                dtype: Optional[str] = None) -> Dict[str, str]:
    """`metadata` plus fresh sshs_model_hash / sshs_legacy_hash for these tensors."""
    model_hash, legacy_hash = addnet_hashes(tensors, metadata, dtype)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def tag_frequency(captions_by_folder: Mapping[str, Iterable[str]]) -> Dict[str, Dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset folder, how many captions hold each (lower-cased) tag."""
    out: Dict[str, Dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts: Counter = Counter()
        for caption in captions:
            counts.update(t.strip().lower() for t in caption.split(",") if t.strip())
        out[folder] = dict(counts)
    return out


def modelspec(base_model_version: str, v_prediction: bool, title: str, resolution: Tuple[int, int],
              timestamp: float, trigger_phrase: str = "", description: str = "") -> Dict[str, str]:
    """modelspec.* entries of a LoRA for SD 1.x / 2.x (implementation: diffusers' layer names)."""
    arch = ARCHITECTURES.get(base_model_version + ("_v" if v_prediction and base_model_version == "sd_v2" else ""),
                             ARCHITECTURES["sd_v1"])
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": "jdiffusion-lora",
    }
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    if description:
        out["modelspec.description"] = description
    return out


def ss_value(value) -> str:
    """A value as kohya stores it (str() of the Python value; dicts and lists of dicts as JSON)."""
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)
