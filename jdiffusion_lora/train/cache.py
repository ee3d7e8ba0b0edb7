"""Caches of VAE encodings and text embeddings.

Latents: what we cache is the VAE posterior's parameters (mean and log-variance, (2C, h, w)), not a
sample of it, so every training step still draws its own latent from the sample's random stream
and a cached run equals an uncached one. The key hashes the image file's bytes, the resolution,
the crop box, the flip and the VAE (its folder and config): an edited image is re-encoded, a rerun
with the same data is instant (disk cache).

Text: when the text encoder is frozen, the embedding of each distinct caption is kept (at most
`max_items`, least recently used dropped first).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..weights import atomic_write_bytes


_FILE_HASHES: Dict[Tuple[str, float, int], str] = {}


def file_hash(path: str) -> str:
    """sha256 of a file's bytes (memoised by path, mtime and size)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def vae_fingerprint(vae, source: str) -> str:
    """Identifies the encoder: its folder (or "tiny"), its config and its dtype when not float32."""
    import dataclasses
    cfg = dataclasses.asdict(vae.config) if dataclasses.is_dataclass(vae.config) else dict(vae.config)
    ident = {"source": os.path.abspath(source) if source else "tiny", "config": cfg}
    if vae.dtype != "float32":  # a half-precision encoder (mixed_precision) gives other latents
        ident["dtype"] = vae.dtype
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latent_key(path: str, resolution: int, box: Tuple[int, int], flip: bool, vae_id: str) -> str:
    text = f"{file_hash(path)}|{resolution}|{box[0]},{box[1]}|{int(flip)}|{vae_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class LatentCache:
    """mode: "none" (always encode), "memory", or "disk" (memory in front of `folder`).

    `read_only`: use the disk entries but never write them (data-parallel ranks other than rank 0)."""

    def __init__(self, mode: str, folder: Optional[str] = None, read_only: bool = False):
        if mode not in ("none", "memory", "disk"):
            raise ValueError(f"cache mode must be none, memory or disk, got {mode!r}")
        if mode == "disk" and not folder:
            raise ValueError("a disk cache needs a folder")
        self.mode, self.folder, self.read_only = mode, folder, read_only
        self.memory: Dict[str, np.ndarray] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".npy")

    def get(self, key: str) -> Optional[np.ndarray]:
        if self.mode == "none":
            return None
        if key in self.memory:
            self.hits += 1
            return self.memory[key]
        if self.mode == "disk" and os.path.isfile(self._path(key)):
            try:
                arr = np.load(self._path(key), allow_pickle=False)
            except (OSError, ValueError, EOFError):
                arr = None  # a damaged cache file: encode again
            if arr is not None and (arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[0] % 2):
                arr = None  # not (2C, h, w) moments: encode again
            if arr is not None:
                self.memory[key] = arr
                self.hits += 1
                return arr
        return None

    def put(self, key: str, moments: np.ndarray) -> None:
        self.misses += 1
        if self.mode == "none":
            return
        self.memory[key] = moments
        if self.mode == "disk" and not self.read_only:
            buf = io.BytesIO()
            np.save(buf, moments, allow_pickle=False)
            atomic_write_bytes(self._path(key), [buf.getvalue()])

    def get_or_encode(self, key: str, encode: Callable[[], np.ndarray]) -> np.ndarray:
        hit = self.get(key)
        if hit is not None:
            return hit
        moments = encode()
        self.put(key, moments)
        return moments


def sample_latent(moments: np.ndarray, eps: np.ndarray, scaling_factor: float) -> np.ndarray:
    """Posterior sample (mean + std * eps) times the VAE scaling factor; moments (2C, h, w)."""
    c = moments.shape[0] // 2
    mean, logvar = moments[:c], np.clip(moments[c:], -30.0, 20.0)
    return ((mean + np.exp(0.5 * logvar) * eps) * np.float32(scaling_factor)).astype(np.float32)


class TextCache:
    """Caption -> embedding (numpy), least recently used dropped beyond `max_items`."""

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self.items: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def get(self, caption: str) -> Optional[np.ndarray]:
        if caption in self.items:
            self.items.move_to_end(caption)
            return self.items[caption]
        return None

    def put(self, caption: str, value: np.ndarray) -> None:
        self.items[caption] = value
        self.items.move_to_end(caption)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
