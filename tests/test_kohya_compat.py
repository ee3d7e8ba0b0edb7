"""kohya sd-scripts / diffusers-example names, kohya's sample-prompt files, and the metadata A1111 and
ComfyUI show in a LoRA file (ss_*, sshs_* hashes computed as kohya does, modelspec.*)."""
import hashlib
import json
import os

import numpy as np
import pytest

from jdiffusion_lora.cli import main
from jdiffusion_lora.train.config import ConfigError, build_config
from jdiffusion_lora.train.sample_prompts import SamplePrompt, parse_line, read_prompt_file

# The seed's recipe (configs/seed.toml: 28 styles x rank 32) as kohya's train_network.py spells it ...
KOHYA_ARGS = [
    "--pretrained_model_name_or_path", "/models/stable-diffusion-2-1", "--train_data_dir", "data/B",
    "--output_dir", "outputs/seed_pack28", "--output_name", "seed_pack28", "--network_module", "networks.lora",
    "--network_dim", "896", "--network_alpha", "896", "--network_dropout", "0.1",
    "--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999", "eps=1e-8",
    "--learning_rate", "1e-5", "--lr_scheduler", "constant", "--train_batch_size", "1",
    "--max_train_steps", "40000", "--save_every_n_steps", "4000", "--mixed_precision", "no",
    "--save_precision", "float", "--seed", "123456", "--resolution", "512,512", "--cache_latents",
    "--flip_aug", "--random_crop", "--v_parameterization", "--max_grad_norm", "0", "--noise_offset", "0.05",
    "--min_snr_gamma", "5", "--sample_prompts", "PROMPTS", "--sample_every_n_steps", "1000", "--xformers",
    "--enable_bucket", "--min_bucket_reso", "256", "--max_bucket_reso", "1024", "--bucket_reso_steps", "64",
    "--bucket_no_upscale",
]
# ... and as ours.
OUR_ARGS = [
    "--base-model", "/models/stable-diffusion-2-1", "--data-root", "data/B", "--output-dir", "outputs/seed_pack28",
    "--output-name", "seed_pack28", "--rank", "896", "--no-pack-rank", "--lora-alpha", "896",
    "--lora-dropout", "0.1", "--optimizer", "AdamW", "--weight-decay", "0.01", "--adam-beta1", "0.9",
    "--adam-beta2", "0.999", "--adam-epsilon", "1e-8", "--learning-rate", "1e-5", "--lr-scheduler", "constant",
    "--train-batch-size", "1", "--max-train-steps", "40000", "--save-every", "4000", "--save-dtype", "fp32",
    "--seed", "123456", "--resolution", "512", "--cache-latents", "memory", "--flip-p", "0.5", "--crop", "random",
    "--prediction-type", "v_prediction", "--max-grad-norm", "0", "--noise-offset", "0.05", "--min-snr-gamma", "5",
    "--sample-prompts-file", "PROMPTS", "--sample-every", "1000", "--enable-bucket", "--min-bucket-reso", "256",
    "--max-bucket-reso", "1024", "--bucket-reso-steps", "64", "--bucket-no-upscale",
]

KOHYA_TOML = """
pretrained_model_name_or_path = "/models/stable-diffusion-2-1"
train_data_dir = "data/B"
output_dir = "outputs/seed_pack28"
output_name = "seed_pack28"
network_module = "networks.lora"
network_dim = 896
network_alpha = 896
network_dropout = 0.1
optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.999", "eps=1e-8"]
learning_rate = 1e-5
lr_scheduler = "constant"
train_batch_size = 1
max_train_steps = 40000
save_every_n_steps = 4000
mixed_precision = "no"
save_precision = "float"
seed = 123456
resolution = "512,512"
cache_latents = true
flip_aug = true
random_crop = true
v_parameterization = true
max_grad_norm = 0.0
noise_offset = 0.05
min_snr_gamma = 5.0
sample_prompts = "PROMPTS"
sample_every_n_steps = 1000
xformers = true
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = true
"""


def _printed_config(capsys, argv):
    assert main(["train", *argv, "--print-config"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_kohya_command_line_and_toml_mean_our_options(tmp_path, capsys):
    prompts = str(tmp_path / "prompts.txt")
    kohya = [prompts if a == "PROMPTS" else a for a in KOHYA_ARGS]
    ours = [prompts if a == "PROMPTS" else a for a in OUR_ARGS]
    kohya_out, notes = _printed_config(capsys, kohya)
    ours_out, our_notes = _printed_config(capsys, ours)
    assert kohya_out == ours_out
    assert "rank = 896\n" in ours_out and "pack_rank = false\n" in ours_out and 'output_name = "seed_pack28"' in ours_out
    assert our_notes == ""
    # one note per translated name, naming ours
    for line in ("note: kohya's --network_dim 896 is our rank = 896, pack_rank = false",
                 "note: kohya and diffusers's --pretrained_model_name_or_path /models/stable-diffusion-2-1 is our "
                 "base_model = /models/stable-diffusion-2-1",
                 "note: kohya's --save_every_n_steps 4000 is our save_every = 4000",
                 "note: kohya's --v_parameterization is our prediction_type = v_prediction",
                 "note: --xformers: ignored (attention is Jittor's own)"):
        assert line in notes.splitlines()

    toml = tmp_path / "kohya.toml"
    toml.write_text(KOHYA_TOML.replace("PROMPTS", prompts))
    toml_out, toml_notes = _printed_config(capsys, ["--config_file", str(toml)])
    assert toml_out == ours_out
    assert "note: kohya's cache_latents = true is our cache_latents = 'memory' (none | memory | disk)" in toml_notes


def test_alias_conflicts_and_names_without_equivalent_are_errors(capsys):
    assert main(["train", "--rank", "8", "--network_dim", "16", "--print-config"]) == 2
    assert "--network_dim 16 means rank = 16, but --rank gives rank = 8: keep one" in capsys.readouterr().err
    assert main(["train", "--rank", "16", "--network_dim", "16", "--print-config"]) == 0   # the same value: fine
    capsys.readouterr()
    assert main(["train", "--clip_skip", "2", "--print-config"]) == 2
    assert "clip_skip (a kohya / diffusers option) has no equivalent here" in capsys.readouterr().err
    assert main(["train", "--optimizer_type", "Lion", "--print-config"]) == 2
    assert "optimizer 'Lion' has no equivalent here" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="give one size"):
        build_config(None, {"resolution": "768,512"})
    with pytest.raises(ConfigError, match="keep one"):
        build_config(None, {"sample_prompts": "a.txt", "sample_prompts_file": "b.txt"})


def test_repeated_sample_prompt_flags_keep_commas(capsys):
    out, _ = _printed_config(capsys, ["--sample-prompt", "style_00, a purple cat, lineart",
                                      "--sample-prompt", "a dog"])
    assert 'sample_prompts = ["style_00, a purple cat, lineart", "a dog"]\n' in out
    # the TOML list is read as it is; a TOML string is kohya's prompt file
    assert build_config(None, {"sample_prompts": ["a, b"]}).sample_prompts == ["a, b"]
    c = build_config(None, {"sample_prompts": "prompts.txt"})
    assert c.sample_prompts == [] and c.sample_prompts_file == "prompts.txt"


def test_kohya_prompt_file_means_our_sample_settings(tmp_path):
    lines = ["# a comment line", "",
             "a purple cat, lineart --n blurry, lowres --w 64 --h 96 --d 42 --l 5.5 --s 12",
             "a dog, dark_background",
             "a ring --s 5000 --ss k_euler --N ugly"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    want = [SamplePrompt("a purple cat, lineart", negative_prompt="blurry, lowres", width=64, height=96, seed=42,
                         guidance_scale=5.5, steps=12),
            SamplePrompt("a dog, dark_background"),
            SamplePrompt("a ring", negative_prompt="ugly", steps=1000)]   # steps clamped; --ss ignored
    assert read_prompt_file(str(tmp_path / "p.txt")) == want
    # kohya's .json and .toml prompt files
    (tmp_path / "p.json").write_text(json.dumps([
        {"prompt": "a purple cat, lineart", "negative_prompt": "blurry, lowres", "width": 64, "height": 96,
         "seed": 42, "scale": 5.5, "sample_steps": 12}, "a dog, dark_background", "a ring --s 5000 --N ugly"]))
    assert read_prompt_file(str(tmp_path / "p.json")) == want
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 64\nheight = 96\n[[prompt.subset]]\nprompt = "a cat"\n'
                                     'seed = 1\n[[prompt.subset]]\nprompt = "a dog"\nwidth = 32\n')
    assert read_prompt_file(str(tmp_path / "p.toml")) == [SamplePrompt("a cat", width=64, height=96, seed=1),
                                                          SamplePrompt("a dog", width=32, height=96)]
    with pytest.raises(ValueError, match=r"p.txt line 1: --w 'wide' is not a number"):
        (tmp_path / "p.txt").write_text("a cat --w wide\n")
        read_prompt_file(str(tmp_path / "p.txt"))
    assert parse_line("x --d 7").seed == 7


# ---------------------------------------------------------------------------- hashes and metadata

def _kohya_hashes(file_bytes: bytes):
    """sd-scripts' addnet_hash_safetensors / addnet_hash_legacy on a file's bytes (re-stated here)."""
    n = int.from_bytes(file_bytes[:8], "little")
    model = hashlib.sha256(file_bytes[8 + n:]).hexdigest()
    legacy = hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_addnet_hashes_equal_kohyas_on_the_safetensors_library_bytes(dtype):
    import safetensors.numpy
    from jdiffusion_lora.lora.metadata import addnet_hashes
    rng = np.random.default_rng(0)
    # over 1 MiB, so the legacy hash reads real data; mixed dtypes and names test the library's order
    tensors = {f"lora_unet_block_{i}.lora_down.weight": rng.standard_normal((64, 640)).astype(np.float32)
               for i in range(16)}
    tensors.update({f"lora_unet_block_{i}.alpha": np.array(4.0, np.float32) for i in range(16)})
    tensors["counter"] = np.arange(5, dtype=np.int64)
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"00": {"紫": 3}}, ensure_ascii=False),
                "modelspec.title": "not hashed", "sshs_model_hash": "old"}
    ref_tensors = {k: (v.astype(np.float16) if dtype == "fp16" and v.dtype == np.float32 else v)
                   for k, v in tensors.items()}
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    reference = _kohya_hashes(safetensors.numpy.save(ref_tensors, ss_only))
    assert addnet_hashes(tensors, metadata, dtype) == reference
    assert reference[1] != hashlib.sha256(b"").hexdigest()[:8]


@pytest.mark.slow
def test_saved_lora_carries_kohya_metadata_and_output_name(tmp_path):
    from jdiffusion_lora.lora.formats import load_lora_state
    from jdiffusion_lora.train.trainer import Trainer
    from jdiffusion_lora.weights import read_safetensors
    from train_fixtures import config, tiny_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("style_00, a cat --w 32 --h 48 --s 2 --d 5 --l 3 --n ugly\nstyle_00, a dog --s 2\n")
    c = config(tmp_path, max_train_steps=2, save_formats=["kohya", "diffusers"], output_name="purple_style",
               sample_every=2, sample_prompts_file=str(prompts))
    pipe = tiny_pipeline()
    calls = []
    real_call = type(pipe).__call__

    def recording_call(self, *args, **kwargs):
        calls.append(kwargs)
        return real_call(self, *args, **kwargs)

    pipe.__class__ = type("RecordingPipeline", (type(pipe),), {"__call__": recording_call})
    result = Trainer(c, pipeline=pipe, printer=lambda *_: None).run()
    assert [os.path.basename(p) for p in result.lora_files] == ["purple_style.safetensors",
                                                               "purple_style_diffusers.safetensors"]
    # the prompt file's settings reached the sampler: one call per distinct (size, steps, guidance)
    assert [(k["width"], k["height"], k["num_inference_steps"], k["guidance_scale"], k["seed"],
             k["negative_prompt"]) for k in calls] == [(32, 48, 2, 3.0, [5], ["ugly"]),
                                                     (32, 32, 2, c.sample_guidance, [c.sample_seed + 1], [""])]
    assert os.path.isfile(result.samples[-1])

    for path in result.lora_files:
        _, _, meta = read_safetensors(path)
        for key in ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_base_model_version", "ss_v2",
                    "ss_tag_frequency", "ss_output_name", "ss_resolution", "ss_seed", "ss_learning_rate",
                    "ss_max_train_steps", "ss_steps", "ss_num_train_images", "ss_training_started_at",
                    "ss_dataset_dirs", "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec",
                    "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type"):
            assert key in meta, key
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
        assert meta["ss_output_name"] == "purple_style" and meta["ss_resolution"] == "(32, 32)"
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.title"] == "purple_style" and meta["modelspec.resolution"] == "32x32"
        # tag counts of the captions as written (each image once): demo style 00 has 3 images
        freq = json.loads(meta["ss_tag_frequency"])
        assert list(freq) == ["00"] and freq["00"]["style_00"] == 3
        with open(path, "rb") as f:
            model_hash, _ = _kohya_hashes(f.read())
        assert meta["sshs_model_hash"] == model_hash       # only ss_* metadata differs: same tensor bytes
        assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]   # a file under 1 MiB
        assert load_lora_state(path).modules     # still loads


def test_no_alias_shadows_one_of_our_options():
    from jdiffusion_lora.train.aliases import ALIASES, IGNORED, NO_EQUIVALENT
    from jdiffusion_lora.train.config import FIELD_TYPES
    assert not [n for n in [*ALIASES, *IGNORED, *NO_EQUIVALENT] if n in FIELD_TYPES]
