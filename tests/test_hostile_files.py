"""Untrusted weight files: hostile torch pickles are refused naming the file and tensor, and a fuzz
run over mutated LoRA files ends every time in a clean load or one of our own errors, never a crash."""
import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from jdiffusion_lora.weights import WeightsError, load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Storage:
    """Stands for a torch storage in a hand-written pickle (saved as a persistent id, like torch does)."""

    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


# Jittor (imported by pytest here) ends this process when a child dies of a signal (its SIGCHLD handler), so
# a child's segfault would kill pytest instead of failing the test. A middle process without Jittor runs
# the command and reports its exit status (-11 for a segfault).
_SHIELD = ("import subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "sys.stderr.write(f'\\n[exit status {r.returncode}]\\n')")


def run_shielded(argv, timeout=600):
    """subprocess.run(argv) in ROOT with our PYTHONPATH; returns (exit status, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-c", _SHIELD, *argv], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=timeout)
    status = re.findall(r"\[exit status (-?\d+)\]", out.stderr)
    assert out.returncode == 0 and status, out.stderr[-2000:]
    return int(status[-1]), out.stdout, out.stderr


def write_bin(path, tensors, storages):
    """A torch-format zip: `tensors` {name: _Tensor}, `storages` {key: raw bytes}."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
    return str(path)


def _hostile(tmp_path, name, offset=0, size=(2, 2), stride=(2, 1), numel=4, raw=None, storage=torch.FloatStorage):
    raw = np.arange(4, dtype=np.float32).tobytes() if raw is None else raw
    st = _Storage("0", storage, numel)
    return write_bin(tmp_path / f"{name}.bin", {"unet.x.lora_A.weight": _Tensor(st, offset, size, stride)}, {"0": raw})


def test_well_formed_handmade_bin_loads(tmp_path):
    path = _hostile(tmp_path, "good", offset=1, size=(3,), stride=(1,))
    np.testing.assert_array_equal(load_weights(path)["unet.x.lora_A.weight"], [1, 2, 3])
    path = _hostile(tmp_path, "transposed", size=(2, 2), stride=(1, 2))
    np.testing.assert_array_equal(load_weights(path)["unet.x.lora_A.weight"], [[0, 2], [1, 3]])


@pytest.mark.parametrize("case, geometry, message", [
    ("stride_past_storage", dict(size=(2, 2), stride=(4, 1)), r"reach element 5 of storage data/0, which holds 4"),
    ("huge_stride", dict(size=(2, 2), stride=(2 ** 60, 1)), r"reach element"),
    ("negative_offset", dict(offset=-1, size=(2,), stride=(1,)), r"negative size, stride or offset"),
    ("huge_offset", dict(offset=2 ** 62, size=(2,), stride=(1,)), r"reach element"),
    ("offset_at_end", dict(offset=4, size=(1,), stride=(1,)), r"reach element 4 of storage"),
    ("shape_larger_than_storage", dict(size=(3, 3), stride=(3, 1)), r"reach element 8 of storage"),
    ("broadcast_bigger_than_storage", dict(size=(1000000,), stride=(0,)), r"more than its storage"),
    ("negative_stride", dict(size=(2,), stride=(-1,)), r"negative"),
    ("negative_size", dict(size=(-2,), stride=(1,)), r"negative"),
    ("size_stride_mismatch", dict(size=(2, 2), stride=(1,)), r"malformed geometry"),
    ("float_offset", dict(offset=0.5, size=(2,), stride=(1,)), r"malformed geometry"),
    ("wrong_dtype_size", dict(raw=b"\0" * 6), r"holds 6 bytes, but the pickle declares 4 FloatStorage"),
    ("numel_disagrees", dict(numel=400), r"declares 400 FloatStorage"),
    ("half_storage_odd_bytes", dict(raw=b"\0" * 7, storage=torch.HalfStorage), r"HalfStorage element"),
])
def test_hostile_bin_refused_naming_file_and_key(tmp_path, case, geometry, message):
    path = _hostile(tmp_path, case, **geometry)
    with pytest.raises(WeightsError, match=message) as info:
        load_weights(path)
    text = str(info.value)
    assert text.startswith(path), text
    if "geometry" in message or "reach" in message or "negative" in message or "storage" in message:
        assert "unet.x.lora_A.weight" in text or "data/0" in text, text


def test_hostile_bin_through_the_command_line(tmp_path):
    """`lora inspect` and `txt2img --lora` on a stride-past-storage file: exit 2 with our message, not a
    segfault (exit 139)."""
    path = _hostile(tmp_path, "crafted", size=(2, 2), stride=(1 << 40, 1))
    for argv in (["lora", "inspect", path], ["txt2img", "--lora", path, "--steps", "1", "--num-images", "1",
                                            "--out", str(tmp_path / "out")]):
        status, _, stderr = run_shielded([sys.executable, "-m", "jdiffusion_lora.cli", *argv], timeout=300)
        assert status == 2, (argv, status, stderr[-2000:])
        assert f"error: {path}: tensor 'unet.x.lora_A.weight'" in stderr


def test_hostile_safetensors_headers(tmp_path):
    import json
    import struct

    def write(name, header, data=b"\0" * 16):
        head = json.dumps(header).encode()
        path = str(tmp_path / f"{name}.safetensors")
        open(path, "wb").write(struct.pack("<Q", len(head)) + head + data)
        return path

    cases = {
        "negative_start": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "data_offsets"),
        "reversed": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, "data_offsets"),
        "past_end": ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
        "shape_too_big": ({"a": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}, "needs"),
        "negative_dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "non-negative"),
        "bad_dtype": ({"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
        "not_object": ([1, 2, 3], "not an object"),
        "entry_not_object": ({"a": 5}, "not an object"),
        "bad_metadata": ({"__metadata__": {"k": 1}}, "__metadata__"),
    }
    for name, (header, message) in cases.items():
        path = write(name, header)
        with pytest.raises(WeightsError, match=message) as info:
            load_weights(path)
        assert str(info.value).startswith(path), name
    deep = str(tmp_path / "deep.safetensors")
    head = b"[" * 100000 + b"]" * 100000
    open(deep, "wb").write(len(head).to_bytes(8, "little") + head)
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        load_weights(deep)


# ----------------------------------------------------------------------------- fuzzing

_FUZZ_CHILD = textwrap.dedent(r"""
    import io, os, random, sys, traceback, warnings, zipfile
    from jdiffusion_lora.weights import WeightsError
    from jdiffusion_lora.lora.formats import load_lora_state, standard_name_tables
    from jdiffusion_lora.lora import LoraError
    from jdiffusion_lora.cli.lora import inspect_lora

    folder, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    tables = standard_name_tables()
    sources = {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}

    def flip(data, lo=0, hi=None):
        data = bytearray(data)
        hi = len(data) if hi is None else hi
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(lo, hi)
            data[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256), data[i] ^ (1 << rng.randrange(8))])
        return bytes(data)

    def mutate(name, data):
        how = rng.random()
        if how < 0.1:
            return data[: rng.randrange(len(data))]                 # truncated
        if name.endswith(".safetensors"):
            n = int.from_bytes(data[:8], "little")
            return flip(data, 0, 8 + n) if how < 0.7 else flip(data)  # mostly the header
        if how < 0.4:
            return flip(data)                                       # raw bytes (mostly CRC errors)
        # re-zip with one member mutated, so the pickle and the geometry are what gets fuzzed
        src = zipfile.ZipFile(io.BytesIO(data))
        members = src.namelist()
        victim = rng.choice([m for m in members if m.endswith("data.pkl")] * 3 + members)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for m in members:
                raw = src.read(m)
                dst.writestr(m, flip(raw) if m == victim and raw else raw)
        return out.getvalue()

    outcomes = {"loaded": 0, "refused": 0}
    for i in range(rounds):
        name = rng.choice(sorted(sources))
        path = os.path.join(folder, "mutant-" + name)
        with open(path, "wb") as f:
            f.write(mutate(name, sources[name]))
        for entry in ("load", "load_lenient", "inspect"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if entry == "load":
                        load_lora_state(path, tables, strict=True)
                    elif entry == "load_lenient":
                        load_lora_state(path, tables, strict=False)
                    else:
                        inspect_lora(path)
                outcomes["loaded"] += 1
            except (WeightsError, LoraError):
                outcomes["refused"] += 1
            except Exception:
                print(f"round {i} ({name}, {entry}): not our error type", file=sys.stderr)
                traceback.print_exc()
                os.replace(path, os.path.join(folder, f"failing-{i}-" + name))
                sys.exit(1)
    print(outcomes)
""")


def _fuzz_sources(folder):
    rng = np.random.default_rng(0)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    diffusers = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": t(2, 32),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": t(32, 2),
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": t(2, 16),
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": t(16, 2)}
    kohya = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": t(2, 32),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": t(32, 2),
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0)}
    from safetensors.torch import save_file
    save_file(diffusers, os.path.join(folder, "diffusers.safetensors"))
    save_file(kohya, os.path.join(folder, "kohya.safetensors"), metadata={"ss_network_dim": "2"})
    torch.save(diffusers, os.path.join(folder, "pytorch_lora_weights.bin"))
    # the JDiffusion layout: views sharing one storage, a transposed tensor
    base = t(4, 32)
    torch.save({"unet.base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
                base[:2], "unet.base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q."
                "lora_B.weight": base[2:].t()}, os.path.join(folder, "jdiffusion.bin"))


def _run_fuzz(tmp_path, rounds, seed):
    folder = tmp_path / "fuzz"
    folder.mkdir()
    _fuzz_sources(str(folder))
    status, stdout, stderr = run_shielded([sys.executable, "-c", _FUZZ_CHILD, str(folder), str(rounds), str(seed)])
    # A negative exit status is a signal: -11 is the segfault this test exists to catch.
    assert status == 0, f"exit {status}\n{stderr[-4000:]}"
    return stdout


def test_a_crash_in_the_child_fails_the_test_instead_of_killing_pytest():
    status, _, _ = run_shielded([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
    assert status == -11


def test_fuzz_mutated_lora_files_load_or_raise_our_error(tmp_path):
    """300 seeded mutations of valid .safetensors / .bin LoRA files through the real loaders."""
    stdout = _run_fuzz(tmp_path, rounds=300, seed=1234)
    assert "refused" in stdout and "loaded" in stdout


@pytest.mark.slow
def test_fuzz_long(tmp_path):
    _run_fuzz(tmp_path, rounds=5000, seed=99)


_PIPELINE_FUZZ_CHILD = textwrap.dedent(r"""
    import os, random, sys, traceback, warnings
    from jdiffusion_lora import StableDiffusionPipeline
    from jdiffusion_lora.tiny import tiny_model_path
    from jdiffusion_lora.lora import inject
    from jdiffusion_lora.lora import LoraError
    from jdiffusion_lora.weights import WeightsError

    folder, rounds, rng = sys.argv[1], int(sys.argv[2]), random.Random(int(sys.argv[3]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path())
    inject.inject_adapter(pipe.unet, "a", targets="attn")
    inject.inject_adapter(pipe.text_encoder, "a", targets="text")
    for fmt in ("diffusers", "kohya"):   # LoRAs that fit the model, so mutations reach the fit checks
        pipe.save_lora_weights(os.path.join(folder, fmt + ".safetensors"), format=fmt, adapter_name="a")
    pipe.delete_adapters("a")
    sources = {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
    for i in range(rounds):
        name = rng.choice(sorted(sources))
        data = bytearray(sources[name])
        n = int.from_bytes(data[:8], "little")
        hi = 8 + n if rng.random() < 0.8 else len(data)   # mostly the header: shapes, offsets, names
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8, hi)] = rng.choice([0, 0xFF, 0x30, 0x39, rng.randrange(256)])
        path = os.path.join(folder, "mutant-" + name)
        open(path, "wb").write(bytes(data))
        for strict in (True, False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipe.delete_adapters(pipe.load_lora_weights(path, adapter_name=f"m{i}{strict}", strict=strict))
            except (WeightsError, LoraError):
                pass
            except Exception:
                traceback.print_exc()
                sys.exit(1)
""")


@pytest.mark.slow
def test_fuzz_through_the_pipeline_loader(tmp_path):
    """Mutated LoRAs that fit the built-in model, loaded with pipe.load_lora_weights (fit checks included)."""
    status, _, stderr = run_shielded([sys.executable, "-c", _PIPELINE_FUZZ_CHILD, str(tmp_path), "1000", "3"])
    assert status == 0, f"exit {status}\n{stderr[-4000:]}"
