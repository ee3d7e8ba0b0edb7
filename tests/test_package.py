"""`package`: completeness check (missing, wrong size, misnamed, extra, not RGB), zip layout, contact sheets."""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from generate_fixtures import PROMPTS, make_dataset
from jdiffusion_lora.cli import main
from jdiffusion_lora.generate.package import check_output, expected_from_inputs, write_zip
from jdiffusion_lora.generate.plan import escape_stem, read_inputs


def _fill(out, size=(16, 16), prompts=PROMPTS):
    rng = np.random.default_rng(1)
    for style, table in prompts.items():
        os.makedirs(os.path.join(out, style), exist_ok=True)
        for p in table.values():
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                os.path.join(out, style, escape_stem(p) + ".png"))
    return out


@pytest.fixture
def setup(tmp_path):
    data = make_dataset(str(tmp_path / "data"))
    inputs, _ = read_inputs(data)
    return data, expected_from_inputs(inputs), _fill(str(tmp_path / "out"))


def test_complete_folder_is_accepted_and_zipped(tmp_path, setup):
    data, expected, out = setup
    rep = check_output(out, expected, (16, 16))
    assert rep.ok and rep.lines() == []
    zpath = str(tmp_path / "sub.zip")
    names = write_zip(out, rep, zpath)
    with zipfile.ZipFile(zpath) as z:
        listed = z.namelist()
        sums = z.read("SHA256SUMS").decode().splitlines()
        cat = z.read("00/Cat.png")
    assert listed == names
    assert sorted(n for n in listed if n.endswith(".png")) == [
        "00/AC%2FDC.png", "00/Boat.png", "00/Cat.png", "01/Cat.png", "01/Moon.png"]
    assert f"{hashlib.sha256(cat).hexdigest()}  00/Cat.png" in sums
    with open(zpath, "rb") as f:
        first = f.read()
    write_zip(out, rep, zpath)       # same images -> same zip bytes
    with open(zpath, "rb") as f:
        assert f.read() == first


def test_each_problem_is_named(tmp_path, setup):
    data, expected, out = setup
    os.remove(os.path.join(out, "00", "Boat.png"))                                   # missing
    Image.new("RGB", (32, 16)).save(os.path.join(out, "01", "Moon.png"))              # wrong size
    os.rename(os.path.join(out, "01", "Cat.png"), os.path.join(out, "01", "cat.png"))  # misnamed
    Image.new("RGBA", (16, 16)).save(os.path.join(out, "00", "Cat.png"))              # not RGB
    Image.new("RGB", (16, 16)).save(os.path.join(out, "00", "Dog.png"))               # extra
    os.makedirs(os.path.join(out, "07"))                                               # extra style
    rep = check_output(out, expected, (16, 16))
    assert not rep.ok
    assert rep.missing == ["00/Boat.png"]
    assert rep.misnamed == [("01/cat.png", "01/Cat.png")]
    assert rep.extra == ["00/Dog.png"] and rep.extra_styles == ["07"]
    assert ("01/Moon.png", "size 32x16, expected 16x16") in rep.bad
    assert ("00/Cat.png", "mode RGBA, expected RGB") in rep.bad
    with pytest.raises(ValueError, match="not a complete submission"):
        write_zip(out, rep, str(tmp_path / "x.zip"))
    assert not os.path.exists(tmp_path / "x.zip")
    shutil.rmtree(os.path.join(out, "01"))
    rep = check_output(out, expected, (16, 16))
    assert rep.missing_styles == ["01"] and "01/Moon.png" in rep.missing


def test_package_cli(tmp_path, setup, capsys):
    data, expected, out = setup
    zpath = str(tmp_path / "sub.zip")
    assert main(["package", "--out", out, "--data", data, "--size", "16", "--zip", zpath]) == 0
    assert zipfile.is_zipfile(zpath)
    sheets = sorted(os.listdir(out + "_sheets"))
    assert sheets == ["00.png", "01.png"]
    with Image.open(os.path.join(out + "_sheets", "00.png")) as im:
        assert im.mode == "RGB" and im.width >= 128 * 3
    with open(os.path.join(out, "01", "Moon.png"), "wb") as f:
        f.write(b"not a png")
    os.remove(os.path.join(out, "00", "Boat.png"))
    capsys.readouterr()
    assert main(["package", "--out", out, "--data", data, "--size", "16x16", "--zip", zpath, "--check-only"]) == 1
    text = capsys.readouterr().out
    assert "missing image: 00/Boat.png" in text and "bad image: 01/Moon.png: unreadable" in text
