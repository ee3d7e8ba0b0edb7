"""Batch generation: prompts, seeds, exact bytes whatever the batch size / workers / interruptions, resume,
bad input. Runs the random tiny model (`random_tiny_model_path`) with 2 steps."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from generate_fixtures import make_dataset, write_tiny_lora
from jdiffusion_lora.generate import (GenerateSettings, LoraSpec, PlanError, build_items, escape_stem, item_seed,
                                      read_inputs, read_manifest, render, run_job, unescape_stem, without_timing)
from jdiffusion_lora.generate.runner import generate_items, job_description, load_job_pipeline
from jdiffusion_lora.lora import LoraError
from jdiffusion_lora.tiny import random_tiny_model_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_tiny_lora(str(tmp_path_factory.mktemp("lora") / "style.safetensors"))


def _items(data, **kw):
    with pytest.warns(UserWarning, match="AC%2FDC"):
        inputs, llm = read_inputs(data)
        return build_items(inputs, llm, **kw)


def _settings(lora=None, **kw):
    return GenerateSettings(model=random_tiny_model_path(), loras=[LoraSpec(lora, 0.8)] if lora else [], steps=STEPS, **kw)


def _files(folder):
    out = {}
    for style in sorted(d for d in os.listdir(folder) if d.isdigit()):
        for f in sorted(os.listdir(os.path.join(folder, style))):
            with open(os.path.join(folder, style, f), "rb") as fh:
                out[f"{style}/{f}"] = fh.read()
    return out


def _manifest(folder):
    return without_timing(read_manifest(os.path.join(folder, "manifest.json"))["images"])


# ----------------------------------------------------------------------------- prompts, names, seeds

def test_challenge_template_and_fields(data, capsys):
    items = _items(data)
    assert [i.text for i in _items(data, template="seed")] == [i.text for i in items]   # the old preset name
    assert "--template challenge" in capsys.readouterr().err
    cat = items[0]
    assert (cat.style, cat.prompt, cat.stem) == ("00", "Cat", "Cat")
    assert cat.text == "style_00,purple,lineart,Cat,Cat,Cat,Cat,animal,pet"
    assert items[-1].text == "style_01,pastel,Moon,Moon,Moon,Moon"   # no hypernyms: no stray comma
    assert cat.negative == ""
    custom = render("a {prompt} in {style} style, {hypernyms*2}", {"prompt": "Cat", "style": "00",
                                                                   "hypernyms": "animal"})
    assert custom == "a Cat in 00 style,animal,animal"
    with pytest.raises(ValueError, match="unknown field"):
        render("{object}", {})
    neg = _items(data, negative_template="blurry, {style_tags}")
    assert neg[0].negative == "blurry,purple,lineart"


def test_escape_is_reversible():
    for prompt in ["AC/DC", "a\\b:c*?\"<>|", "100%", ".hidden", "end.", "Cat", "café"]:
        stem = escape_stem(prompt)
        assert unescape_stem(stem) == prompt
        assert not set('/\\:*?"<>|') & set(stem)
    assert escape_stem("AC/DC") == "AC%2FDC" and escape_stem("Cat") == "Cat"


def test_item_seed_is_stable_and_order_free(data):
    items = _items(data, base_seed=7)
    # sha256("7\\x0000\\x00Cat")[:4] & 0x7fffffff: a stable hash, never change it
    assert item_seed(7, "00", "Cat") == items[0].seed == 1400542078
    assert len({it.seed for it in items}) == len(items)
    assert items[0].seed != items[3].seed  # same prompt, other style
    fixed = _items(data, base_seed=7, seed_mode="fixed")
    assert {it.seed for it in fixed} == {7}


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_problem(tmp_path, data):
    with pytest.raises(PlanError, match="unknown style id.*05.*available: 00, 01"):
        read_inputs(data, styles=["5"])
    root = make_dataset(str(tmp_path / "d"), {"00": {"0": "Cat"}})
    os.makedirs(tmp_path / "d" / "03")
    with pytest.raises(PlanError, match="style 03 has no prompt.json"):
        read_inputs(root)
    dup = make_dataset(str(tmp_path / "dup"), {"00": {"0": "Cat", "1": "Boat", "2": "cat"}})
    inputs, llm = read_inputs(dup)
    with pytest.raises(PlanError, match="duplicate prompt 'cat' \\(keys 0 and 2\\)"):
        build_items(inputs, llm)
    with pytest.warns(UserWarning, match="keeping the first"):
        assert [it.prompt for it in build_items(inputs, llm, dedupe=True)] == ["Cat", "Boat"]
    with pytest.raises(PlanError, match="empty or non-text"):
        make_dataset(str(tmp_path / "e"), {"00": {"0": ""}})
        read_inputs(str(tmp_path / "e"))


def test_lora_for_another_base_model_is_refused_before_writing(tmp_path, data):
    bad = write_tiny_lora(str(tmp_path / "sd2.safetensors"), width=1024)
    out = tmp_path / "out"
    with pytest.raises(LoraError, match="another base model"):
        run_job(_items(data), _settings(bad), str(out), progress=False)
    assert not any(f.endswith(".png") for _, _, fs in os.walk(out) for f in fs)


@pytest.mark.slow
def test_bad_lora_in_parallel_workers_is_one_clear_error(tmp_path, data):
    bad = write_tiny_lora(str(tmp_path / "sd2.safetensors"), width=1024)
    out = tmp_path / "out"
    r = _cli("run_parallel.py", "--data", data, "--lora", bad, "--steps", "1", "--out", str(out), "--workers", "2",
             "--no-progress")
    assert r.returncode == 2 and "all 2 workers failed before making an image" in r.stderr
    assert "another base model" in r.stderr and "Traceback" not in r.stderr
    assert not any(f.endswith(".png") for _, _, fs in os.walk(out) for f in fs)


def test_fp16_refused_on_cpu():
    from jdiffusion_lora._runtime import DEVICE
    if DEVICE == "cuda":
        pytest.skip("CUDA machine")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        _settings(dtype="fp16").check()


# ----------------------------------------------------------------------------- exactness and resume

@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, lora):
    """The single-process, batch-size-1 run every other run must equal."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    res = run_job(_items(data), _settings(lora), out, progress=False)
    assert (res.generated, res.missing) == (5, [])
    return out


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_reference_run_layout_and_manifest(reference, lora):
    files = _files(reference)
    assert sorted(files) == ["00/AC%2FDC.png", "00/Boat.png", "00/Cat.png", "01/Cat.png", "01/Moon.png"]
    images = read_manifest(os.path.join(reference, "manifest.json"))["images"]
    rec = images["00/Cat.png"]
    assert rec["prompt"] == "Cat" and rec["text"].startswith("style_00,")
    assert rec["seed"] == item_seed(114514, "00", "Cat")
    assert rec["loras"][0]["scale"] == 0.8 and len(rec["loras"][0]["sha256"]) == 64
    assert rec["settings"]["steps"] == STEPS and rec["size"] == [64, 64]
    import hashlib
    assert rec["sha256"] == hashlib.sha256(files["00/Cat.png"]).hexdigest()
    assert images["00/AC%2FDC.png"]["prompt"] == "AC/DC"


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_same_bytes_with_batch_size_4_and_fused_lora(tmp_path, data, lora, reference):
    out = str(tmp_path / "b4")
    run_job(_items(data), _settings(lora, batch_size=4), out, progress=False)
    assert _files(out) == _files(reference)
    assert _manifest(out) == _manifest(reference)
    # fused LoRA: same maths, recorded as a different setting; pixels agree to a rounding step
    fused = str(tmp_path / "fused")
    run_job(_items(data), _settings(lora, fuse_lora=True, vae_slicing=True), fused, progress=False)
    import numpy as np
    from PIL import Image
    for rel in _files(reference):
        a = np.asarray(Image.open(os.path.join(reference, rel)), dtype=int)
        b = np.asarray(Image.open(os.path.join(fused, rel)), dtype=int)
        assert np.abs(a - b).max() <= 1


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_batched_mode_is_close_and_recorded(tmp_path, data, lora, reference):
    out = str(tmp_path / "batched")
    run_job(_items(data), _settings(lora, batch_size=3, batch_mode="batched"), out, progress=False)
    import numpy as np
    from PIL import Image
    for rel in _files(reference):   # one UNet call per batch: equal up to a rounding step, not byte-exact
        a = np.asarray(Image.open(os.path.join(reference, rel)), dtype=int)
        b = np.asarray(Image.open(os.path.join(out, rel)), dtype=int)
        assert np.abs(a - b).max() <= 1
    assert {r["settings"]["batch_mode"] for r in _manifest(out).values()} == {"batched"}


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_resume_after_interrupt(tmp_path, data, lora, reference):
    out = str(tmp_path / "resume")
    items, settings = _items(data), _settings(lora, batch_size=2)
    pipe, job = load_job_pipeline(settings), job_description(settings)

    def stop_after_two(it, count=[0]):
        count[0] += 1
        if count[0] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_items(pipe, items, settings, out, job, on_done=stop_after_two)
    assert len(_files(out)) == 2
    with open(os.path.join(out, "00", "Cat.png"), "r+b") as f:   # a damaged image is redone
        f.truncate(10)
    res = run_job(items, settings, out, progress=False)
    assert (res.skipped, res.generated) == (1, 4)
    assert _files(out) == _files(reference) and _manifest(out) == _manifest(reference)
    assert run_job(items, settings, out, progress=False).generated == 0      # nothing left to do
    assert run_job(items, settings, out, overwrite=True, progress=False).generated == 5
    assert _files(out) == _files(reference)
    changed = run_job(items, _settings(lora, guidance=3.0), out, progress=False)  # other settings: redone
    assert changed.generated == 5


def _cli(script, *args, env=None):
    """Run a generation script on the random tiny model (the test LoRAs are made for it, not the default model).

    Workers get this process's thread count: on some CPUs (seen on AMD EPYC) oneDNN's summation order depends
    on the number of threads, so "the same bytes as one process" holds at the same thread count; by default
    run_parallel gives each of 2 workers half the cores."""
    from jdiffusion_lora._runtime import cpu_threads

    e = dict(os.environ, OMP_NUM_THREADS=str(cpu_threads()), **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), "--model", random_tiny_model_path(), *args],
                          cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_run_parallel_two_workers_equals_single_process(tmp_path, data, lora, reference):
    out = str(tmp_path / "par")
    r = _cli("run_parallel.py", "--data", data, "--lora", f"{lora}:0.8", "--steps", str(STEPS), "--out", out,
             "--workers", "2", "--batch-size", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "generated by 2 worker(s)" in r.stdout
    assert _files(out) == _files(reference)
    assert _manifest(out) == _manifest(reference)
    workers = {rec["worker"] for rec in read_manifest(os.path.join(out, "manifest.json"))["images"].values()}
    assert workers == {"w0", "w1"}


@pytest.mark.slow
def test_dead_worker_items_are_picked_up(tmp_path, data, lora, reference):
    out = str(tmp_path / "crash")
    r = _cli("run_parallel.py", "--data", data, "--lora", f"{lora}:0.8", "--steps", str(STEPS), "--out", out,
             "--workers", "2", "--batch-size", "2", "--no-progress", env={"JDIFFUSION_GENERATE_CRASH": "0:1"})
    assert r.returncode == 0, r.stderr
    assert "worker 0 exited (code 3); 1 unfinished item(s) handed to the other workers" in r.stderr
    assert _files(out) == _files(reference) and _manifest(out) == _manifest(reference)


@pytest.mark.slow
def test_all_workers_dead_then_rerun_finishes(tmp_path, data, lora, reference):
    out = str(tmp_path / "allcrash")
    args = ("--data", data, "--lora", f"{lora}:0.8", "--steps", str(STEPS), "--out", out, "--workers", "2",
            "--no-progress")
    r = _cli("run_parallel.py", *args, env={"JDIFFUSION_GENERATE_CRASH": "0:1,1:1"})
    assert r.returncode == 1 and "3 image(s) still missing" in r.stderr and "run the same command again" in r.stderr
    assert len(read_manifest(os.path.join(out, "manifest.json"))["images"]) == 2
    r = _cli("run_parallel.py", *args)
    assert r.returncode == 0, r.stderr
    assert "2 already done, 3 generated" in r.stdout
    assert _files(out) == _files(reference) and _manifest(out) == _manifest(reference)


def test_infer_cli_errors_are_clear(tmp_path, data):
    r = _cli("infer.py", "--data", data, "--styles", "09", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown style id(s) 09" in r.stderr
    r = _cli("infer.py", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "give --data" in r.stderr
