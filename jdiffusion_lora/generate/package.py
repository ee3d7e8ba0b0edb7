"""Check a generated folder against the prompts and write the submission zip.

Checks (`check_output`): every style folder present, one image per prompt, the file stem equals the
prompt (escaped as in plan.escape_stem), the image readable, RGB and of the expected size. It
lists what is missing, extra, misnamed (an extra file that looks like a missing one: other case,
other extension, stray spaces) and bad.

The zip (`write_zip`) holds `<NN>/<stem>.png` for every prompt, plus at its root `manifest.json`
(when the folder has one) and `SHA256SUMS` (one "sha256  NN/stem.png" line per image). Entries are
sorted with a fixed date, so the same images give the same zip bytes; it is written to a temp
name and renamed.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..weights import atomic_write_bytes
from .manifest import MANIFEST, RECORDS
from .plan import escape_stem

ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class CheckReport:
    expected: Dict[str, List[Tuple[str, str]]]            # style -> [(prompt, stem)]
    size: Optional[Tuple[int, int]] = None
    missing_styles: List[str] = field(default_factory=list)
    extra_styles: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)       # "NN/stem.png" (prompt has no image)
    extra: List[str] = field(default_factory=list)         # files that are no prompt's image
    misnamed: List[Tuple[str, str]] = field(default_factory=list)  # (found, expected)
    bad: List[Tuple[str, str]] = field(default_factory=list)       # (file, why)

    @property
    def ok(self) -> bool:
        return not (self.missing_styles or self.extra_styles or self.missing or self.extra
                    or self.misnamed or self.bad)

    def lines(self) -> List[str]:
        out = [f"missing style folder: {s}/" for s in self.missing_styles]
        out += [f"extra style folder: {s}/" for s in self.extra_styles]
        out += [f"misnamed: {a} should be {b}" for a, b in self.misnamed]
        out += [f"missing image: {m}" for m in self.missing]
        out += [f"extra file: {e}" for e in self.extra]
        out += [f"bad image: {f}: {why}" for f, why in self.bad]
        return out

    def expected_files(self) -> List[str]:
        return [f"{s}/{stem}.png" for s in sorted(self.expected) for _, stem in self.expected[s]]


def expected_from_inputs(inputs) -> Dict[str, List[Tuple[str, str]]]:
    """[StyleInput] (plan.read_inputs) -> style -> [(prompt, file stem)]."""
    return {s.style: [(p, escape_stem(p)) for _, p in s.prompts] for s in inputs}


def _loose(name: str) -> str:
    """A forgiving key to recognise a misnamed file: case, spaces, underscores and extension ignored."""
    stem = os.path.splitext(name)[0]
    return re.sub(r"[\s_]+", " ", stem).strip().lower()


def _check_image(path: str, size: Optional[Tuple[int, int]]) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode, got = im.mode, im.size
            fmt = im.format
    except Exception as e:  # noqa: BLE001  (any decoder failure means "unreadable")
        return None, f"unreadable ({type(e).__name__}: {e})"
    if fmt != "PNG":
        return got, f"not a PNG file (it is {fmt})"
    if mode != "RGB":
        return got, f"mode {mode}, expected RGB"
    if size is not None and tuple(got) != tuple(size):
        return got, f"size {got[0]}x{got[1]}, expected {size[0]}x{size[1]}"
    return got, None


def check_output(out_dir: str, expected: Dict[str, List[Tuple[str, str]]],
                 size: Optional[Tuple[int, int]] = None) -> CheckReport:
    """Compare `out_dir` with the expected (style -> [(prompt, stem)]) files; size (W, H) or None (don't check)."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"output folder not found: {out_dir}")
    rep = CheckReport(expected=expected, size=size)
    present = sorted(d for d in os.listdir(out_dir) if os.path.isdir(os.path.join(out_dir, d))
                     and not d.startswith("."))
    rep.missing_styles = [s for s in sorted(expected) if s not in present]
    rep.extra_styles = [d for d in present if d not in expected]
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and name != MANIFEST and not name.startswith("."):
            rep.extra.append(name)
    for style in sorted(expected):
        folder = os.path.join(out_dir, style)
        if not os.path.isdir(folder):
            rep.missing += [f"{style}/{stem}.png" for _, stem in expected[style]]
            continue
        files = sorted(f for f in os.listdir(folder) if not f.startswith(".tmp-"))
        wanted = {f"{stem}.png": stem for _, stem in expected[style]}
        extra = [f for f in files if f not in wanted]
        missing = [f for f in wanted if f not in files]
        loose_missing = {}
        for f in missing:
            loose_missing.setdefault(_loose(f), f)
        for f in extra:
            match = loose_missing.pop(_loose(f), None)
            if match is not None:
                rep.misnamed.append((f"{style}/{f}", f"{style}/{match}"))
                missing.remove(match)
            else:
                rep.extra.append(f"{style}/{f}")
        rep.missing += [f"{style}/{f}" for f in missing]
        for f in files:
            if f in wanted:
                _, why = _check_image(os.path.join(folder, f), size)
                if why:
                    rep.bad.append((f"{style}/{f}", why))
    return rep


def write_zip(out_dir: str, report: CheckReport, zip_path: str, include_manifest: bool = True) -> List[str]:
    """Write the submission zip; returns the names written. Refuses an output that fails the check."""
    if not report.ok:
        raise ValueError(f"{out_dir} is not a complete submission ({len(report.lines())} problem(s)); "
                         "fix them first:\n  " + "\n  ".join(report.lines()))
    names, sums = [], []
    tmp = zip_path + f".tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(zip_path)), exist_ok=True)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            def add(name: str, data: bytes) -> None:
                info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
                info.external_attr = 0o644 << 16
                z.writestr(info, data)
                names.append(name)

            for rel in report.expected_files():
                with open(os.path.join(out_dir, rel), "rb") as f:
                    data = f.read()
                add(rel, data)
                sums.append(f"{hashlib.sha256(data).hexdigest()}  {rel}\n")
            manifest = os.path.join(out_dir, MANIFEST)
            if include_manifest and os.path.isfile(manifest):
                with open(manifest, "rb") as f:
                    add(MANIFEST, f.read())
            if include_manifest:
                add("SHA256SUMS", "".join(sums).encode())
        with open(tmp, "rb") as f:
            atomic_write_bytes(zip_path, [f.read()])
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return names


__all__ = ["CheckReport", "check_output", "expected_from_inputs", "write_zip", "RECORDS"]
