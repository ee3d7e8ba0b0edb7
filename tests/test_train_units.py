"""Trainer building blocks without a model: config, data, captions, noise, objective, schedules,
TensorBoard records, checkpoint atomicity."""
import math
import os
import warnings

import numpy as np
import pytest
from PIL import Image

import jdiffusion_lora  # noqa: F401  (configures Jittor first)
from jdiffusion_lora.train import captions as cap
from jdiffusion_lora.train.checkpoint import latest_checkpoint, list_checkpoints, write_checkpoint, save_training_state
from jdiffusion_lora.train.config import ConfigError, TrainConfig, build_config, to_toml
from jdiffusion_lora.train.data import DataError, SampleOrder, discover, load_rgb, pixels
from jdiffusion_lora.train.noise import draw_noise, draw_timestep, perlin_noise, pyramid_noise
from jdiffusion_lora.train.objective import min_snr_weights
from jdiffusion_lora.train.optim import lr_lambda
from jdiffusion_lora.train.tfevents import EventWriter, crc32c, read_events

from train_fixtures import SEED_STYLE_00, make_competition_style, random_image


# ---------------------------------------------------------------------------- config

def test_config_toml_tables_cli_override_and_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 5\n[optim]\nlearning_rate = 3e-4\nlr_scheduler = "cosine"\n'
                    '[data]\nstyles = ["00", "01"]\nflip_p = 0.0\n')
    c = build_config(str(path), {"learning_rate": "1e-5", "styles": "02,03", "tensorboard": "false"})
    assert (c.seed, c.learning_rate, c.lr_scheduler, c.styles, c.flip_p, c.tensorboard) == \
        (5, 1e-5, "cosine", ["02", "03"], 0.0, False)
    (tmp_path / "back.toml").write_text(to_toml(c))
    assert build_config(str(tmp_path / "back.toml")) == c


@pytest.mark.parametrize("text, message", [
    ("learning_rat = 1e-4", "did you mean 'learning_rate'"),
    ("optimizer = 'Lion'", "optimizer must be one of"),
    ("max_train_steps = 1.5", "max_train_steps must be int"),
    ("[a]\nseed = 1\n[b]\nseed = 2", "set twice"),
    ("adaptive_lr = true\nloraplus_ratio = 16.0", "not both"),
])
def test_config_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(str(path))


def test_every_option_is_on_the_command_line():
    import argparse
    from jdiffusion_lora.cli.train import add_parser
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--min-snr-gamma", "5", "--no-tensorboard", "--unet-targets", "to_q,to_k"])
    from jdiffusion_lora.train.config import overrides_from_args
    over = overrides_from_args(args)
    assert over == {"min_snr_gamma": "5", "tensorboard": False, "unet_targets": "to_q,to_k"}
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in parser._subparsers._group_actions[0].choices["train"].format_help()


# ---------------------------------------------------------------------------- captions

def seed_caption(trigger_prompt, style_tags, item_tags, name, flip, permutation):
    """The seed's string operations (train_joint_pack3_3.py), with its random.shuffle replaced by
    a given permutation of the comma-separated pieces."""
    prompt = item_tags + ", " + name
    if flip:
        prompt += ",horizontal_flip"
    prompt = prompt.replace("  ", " ")
    pieces = prompt.split(",")
    body = ",".join(pieces[i] for i in permutation)
    prompt = trigger_prompt + "," + style_tags + "," + body
    return prompt.replace("  ", " ").replace(",,", ",").replace(", ", ",")


@pytest.mark.parametrize("flip", [False, True])
def test_caption_is_the_seeds_form(flip):
    opts = cap.CaptionOptions()
    for k in range(20):
        rng = np.random.default_rng(k)
        parts = cap.caption_parts("style_00", cap.split_tags(SEED_STYLE_00["style"]),
                                  cap.split_tags(SEED_STYLE_00["item"]["apple"]), "apple", flip)
        text = cap.render_caption(parts, opts, rng)
        perm = np.random.default_rng(k)
        perm.random()  # the dropout draw comes first
        order = list(perm.permutation(len(parts.body)))
        assert text == seed_caption("style_00", SEED_STYLE_00["style"], SEED_STYLE_00["item"]["apple"], "apple",
                                    flip, order)
        assert text.startswith("style_00,purple,lineart,dark_background,") and " " not in text


def test_caption_augmentations():
    parts = cap.caption_parts("style_01", ["a", "b"], ["t1", "t2", "t3", "t4"], "stem", True)
    base = cap.CaptionOptions(shuffle_item_tags=False)
    rng = lambda: np.random.default_rng(3)
    assert cap.render_caption(parts, base, rng()) == "style_01,a,b,t1,t2,t3,t4,stem,horizontal_flip"
    # tag dropout never drops the head or the flip tag
    dropped = cap.render_caption(parts, cap.CaptionOptions(shuffle_item_tags=False, caption_tag_dropout_rate=0.99),
                                 rng())
    assert dropped == "style_01,a,b,horizontal_flip"
    # kohya shuffle keeps the first keep_tokens
    for k in range(10):
        text = cap.render_caption(parts, cap.CaptionOptions(shuffle_caption=True, keep_tokens=1),
                                  np.random.default_rng(k))
        assert text.startswith("style_01,") and sorted(text.split(",")) == sorted(
            "style_01,a,b,t1,t2,t3,t4,stem,horizontal_flip".split(","))
    # caption dropout: every 2nd epoch, or by rate
    every = cap.CaptionOptions(caption_dropout_every_n_epochs=2)
    assert cap.render_caption(parts, every, rng(), epoch=2) == ""
    assert cap.render_caption(parts, every, rng(), epoch=3) != ""
    assert cap.render_caption(parts, cap.CaptionOptions(caption_dropout_rate=1.0), rng()) == ""
    # token warmup: 1 shuffleable tag at step 0, all at the end of warmup
    warm = cap.CaptionOptions(shuffle_item_tags=False, token_warmup_min=1, token_warmup_step=10)
    assert cap.render_caption(parts, warm, rng(), step=0) == "style_01,a,b,t1"
    assert cap.render_caption(parts, warm, rng(), step=10).endswith("horizontal_flip")
    # prefix / suffix
    p2 = cap.caption_parts("style_01", ["a"], ["t"], None, False, prefix="best, high", suffix="end")
    assert cap.render_caption(p2, base, rng()) == "best,high,style_01,a,t,end"


# ---------------------------------------------------------------------------- data

def _cfg(root, **kw):
    return build_config(None, dict(data_root=str(root), resolution=32, **kw))


def test_discover_competition_and_plain_layouts(tmp_path):
    make_competition_style(tmp_path / "comp", "00", ["apple", "ball"], SEED_STYLE_00)
    data = discover(_cfg(tmp_path / "comp"))
    assert [s.trigger for s in data.styles] == ["style_00"]
    rec = data.records[0]
    assert (rec.stem, rec.item_tags) == ("apple", ["apple", "fruit"])
    assert data.styles[0].style_tags == ["purple", "lineart", "dark_background"]

    plain = tmp_path / "plain" / "mystyle"
    plain.mkdir(parents=True)
    random_image(str(plain / "a.png"))
    (plain / "a.txt").write_text("a red car, street")
    random_image(str(plain / "b.jpg"))
    data = discover(_cfg(tmp_path / "plain"))
    assert data.styles[0].layout == "folder" and data.styles[0].trigger == "style_mystyle"
    assert [r.caption for r in data.records] == ["a red car, street", None]


def test_bad_input_policy(tmp_path):
    root = tmp_path / "d"
    make_competition_style(root, "00", ["good", "small"], prompts=None)
    images = root / "00" / "images"
    (images / "empty.png").write_bytes(b"")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    random_image(str(images / "small.png"), size=(16, 24))
    random_image(str(images / "gray.png"), size=(40, 40), mode="L")
    random_image(str(images / "rgba.png"), size=(40, 40), mode="RGBA")
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(images / "deep.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # notes are returned (and printed once by the caller), not warned
        data = discover(_cfg(root))
    notes = " ".join(data.warnings)
    assert "empty.png: the file is empty" in notes and "broken.png: cannot be read" in notes
    assert "small.png: 16x24 is smaller than the training resolution 32; upscaled" in notes
    assert "prompt.json is missing" in notes
    assert sorted(r.stem for r in data.records) == ["deep", "good", "gray", "rgba", "small"]
    for rec in data.records:   # every mode loads as 8-bit RGB and crops to the resolution
        arr = pixels(load_rgb(rec.path), 32, (0, 0), False)
        assert arr.shape == (3, 32, 32) and arr.dtype == np.float32 and -1 <= arr.min() <= arr.max() <= 1
    deep = np.asarray(load_rgb(str(images / "deep.png")))
    assert deep.max() > 200 and deep.min() == 0   # 16-bit scaled, not clipped to 255
    with pytest.raises(DataError, match="broken.png"):
        discover(_cfg(root, bad_image_policy="error"))
    with pytest.raises(DataError, match="small.png.*small_image_policy"):
        discover(_cfg(root, small_image_policy="error"))


def test_bad_datasets_refuse_to_start(tmp_path):
    make_competition_style(tmp_path, "00", ["a"])
    os.makedirs(tmp_path / "01" / "images")
    with pytest.raises(DataError, match="style 01 has no images"):
        discover(_cfg(tmp_path))
    with pytest.raises(DataError, match=r"style\(s\) 07 that do not exist .*found: 00, 01"):
        discover(_cfg(tmp_path, styles=["00", "07"]))
    (tmp_path / "00" / "tag.json").write_text("{not json")
    with pytest.raises(DataError, match="00/tag.json: tag.json is not valid JSON"):
        discover(_cfg(tmp_path, styles=["00"]))
    with pytest.raises(DataError, match="data_root not found"):
        discover(_cfg(tmp_path / "nowhere"))


def test_sample_order_is_without_replacement_and_reshuffled():
    order = SampleOrder(7, seed=1)
    passes = [[order(p * 7 + i)[1] for i in range(7)] for p in range(3)]
    for p in passes:
        assert sorted(p) == list(range(7))
    assert passes[0] != passes[1]
    assert order(15) == (2, passes[2][1])


# ---------------------------------------------------------------------------- noise, objective, schedules

def test_noise_options():
    c = TrainConfig(noise_offset=0.1, multires_noise_iterations=6, multires_noise_discount=0.4,
                    perlin_noise_octaves=3)
    n = draw_noise(np.random.default_rng(0), (4, 16, 16), c)
    assert n.shape == (4, 16, 16) and n.dtype == np.float32 and abs(n.std() - 1) < 1e-3
    # pyramid noise is spatially correlated
    p = pyramid_noise(np.random.default_rng(1), np.zeros((4, 32, 32), np.float32), 6, 0.8)
    neighbours = np.corrcoef(p[:, :, :-1].ravel(), p[:, :, 1:].ravel())[0, 1]
    assert neighbours > 0.2   # white noise: ~0
    f = perlin_noise(np.random.default_rng(2), (2, 32, 32), octaves=3, persistence=0.5)
    assert np.allclose(f.mean(axis=(1, 2)), 0, atol=1e-5) and np.allclose(f.std(axis=(1, 2)), 1, atol=1e-4)
    assert np.corrcoef(f[:, :, :-1].ravel(), f[:, :, 1:].ravel())[0, 1] > 0.8
    same = draw_noise(np.random.default_rng(0), (4, 16, 16), c)
    assert np.array_equal(n, same)


def test_timestep_sampling():
    c = TrainConfig(timestep_min=100, timestep_max=300)
    ts = [draw_timestep(np.random.default_rng(i), c, 1000) for i in range(500)]
    assert min(ts) >= 100 and max(ts) < 300
    c = TrainConfig(timestep_sampling="logit_normal")
    ts = np.array([draw_timestep(np.random.default_rng(i), c, 1000) for i in range(2000)])
    assert 0 <= ts.min() and ts.max() < 1000 and abs(np.median(ts) - 500) < 40
    assert (np.abs(ts - 500) < 250).mean() > 0.6   # more mass in the middle than uniform (0.5)


def test_min_snr_weights():
    from jdiffusion_lora.schedulers import DDPMScheduler
    a = np.asarray(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod,
                   dtype=np.float64)
    t = np.array([0, 100, 500, 999])
    snr = a[t] / (1 - a[t])
    np.testing.assert_allclose(min_snr_weights(a, t, 5.0, "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-6)
    np.testing.assert_allclose(min_snr_weights(a, t, 5.0, "v_prediction"), np.minimum(snr, 5) / (snr + 1), rtol=1e-6)
    assert np.all(min_snr_weights(a, t, 0.0, "epsilon") == 1)


def test_lr_schedules_match_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.optimization import get_scheduler
    for name in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.5)
        sched = get_scheduler(name, opt, num_warmup_steps=10, num_training_steps=100, num_cycles=3, power=2.0)
        ours = lr_lambda(name, 10, 100, num_cycles=3, power=2.0, lr_init=0.5)
        for step in range(105):
            assert math.isclose(opt.param_groups[0]["lr"], 0.5 * ours(step), rel_tol=1e-9, abs_tol=1e-12), (name, step)
            opt.step()
            sched.step()


# ---------------------------------------------------------------------------- TensorBoard records

def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_tfevents_readable_by_tensorboard(tmp_path):
    w = EventWriter(str(tmp_path / "tb"))
    for step in range(1, 6):
        w.add_scalars(step, {"train/loss": 1.0 / step, "train/lr": 1e-4})
    img = Image.new("RGB", (8, 6), "red")
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    w.add_image(5, "samples", buf.getvalue(), 6, 8)
    w.close()
    events = read_events(w.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["scalars"].get("train/loss") for e in events[1:6]] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert events[-1]["images"] == ["samples"]
    # a flipped byte is caught by the CRC
    data = bytearray(open(w.path, "rb").read())
    data[30] ^= 1
    bad = tmp_path / "bad" / "events.out.tfevents.0.x"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_events(str(bad))
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return  # the hand-written reader above is the check
    acc = EventAccumulator(w.path, size_guidance={"images": 10})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == [1, 2, 3, 4, 5]
    assert [s.value for s in loss] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert acc.Images("samples")[0].width == 8


# ---------------------------------------------------------------------------- checkpoints

def _write_state(step):
    def write(folder):
        save_training_state(folder, {"step": step}, {"w": np.full(3, step, np.float32)}, {}, {})
    return write


def test_checkpoints_atomic_and_pruned(tmp_path):
    out = str(tmp_path)
    for step in (10, 20, 30):
        write_checkpoint(out, step, _write_state(step), keep_last=2)
    root = os.path.join(out, "checkpoints")
    assert list_checkpoints(root) == ["checkpoint-000020", "checkpoint-000030"]
    assert latest_checkpoint(out).endswith("checkpoint-000030")

    def crash(folder):
        _write_state(40)(folder)
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_checkpoint(out, 40, crash, keep_last=2)
    assert latest_checkpoint(out).endswith("checkpoint-000030")
    assert sorted(os.listdir(root)) == ["checkpoint-000020", "checkpoint-000030", "latest"]


# ---------------------------------------------------------------------------- optimizer

@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
@pytest.mark.parametrize("kind", ["AdamW", "Adam", "SGD"])
def test_optimizer_matches_torch_and_its_state_round_trips(kind):
    """Jittor's optimizers driven by our gradients: the same updates as torch.optim (PyTorch's AdamW
    defaults, per-group learning rates), and saving/restoring the state continues identically."""
    torch = pytest.importorskip("torch")
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.train.optim import Optimizer
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((5,)).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(6)]
    c = TrainConfig(optimizer=kind, learning_rate=1e-2, momentum=0.9 if kind == "SGD" else 0.0)

    def ours(steps, restore=None):
        ps = [jt.array(a) for a in init]
        groups = [{"name": "a", "params": [ps[0]], "param_names": ["a"], "lr": 1e-2, "initial_lr": 1e-2},
                  {"name": "b", "params": [ps[1]], "param_names": ["b"], "lr": 3e-2, "initial_lr": 3e-2}]
        opt = Optimizer(groups, c)
        if restore:
            values, state, count = restore
            for p, v in zip(ps, values):
                p.update(jt.array(v))
            opt.load_state_arrays(state, count)
        for g in steps:
            opt.step([jt.array(x) for x in g])
        return [p.numpy() for p in ps], opt.state_arrays(), opt.step_count

    tp = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    groups = [{"params": [tp[0]], "lr": 1e-2}, {"params": [tp[1]], "lr": 3e-2}]
    if kind == "AdamW":
        topt = torch.optim.AdamW(groups, lr=1e-2)
    elif kind == "Adam":
        topt = torch.optim.Adam(groups, lr=1e-2, weight_decay=1e-2)
    else:
        topt = torch.optim.SGD(groups, lr=1e-2, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        for p, x in zip(tp, g):
            p.grad = torch.from_numpy(x.copy())
        topt.step()
    full, _, _ = ours(grads)
    for a, b in zip(full, tp):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5, atol=1e-6)
    half = ours(grads[:3])
    resumed, _, count = ours(grads[3:], restore=half)
    assert count == 6
    for a, b in zip(full, resumed):
        assert np.array_equal(a, b)


def test_frozen_base_stays_frozen_through_eval_and_train():
    """Jittor's Module.eval() records each parameter's grad state once and train() restores it: a model that
    was in eval mode before freeze_base must not get its base weights back as trainable at the next train()
    (they would keep every activation alive and bypass the lean backward)."""
    from jdiffusion_lora import jt
    from jdiffusion_lora.lora import AdapterConfig, inject_adapter, lora_parameters
    from jdiffusion_lora.models.layers import Attention
    from jdiffusion_lora.train.adapters import freeze_base

    class Block(jt.nn.Module):
        def __init__(self):
            self.attn = Attention(8, heads=2, dim_head=4)

    model = Block()
    model.eval()                                   # e.g. a pipeline that sampled before training started
    model.train()
    inject_adapter(model, config=AdapterConfig(rank=2), targets=["to_q"])
    assert freeze_base([model]) == len(model.parameters())
    for _ in range(2):
        model.eval()
        model.train()
    assert all(p.is_stop_grad() for p in model.parameters())
    assert not any(p.is_stop_grad() for p in lora_parameters(model))
