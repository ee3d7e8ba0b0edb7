"""`generate --start`: img2img from a start built from the style's references (generate/start.py)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jdiffusion_lora.generate.start import StartMaker, blurred_image, flat_image, reference_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = os.path.join(REPO, "styles")


def test_flat_and_blurred_starts_carry_the_references_colours():
    paths = reference_paths(STYLES, "00")
    refs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC), np.float32)
                     for p in paths])
    flat = np.asarray(flat_image(paths, (32, 32)), np.float32)
    assert flat.shape == (32, 32, 3) and np.ptp(flat.reshape(-1, 3), axis=0).max() == 0
    assert np.abs(flat[0, 0] - refs.mean(axis=(0, 1, 2))).max() <= 0.5
    blur = np.asarray(blurred_image(paths, (32, 32)), np.float32)
    assert abs(blur.mean() - refs.mean()) < 3 and blur.std() < refs.mean(0).std()
    with pytest.raises(FileNotFoundError, match="no reference images"):
        reference_paths(STYLES, "99")
    with pytest.raises(ValueError, match="start must be one of"):
        StartMaker("colour", STYLES, None, (32, 32))


@pytest.mark.slow
def test_generate_from_starts_on_the_builtin_model(tmp_path):
    from jdiffusion_lora.cli import main

    def run(start, out, *extra):
        args = ["generate", "--data", STYLES, "--styles", "00", "--template", "plain", "--steps", "4",
                "--out", str(tmp_path / out), "--no-progress", "--start", start, *extra]
        assert main(args) == 0
        return {f: np.asarray(Image.open(tmp_path / out / "00" / f), np.float32)
                for f in sorted(os.listdir(tmp_path / out / "00")) if f.endswith(".png")}

    noise = run("noise", "noise")
    flat = run("flat", "flat", "--strength", "0.5")
    latents = run("latents", "latents", "--strength", "0.9")
    again = run("latents", "latents2", "--strength", "0.9")
    assert sorted(flat) == sorted(noise) == ["circle.png", "square.png", "triangle.png"]
    assert all(np.abs(flat[k] - noise[k]).mean() > 1 for k in noise)
    assert all(np.array_equal(latents[k], again[k]) for k in latents)          # deterministic per seed
    # a flat start at strength 0.5 keeps the image close to the style's mean colour
    mean = np.mean([np.asarray(Image.open(p).convert("RGB"), np.float32).reshape(-1, 3).mean(0)
                    for p in reference_paths(STYLES, "00")], axis=0)
    dist = lambda imgs: np.mean([np.abs(im.reshape(-1, 3).mean(0) - mean).mean() for im in imgs.values()])  # noqa: E731
    assert dist(flat) < dist(noise)
    records = [json.loads(p.read_text()) for p in (tmp_path / "flat").rglob("*.json")]
    assert any('"start": "flat"' in json.dumps(r) and '"strength": 0.5' in json.dumps(r) for r in records)
    assert main(["generate", "--data", STYLES, "--styles", "00", "--steps", "2", "--out", str(tmp_path / "bad"),
                 "--start", "flat", "--strength", "1.5"]) == 2
