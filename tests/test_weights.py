"""Torch-free weight reading/writing, checked against files written by torch and safetensors."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as torch_save_safetensors

from jdiffusion_lora.weights import (WeightsError, bf16_bits_to_float32, float32_to_bf16_bits, load_weights,
                                     read_safetensors, save_safetensors)


def _torch_state():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(3, 4, generator=g),
        "w16": torch.randn(5, generator=g).half(),
        "wbf16": torch.randn(2, 3, generator=g).bfloat16(),
        "ids": torch.arange(6).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "strided": torch.randn(4, 6, generator=g).t(),          # non-contiguous
        "view": torch.randn(10, generator=g)[2:7],              # storage offset
    }


def _expected(t):
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_reads_files_written_by_torch(tmp_path, fmt):
    state = _torch_state()
    path = str(tmp_path / f"w.{fmt}")
    if fmt == "bin":
        torch.save(state, path)
    else:
        torch_save_safetensors({k: v.contiguous() for k, v in state.items()}, path)
    loaded = load_weights(path)
    assert set(loaded) == set(state)
    for k, t in state.items():
        exp = _expected(t)
        assert loaded[k].shape == exp.shape, k
        np.testing.assert_array_equal(loaded[k], exp, err_msg=k)


def test_torch_pickle_nested_state_dict_and_parameters(tmp_path):
    lin = torch.nn.Linear(3, 2)
    path = str(tmp_path / "ckpt.pt")
    torch.save({"state_dict": lin.state_dict()}, path)
    loaded = load_weights(path)
    np.testing.assert_array_equal(loaded["weight"], lin.weight.detach().numpy())


def test_torch_pickle_refuses_code(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.bin")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsError, match=r"evil\.bin: torch pickle refers to (posix|os)\.system"):   # names the file
        load_weights(path)


@pytest.mark.parametrize("dtype", [None, "fp32", "fp16", "bf16"])
def test_safetensors_roundtrip_and_torch_reads_ours(tmp_path, dtype):
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    state = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b.c": np.arange(5, dtype=np.int64)}
    path = str(tmp_path / "x.safetensors")
    save_safetensors(state, path, metadata={"ss_network_dim": 4}, dtype=dtype)
    tensors, dtypes, meta = read_safetensors(path)
    assert meta == {"ss_network_dim": "4"}
    assert dtypes["b.c"] == "I64"
    np.testing.assert_array_equal(tensors["b.c"], state["b.c"])
    theirs = load_file(path)
    np.testing.assert_array_equal(theirs["a"].float().numpy(), tensors["a"].astype(np.float32))
    tol = {None: 0, "fp32": 0, "fp16": 1e-3, "bf16": 1e-2}[dtype]
    np.testing.assert_allclose(tensors["a"], state["a"], rtol=tol, atol=tol)


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 100
    ours = bf16_bits_to_float32(float32_to_bf16_bits(x))
    theirs = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_truncated_and_missing_files_name_the_file(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_safetensors({"a": np.ones((64, 64), np.float32)}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="w.safetensors.*truncated"):
        load_weights(path)
    open(path, "wb").write(b"\x01")
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(path)
    bin_path = str(tmp_path / "w.bin")
    torch.save({"a": torch.ones(100)}, bin_path)
    blob = open(bin_path, "rb").read()
    open(bin_path, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(WeightsError, match="w.bin"):
        load_weights(bin_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(str(tmp_path / "nope.safetensors"))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "keep.safetensors")
    save_safetensors({"a": np.zeros(3, np.float32)}, path)
    before = open(path, "rb").read()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_safetensors({"a": np.ones(3, np.float32)}, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]
