"""`org/name` resolves in a fake local HuggingFace cache, by branch, tag and commit, with no network."""
import os
import shutil
import socket

import pytest

from jdiffusion_lora.hub import hub_cache_dirs, resolve_model
from jdiffusion_lora.tiny import tiny_model_path

MAIN = "a" * 40
OLD = "b" * 40


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def fake_cache(root):
    repo = os.path.join(root, "models--org--name")
    for commit in (MAIN, OLD):
        shutil.copytree(tiny_model_path(), os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    for ref, commit in (("main", MAIN), ("v1.0", OLD)):
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit + "\n")
    return repo


def test_hf_home_and_hub_cache_order(tmp_path, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hub_cache_dirs() == [str(tmp_path / "home" / "hub")]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hub_cache_dirs()[0] == str(tmp_path / "hc")


def test_resolves_by_name_and_revision_without_network(tmp_path, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    repo = fake_cache(str(tmp_path / "hub"))
    assert resolve_model("org/name") == os.path.join(repo, "snapshots", MAIN)
    assert resolve_model("org/name", revision="v1.0") == os.path.join(repo, "snapshots", OLD)
    assert resolve_model("org/name", revision=OLD) == os.path.join(repo, "snapshots", OLD)
    assert resolve_model("org/name", revision=OLD[:10]) == os.path.join(repo, "snapshots", OLD)
    # the loaders take the repo id
    from jdiffusion_lora import StableDiffusionPipeline, UNet2DConditionModel
    pipe = StableDiffusionPipeline.from_pretrained("org/name", revision="v1.0")
    assert pipe.unet.config.block_out_channels
    assert UNet2DConditionModel.from_pretrained("org/name", subfolder="unet").config == pipe.unet.config
    from jdiffusion_lora import CLIPTokenizer, DDIMScheduler
    assert CLIPTokenizer.from_pretrained("org/name", subfolder="tokenizer").encode("a cat") == \
        pipe.tokenizer.encode("a cat")
    assert DDIMScheduler.from_pretrained("org/name", subfolder="scheduler").config == pipe.scheduler.config


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("stabilityai/stable-diffusion-2-1")
    msg = str(e.value)
    assert os.path.join(str(tmp_path / "hc"), "models--stabilityai--stable-diffusion-2-1", "refs", "main") in msg
    assert os.path.join(str(tmp_path / "home"), "hub", "models--stabilityai--stable-diffusion-2-1") in msg
    assert "nothing is downloaded" in msg


def test_cli_model_takes_repo_id(tmp_path, monkeypatch, no_network, capsys):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    fake_cache(str(tmp_path / "hub"))
    from jdiffusion_lora.cli import main
    rc = main(["txt2img", "--model", "org/name", "--steps", "1", "--num-images", "1", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert os.listdir(tmp_path / "out")
