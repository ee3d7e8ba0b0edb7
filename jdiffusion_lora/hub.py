"""Find models in the local HuggingFace cache, without network.

`huggingface_hub` stores a repository `org/name` as

    $HF_HUB_CACHE (default $HF_HOME/hub, default ~/.cache/huggingface/hub)
      models--org--name/
        refs/main                 the commit hash the branch "main" pointed to when downloaded
        refs/<branch or tag>
        snapshots/<commit hash>/  the files of that commit (symlinks into blobs/)

`resolve_model("org/name", revision=...)` returns the snapshot folder. A revision is a branch or tag
name (looked up in refs/) or a commit hash (a snapshot folder). Nothing is downloaded: when the model
is not there, the error lists every place that was looked at.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dirs() -> List[str]:
    """Cache folders in the order huggingface_hub uses them (HF_HUB_CACHE, then HF_HOME/hub, then the default)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name of HF_HUB_CACHE
        dirs.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    dirs.append(os.path.join(home, "hub"))
    out = []
    for d in dirs:
        d = os.path.expanduser(d)
        if d not in out:
            out.append(d)
    return out


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not os.path.exists(name)


def resolve_model(name_or_path: str, revision: Optional[str] = None) -> str:
    """A local path as it is; `org/name` -> the snapshot folder in the HF cache (no network).

    Raises FileNotFoundError saying where it looked.
    """
    if os.path.exists(name_or_path) or not looks_like_repo_id(name_or_path):
        if revision:
            raise ValueError(f"revision={revision!r} only applies to a HuggingFace repository id, "
                             f"not the local path {name_or_path}")
        return name_or_path
    revision = revision or "main"
    repo_folder = "models--" + name_or_path.replace("/", "--")
    looked = []
    for cache in hub_cache_dirs():
        root = os.path.join(cache, repo_folder)
        ref = os.path.join(root, "refs", revision)
        if os.path.isfile(ref):
            with open(ref) as f:
                commit = f.read().strip()
            snap = os.path.join(root, "snapshots", commit)
            if os.path.isdir(snap):
                return snap
            looked.append(f"{ref} -> {commit}, but {snap} is missing")
            continue
        looked.append(f"{ref} (missing)")
        if _COMMIT.match(revision) or re.match(r"^[0-9a-f]{7,39}$", revision):
            snaps = os.path.join(root, "snapshots")
            hits = sorted(s for s in os.listdir(snaps) if s.startswith(revision)) if os.path.isdir(snaps) else []
            if len(hits) == 1:
                return os.path.join(snaps, hits[0])
            looked.append(f"{snaps}/{revision}* ({'ambiguous: ' + ', '.join(hits) if hits else 'missing'})")
    raise FileNotFoundError(
        f"{name_or_path!r} (revision {revision!r}) is not a local path and is not in the HuggingFace cache; "
        "nothing is downloaded. Looked at: " + "; ".join(looked)
        + ". Download it once with `huggingface-cli download " + name_or_path + "` or pass a folder or file.")
