"""The training loop on the tiny random model (CPU): learning, resume, accumulation, clipping,
learning-rate groups, packs, dry run, NaN handling, signals."""
import io
import json
import os
import signal
from contextlib import redirect_stdout

import numpy as np
import pytest

import jdiffusion_lora  # noqa: F401  (configures Jittor first)
from jdiffusion_lora.train import adapters as ad
from jdiffusion_lora.train.batches import augment
from jdiffusion_lora.train.objective import NonFiniteLoss
from jdiffusion_lora.train.sampling import fixed_loss
from jdiffusion_lora.train.trainer import Trainer
from jdiffusion_lora.weights import load_weights

from train_fixtures import SEED_STYLE_00, config, make_competition_style, tiny_pipeline

# Attention LoRA plus conv_in / conv_out: enough capacity for a random UNet to fit in a few dozen steps.
LEARN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out"]

NOISE_AND_LOSS_OPTIONS = dict(noise_offset=0.05, multires_noise_iterations=3, perlin_noise_octaves=2,
                              input_perturbation=0.1, min_snr_gamma=5.0, loss_type="huber",
                              timestep_sampling="logit_normal", timestep_min=100, timestep_max=900,
                              caption_dropout_rate=0.5, shuffle_caption=True, keep_tokens=1)


def adapter_arrays(trainer):
    return ad.adapter_arrays(trainer.pairs)


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_on_training_images_falls(tmp_path, prediction_type):
    c = config(tmp_path, prediction_type=prediction_type, unet_targets=LEARN_TARGETS, learning_rate=2e-2,
               max_train_steps=30, flip_p=0.0, max_grad_norm=0.0)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    t.setup()
    before = fixed_loss(t, t.records, seed=1, repeats=4)
    result = t.run()
    after = fixed_loss(t, t.records, seed=1, repeats=4)
    assert t.noise_scheduler.config.prediction_type == prediction_type
    assert result.step == 30 and os.path.isfile(result.lora_files[0])
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 steps: adapter weights, optimizer state and EMA
    bit-identical (dropout, flips, caption shuffles, text-encoder LoRA, cosine warmup all in play)."""
    common = dict(max_train_steps=6, lora_dropout=0.2, text_encoder_targets=["q_proj", "v_proj"],
                  lr_scheduler="cosine", lr_warmup_steps=2, ema_decay=0.9, train_batch_size=2,
                  caption_tag_dropout_rate=0.3, styles=["00", "01"])
    straight = Trainer(config(tmp_path / "a", **common), pipeline=tiny_pipeline(), printer=lambda s: None)
    straight.run()

    first = Trainer(config(tmp_path / "b", **common), pipeline=tiny_pipeline(), printer=lambda s: None)
    half = first.run(until=3)
    assert half.stopped == "until" and half.checkpoint.endswith("checkpoint-000003")
    second = Trainer(config(tmp_path / "b", resume="latest", **common), pipeline=tiny_pipeline(),
                     printer=lambda s: None)
    second.run()
    assert second.start_step == 3
    a, b = adapter_arrays(straight), adapter_arrays(second)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_arrays(), second.optimizer.state_arrays()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    for ea, eb in zip(straight.ema, second.ema):
        assert np.array_equal(ea.numpy(), eb.numpy())
    # the metrics file describes one run: steps 1..6 once each
    steps = [json.loads(line)["step"] for line in open(os.path.join(second.c.output_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6]


def _one_sgd_step(tmp_path, **kw):
    c = config(tmp_path, optimizer="SGD", learning_rate=1.0, weight_decay=0.0, max_train_steps=1, flip_p=0.5,
               **kw)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    t.setup()
    before = adapter_arrays(t)
    metrics = t.train_step(0)
    after = adapter_arrays(t)
    return {k: after[k] - before[k] for k in before}, metrics


@pytest.mark.slow
def test_accumulation_equals_one_big_batch(tmp_path):
    """SGD with lr 1 makes the update equal to minus the gradient: 3 micro-batches of 1 == one batch of 3."""
    big, _ = _one_sgd_step(tmp_path / "big", train_batch_size=3, max_grad_norm=0.0)
    acc, _ = _one_sgd_step(tmp_path / "acc", train_batch_size=1, gradient_accumulation_steps=3, max_grad_norm=0.0)
    one, _ = _one_sgd_step(tmp_path / "one", train_batch_size=1, max_grad_norm=0.0)
    scale = max(np.abs(v).max() for v in big.values())
    assert scale > 0
    for k in big:
        np.testing.assert_allclose(acc[k], big[k], atol=1e-5 * scale, rtol=1e-4)
    assert max(np.abs(one[k] - big[k]).max() for k in big) > 1e-3 * scale   # a different batch differs


def test_clipping_bounds_the_global_norm(tmp_path):
    update, metrics = _one_sgd_step(tmp_path, max_grad_norm=1e-3)
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values()))
    assert metrics["grad_norm"] > 1e-2
    assert norm == pytest.approx(1e-3, rel=1e-3)


def test_learning_rate_of_every_parameter(tmp_path):
    """Adaptive LR (up and down), LoRA+ and separate UNet / text-encoder rates, group by group."""
    c = config(tmp_path, rank=4, learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=5e-5, adaptive_lr=True,
               text_encoder_targets=["q_proj"], unet_targets=["to_q", "to_k"])
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    t.setup()
    lr_of = {name: g["lr"] for g in t.groups for name in g["param_names"]}
    listing = []
    for pair in t.pairs:
        base = 2e-4 if pair.component == "unet" else 5e-5
        up = base * max(1.0, np.sqrt(pair.out_features / pair.rank))
        assert lr_of[pair.name + ".lora_A.weight"] == pytest.approx(base)
        assert lr_of[pair.name + ".lora_B.weight"] == pytest.approx(up)
        listing.append(f"{pair.name}: out {pair.out_features} in {pair.in_features} -> A {base:g}, B {up:.4g}")
    print("\n".join(listing))
    assert len(lr_of) == 2 * len(t.pairs) and {p.component for p in t.pairs} == {"unet", "text_encoder"}
    # widths 32 and 64, rank 4: B gets 2.83x or 4x; the cross-attention to_k (out 32, in 64) too
    assert sorted({round(g["lr"] / 2e-4, 3) for g in t.groups if g["name"].startswith("unet")}) == [1.0, 2.828, 4.0]

    down = Trainer(config(tmp_path / "d", rank=4, adaptive_lr=True, adaptive_lr_matrix="down",
                          unet_targets=["attn2.to_k"]), pipeline=tiny_pipeline(), printer=lambda s: None)
    down.setup()
    for g in down.groups:
        for name in g["param_names"]:
            pair = next(p for p in down.pairs if name.startswith(p.name + "."))
            want = 1e-3 * (np.sqrt(pair.in_features / 4) if name.endswith("lora_A.weight") else 1.0)
            assert g["lr"] == pytest.approx(want), name

    plus = Trainer(config(tmp_path / "p", loraplus_ratio=16.0), pipeline=tiny_pipeline(), printer=lambda s: None)
    plus.setup()
    assert sorted(g["lr"] for g in plus.groups) == pytest.approx([1e-3, 16e-3])


def test_pack_of_three_styles(tmp_path):
    c = config(tmp_path, styles=[], rank=2, max_train_steps=2, flip_p=0.5)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    result = t.run()
    assert [s.name for s in t.data.styles] == ["00", "01", "02"]
    assert {p.rank for p in t.pairs} == {6}
    saved = load_weights(result.lora_files[0])
    downs = [v for k, v in saved.items() if k.endswith("lora_A.weight")]
    assert downs and {v.shape[0] for v in downs} == {6}
    seen = {}
    for i in range(45):   # five passes over the 9 images
        aug = augment(c, t.data, t.records, t.order, t.caption_options, i, 0)
        trigger = f"style_{aug.record.style}"
        assert aug.caption.split(",")[0] == trigger
        assert all(f"style_{s}" not in aug.caption for s in ("00", "01", "02") if s != aug.record.style)
        seen.setdefault(aug.record.style, set()).add(aug.record.stem)
    assert {k: len(v) for k, v in seen.items()} == {"00": 3, "01": 3, "02": 3}


def test_dry_run_prints_the_seed_captions(tmp_path):
    from jdiffusion_lora.train.dry_run import dry_run
    root = tmp_path / "B_dataset"
    make_competition_style(str(root), "00", ["apple", "ball", "glasses"], SEED_STYLE_00, size=(64, 64))
    c = config(tmp_path, data_root=str(root), styles=[], rank=4, max_train_steps=10, save_every=5)
    buf = io.StringIO()
    with redirect_stdout(buf):
        dry_run(c)
    text = buf.getvalue()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("00/")]
    assert len(lines) == 3
    for line in lines:
        head, caption = line.split(": ", 1)
        stem = head.split("/")[1].split(".")[0]
        flipped = "[flipped]" in head
        prefix = "style_00,purple,lineart,dark_background,"
        assert caption.startswith(prefix) and " " not in caption
        body = caption[len(prefix):].split(",")
        want = SEED_STYLE_00["item"][stem].replace(" ", "").split(",") + [stem] + (["horizontal_flip"] if flipped else [])
        assert sorted(body) == sorted(want)
    assert "checkpoints at steps 5, 10" in text and "LoRA on unet: 32 layers, rank 4" in text
    assert "memory estimate" in text and not os.path.exists(c.output_dir)


def test_nan_loss_stops_naming_the_module(tmp_path):
    c = config(tmp_path, max_train_steps=3, save_every=1)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)

    def poison(step, metrics):
        if step == 1:
            pair = t.pairs[5]
            pair.up.update(pair.up * float("nan"))

    with pytest.raises(NonFiniteLoss) as err:
        t.run(callback=poison)
    message = str(err.value)
    assert message.startswith("step 2: loss is nan") and t.pairs[5].name in message
    assert "checkpoint-000001" in message
    state = json.load(open(os.path.join(c.output_dir, "checkpoints", "checkpoint-000001", "training_state",
                                        "state.json")))
    assert state["step"] == 1   # the last checkpoint is the good one; nothing of step 2 was written
    assert sorted(os.listdir(os.path.join(c.output_dir, "checkpoints"))) == ["checkpoint-000001", "latest"]


def test_signal_saves_a_resumable_checkpoint(tmp_path):
    c = config(tmp_path, max_train_steps=10)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)

    def interrupt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = t.run(callback=interrupt)
    assert (result.stopped, result.signal, result.step) == ("signal", signal.SIGTERM, 2)
    assert result.checkpoint.endswith("checkpoint-000002")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # handlers restored
    resumed = Trainer(config(tmp_path, max_train_steps=10, resume="latest"), pipeline=tiny_pipeline(),
                      printer=lambda s: None)
    resumed.setup()
    assert resumed.start_step == 2


def test_samples_curve_validation_and_formats(tmp_path):
    c = config(tmp_path, max_train_steps=2, sample_every=2, sample_steps=2, save_formats=["diffusers", "kohya"],
               validation_images=["00/circle.png"], validation_every=1, tensorboard=True, cache_latents="disk")
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    result = t.run()
    assert [os.path.basename(p) for p in result.lora_files] == ["pytorch_lora_weights.safetensors",
                                                               "lora_kohya.safetensors"]
    assert "circle" not in [r.stem for r in t.records]
    from PIL import Image
    grid = Image.open(result.samples[0])
    assert grid.size[0] >= 32 and os.path.basename(result.samples[0]) == "step_000002.png"
    assert Image.open(result.loss_curve).size == (800, 450)
    records = [json.loads(line) for line in open(os.path.join(c.output_dir, "metrics.jsonl"))]
    assert any("val/loss" in r for r in records) and all(np.isfinite(r.get("loss", 0)) for r in records)
    # the sample round is scored with the local scorer: hist of the style-00 sample vs style 00's references
    from jdiffusion_lora.metrics.hist import hist_scores
    scored = [r for r in records if "score/hist" in r]
    assert [r["step"] for r in scored] == [2]
    sample = os.path.join(c.output_dir, "samples", "step_000002", "00")
    sample_files = [os.path.join(sample, f) for f in os.listdir(sample)]
    refs = [os.path.join(c.data_root, "00", "images", f) for f in sorted(os.listdir(os.path.join(c.data_root, "00", "images")))]
    expected = float(hist_scores([Image.open(f) for f in sample_files], [Image.open(f) for f in refs]).mean())
    assert len(sample_files) == 1 and abs(scored[0]["score/hist"] - expected) < 1e-6
    kohya = load_weights(result.lora_files[1])
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
    cache_files = [f for _, _, fs in os.walk(os.path.join(c.output_dir, "cache")) for f in fs]
    assert len(cache_files) == 5   # 2 training images x (flipped, not flipped) + the validation image
    # a rerun finds every latent on disk
    again = Trainer(config(tmp_path / "again", cache_latents="disk", cache_dir=os.path.join(c.output_dir, "cache"),
                           max_train_steps=1, validation_images=["00/circle.png"]),
                    pipeline=tiny_pipeline(), printer=lambda s: None)
    again.run()
    assert again.latent_cache.misses == 0 and again.latent_cache.hits > 0


def _unet_out(unet, seed=0):
    from jdiffusion_lora._runtime import jt
    rng = np.random.default_rng(seed)
    x = jt.array(rng.standard_normal((1, 4, 8, 8), dtype=np.float32))
    ctx = jt.array(rng.standard_normal((1, 77, 64), dtype=np.float32))
    unet.eval()
    with jt.no_grad():
        return unet(x, 500, ctx).sample.numpy()


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_lora_ga_init_and_its_rank_2r_file(tmp_path):
    """LoRA-GA: B != 0 at init but the model is unchanged (base offset); the saved rank-2r file applied to
    the untouched base model reproduces the trained model."""
    c = config(tmp_path, lora_init="lora_ga", rank=2, lora_ga_batches=2, max_train_steps=3, learning_rate=1e-2)
    base = _unet_out(tiny_pipeline().unet)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    t.setup()
    assert all(np.abs(p.up.numpy()).max() > 0 for p in t.pairs)
    assert np.abs(_unet_out(t.unet) - base).max() < 1e-4
    t.unet.train()
    result = t.run()
    trained = _unet_out(t.unet)
    assert np.abs(trained - base).max() > 1e-3
    saved = load_weights(result.lora_files[0])
    assert {v.shape[0] for k, v in saved.items() if k.endswith("lora_A.weight")} == {4}
    fresh = tiny_pipeline()
    fresh.load_lora_weights(result.lora_files[0])
    assert np.abs(_unet_out(fresh.unet) - trained).max() < 1e-4


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_prior_preservation_generates_class_images(tmp_path):
    class_dir = tmp_path / "class"
    c = config(tmp_path, with_prior_preservation=True, class_data_dir=str(class_dir), class_prompt="a shape",
               num_class_images=2, class_sample_steps=2, max_train_steps=2, prior_loss_weight=0.5)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    t.run()
    assert sorted(os.listdir(class_dir)) == ["class_000000.png", "class_000001.png"]
    batch = t.batches.micro_batch(0, 0)
    assert [s.is_class for s in batch] == [False, True] and batch[1].caption == "a shape"
    loss, per = t.loss(batch)
    per = per.numpy()
    assert float(loss.item()) == pytest.approx(per[0] + 0.5 * per[1], rel=1e-5)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_noise_and_loss_options_train(tmp_path):
    """Every option trains (2 steps, finite loss), and each changes what it should against the same
    samples without it: the noise, the timesteps, the captions, the per-sample loss or its weights."""
    import dataclasses
    from jdiffusion_lora._runtime import jt
    from jdiffusion_lora.train.batches import SampleBuilder
    from jdiffusion_lora.train.objective import DenoisingLoss, min_snr_weights

    c = config(tmp_path, max_train_steps=2, optimizer="Adan", lr_scheduler="polynomial", lr_warmup_steps=1,
               cache_latents="none", **NOISE_AND_LOSS_OPTIONS)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    result = t.run()
    assert result.step == 2 and np.isfinite(result.last_loss)

    off = {k: type(v)() for k, v in NOISE_AND_LOSS_OPTIONS.items()}    # 0, 0.0, False
    off.update(loss_type="l2", timestep_sampling="uniform")
    plain = dataclasses.replace(c, **off)

    def with_option(**kw):
        return dataclasses.replace(plain, **kw)

    def samples(cfg, n=24):
        builder = SampleBuilder(cfg, t.data, t.vae, t.num_train_timesteps)
        return [builder.instance(i, 0) for i in range(n)]

    def losses(cfg, batch):
        loss = DenoisingLoss(cfg, t.unet, t.text_encoder, t.pipe.tokenizer, t.noise_scheduler, t.prediction_type)
        with t.evaluating(), jt.no_grad():
            total, per = loss(batch)
            return float(total.item()), per.numpy()

    base = samples(plain)
    assert all(s.perturbation is None for s in base)
    # noise: each noise option changes the noise of the same sample; the latents stay the same
    for option in ({"noise_offset": 0.05}, {"multires_noise_iterations": 3}, {"perlin_noise_octaves": 2}):
        changed = samples(with_option(**option))
        assert all(np.array_equal(a.latent, b.latent) for a, b in zip(base, changed)), option
        assert all(not np.allclose(a.noise, b.noise) for a, b in zip(base, changed)), option
    assert all(s.perturbation is not None and s.perturbation.shape == s.noise.shape
               for s in samples(with_option(input_perturbation=0.1)))
    # timesteps: logit-normal in [timestep_min, timestep_max) differs from uniform over [0, T)
    steps = [s.timestep for s in samples(with_option(timestep_sampling="logit_normal", timestep_min=100,
                                                     timestep_max=900), n=64)]
    assert min(steps) >= 100 and max(steps) < 900 and steps != [s.timestep for s in samples(plain, n=64)]
    # captions: dropout empties some; shuffling keeps the first tag (the trigger) and the set of tags
    dropped = samples(with_option(caption_dropout_rate=0.5))
    assert 0 < sum(s.caption == "" for s in dropped) < len(dropped)
    assert all(s.caption == "" or s.caption == b.caption for s, b in zip(dropped, base))
    shuffled = samples(with_option(shuffle_caption=True, keep_tokens=1))
    assert all(s.caption.split(",")[0] == b.caption.split(",")[0] for s, b in zip(shuffled, base))
    assert all(sorted(s.caption.split(",")) == sorted(b.caption.split(",")) for s, b in zip(shuffled, base))
    assert any(s.caption != b.caption for s, b in zip(shuffled, base))
    # loss: input perturbation changes the prediction; Min-SNR only reweights the per-sample losses;
    # pseudo-Huber is below the squared error everywhere
    batch = base[:3] + [dataclasses.replace(base[3], timestep=10)]   # SNR(10) > 5: Min-SNR weighs it down
    l2_total, l2_per = losses(plain, batch)
    perturbed = samples(with_option(input_perturbation=0.1))[:3]
    assert not np.allclose(losses(with_option(input_perturbation=0.1), perturbed)[1], l2_per[:3])
    snr_total, snr_per = losses(with_option(min_snr_gamma=5.0), batch)
    np.testing.assert_allclose(snr_per, l2_per, rtol=1e-5)
    weights = min_snr_weights(np.asarray(t.noise_scheduler.alphas_cumprod, dtype=np.float64),
                              np.array([s.timestep for s in batch]), 5.0, t.prediction_type)
    assert weights[3] < 1.0
    assert snr_total == pytest.approx(float((l2_per * weights).mean()), rel=1e-5) and snr_total < l2_total
    _, huber_per = losses(with_option(loss_type="huber"), batch)
    assert np.all(huber_per <= l2_per * (1 + 1e-5)) and not np.allclose(huber_per, l2_per)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    from jdiffusion_lora.train import checkpoint as ck
    c = config(tmp_path, max_train_steps=3, save_every=1)
    t = Trainer(c, pipeline=tiny_pipeline(), printer=lambda s: None)
    real = ck.save_safetensors

    def full_disk(step, metrics):
        if step == 2:
            def fail(tensors, path, *a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(ck, "save_safetensors", fail)

    with pytest.raises(OSError, match=r"could not save the checkpoint of step 2: No space left on device "
                                      r"\(writing .*training_state/adapter.safetensors\).*checkpoint-000001"):
        t.run(callback=full_disk)
    monkeypatch.setattr(ck, "save_safetensors", real)
    root = os.path.join(c.output_dir, "checkpoints")
    assert sorted(os.listdir(root)) == ["checkpoint-000001", "latest"]
    assert open(os.path.join(root, "latest")).read() == "checkpoint-000001"


def test_a_fresh_run_does_not_mix_with_old_checkpoints(tmp_path):
    Trainer(config(tmp_path, max_train_steps=2, save_every=1), pipeline=tiny_pipeline(), printer=lambda s: None).run()
    with pytest.raises(ValueError, match="earlier run .*--resume latest.*--overwrite"):
        Trainer(config(tmp_path, max_train_steps=2), pipeline=tiny_pipeline(), printer=lambda s: None).setup()
    again = Trainer(config(tmp_path, max_train_steps=1, overwrite=True), pipeline=tiny_pipeline(),
                    printer=lambda s: None)
    again.run()
    assert sorted(os.listdir(os.path.join(again.c.output_dir, "checkpoints"))) == ["checkpoint-000001", "latest"]
