"""Per-image records and `manifest.json`.

While generating, each image gets a small record file `<out>/.records/<NN>/<stem>.json`, written
(atomically) right after its PNG; records never collide, so any number of workers can write them.
`write_manifest` merges them into `<out>/manifest.json`:

    {"version": 1, "images": {"NN/stem.png": {prompt, text, negative, seed, sha256, model,
                                               loras: [{path, sha256, scale}], scheduler, settings,
                                               seconds, created_utc, worker}}}

`seconds`, `created_utc` and `worker` (TIMING_FIELDS) vary from run to run; everything else is
a pure function of the inputs. An existing image counts as done when its record exists, its
settings fingerprint equals the current one, and the file's sha256 equals the recorded one.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from ..weights import atomic_write_bytes

MANIFEST = "manifest.json"
RECORDS = ".records"
TIMING_FIELDS = ("seconds", "created_utc", "worker")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(folder: str) -> str:
    """A cheap identity for a model folder: sha256 over its JSON configs and its weight files' names and sizes.

    (Hashing gigabytes of weights on every run would cost more than it tells; LoRA files are small
    and get a full sha256.)"""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if name.endswith((".json", ".txt")):
                h.update(f"{rel}\0".encode())
                with open(path, "rb") as f:
                    h.update(f.read())
            elif name.endswith((".safetensors", ".bin", ".ckpt", ".pt")):
                h.update(f"{rel}\0{os.path.getsize(path)}\0".encode())
    return h.hexdigest()


def fingerprint(job: dict, item: dict) -> str:
    """sha256 of everything that decides an image's pixels."""
    blob = json.dumps({"job": job, "item": {k: item[k] for k in ("text", "negative", "seed")}}, sort_keys=True)
    return sha256_bytes(blob.encode())


def record_path(out_dir: str, relpath: str) -> str:
    return os.path.join(out_dir, RECORDS, relpath[:-len(".png")] + ".json")


def write_record(out_dir: str, relpath: str, record: dict) -> None:
    atomic_write_bytes(record_path(out_dir, relpath), [json.dumps(record, indent=1, sort_keys=True).encode()])


def read_record(out_dir: str, relpath: str) -> Optional[dict]:
    path = record_path(out_dir, relpath)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_done(out_dir: str, relpath: str, expected_fingerprint: str) -> bool:
    """True when the image exists, its record matches the current settings and the file is intact."""
    path = os.path.join(out_dir, relpath)
    if not os.path.isfile(path):
        return False
    rec = read_record(out_dir, relpath)
    if rec is None or rec.get("fingerprint") != expected_fingerprint:
        return False
    return sha256_file(path) == rec.get("sha256")


def write_manifest(out_dir: str, expected: Dict[str, str], job: dict) -> Dict[str, dict]:
    """Merge the records of the images in `expected` (relpath -> fingerprint) into `<out>/manifest.json`.

    Only images that exist and were made with the expected settings are listed; returns them."""
    images = {}
    for rel in sorted(expected):
        rec = read_record(out_dir, rel)
        if (rec is not None and rec.get("fingerprint") == expected[rel]
                and os.path.isfile(os.path.join(out_dir, rel))):
            images[rel] = rec
    manifest = {"version": 1, "job": job, "images": images}
    atomic_write_bytes(os.path.join(out_dir, MANIFEST), [json.dumps(manifest, indent=1, sort_keys=True).encode()])
    return images


def read_manifest(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def without_timing(images: Dict[str, dict]) -> Dict[str, dict]:
    """Manifest image entries minus the fields that change from run to run (for comparisons)."""
    return {k: {f: v for f, v in rec.items() if f not in TIMING_FIELDS} for k, rec in images.items()}


def missing(relpaths: List[str], out_dir: str) -> List[str]:
    return [r for r in relpaths if not os.path.isfile(os.path.join(out_dir, r))]
