"""Aspect-ratio buckets: kohya's bucket table and assignment, batches within one bucket, the dry run's
table, and training on three aspect ratios (one bucket per batch, resume bit-exact)."""
import os
import re
from collections import Counter

import numpy as np
import pytest

import jdiffusion_lora  # noqa: F401  (configures Jittor first)
from jdiffusion_lora.train.buckets import BucketOrder, Frame, bucket_resolutions, cover, make_buckets, select_bucket
from jdiffusion_lora.train.config import ConfigError, build_config

from train_fixtures import random_image

BUCKETS = dict(enable_bucket=True, resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8)
SIZES = {"square": (64, 64), "wide": (96, 48), "tall": (48, 96)}


def test_bucket_table_is_kohyas():
    # kohya's make_bucket_resolutions((32, 32), 16, 64, 8), worked out by hand: for each width w from 16 to
    # 64 in steps of 8, h = min(64, (1024 // w) // 8 * 8), kept when h >= 16, with (h, w); plus (32, 32).
    assert bucket_resolutions(32, 16, 64, 8) == [(16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24),
                                                 (48, 16), (56, 16), (64, 16)]
    table = bucket_resolutions(512, 256, 1024, 64)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in table)
    assert (512, 512) in table and (384, 640) in table and (640, 384) in table and (256, 1024) in table


def test_images_go_to_the_closest_bucket_and_cover_it():
    c = build_config(None, BUCKETS)
    table = bucket_resolutions(32, 16, 64, 8)
    assert select_bucket(64, 64, c, table)[0] == Frame((32, 32), (32, 32))
    frame, err = select_bucket(96, 48, c, table)          # aspect 2: (40, 24) is the closest (1.67)
    assert frame == Frame((48, 24), (40, 24)) and err == pytest.approx(40 / 24 - 2)
    assert select_bucket(48, 96, c, table)[0] == Frame((24, 48), (24, 40))
    assert cover(100, 50, (40, 24)) == (48, 24) and cover(50, 100, (24, 40)) == (24, 48)
    # no upscaling: a small image keeps its size (bucket rounded down), a large one shrinks to the area
    c = build_config(None, {**BUCKETS, "bucket_no_upscale": True})
    assert select_bucket(40, 25, c, [])[0] == Frame((40, 25), (40, 24))
    assert select_bucket(96, 48, c, [])[0] == Frame((32, 16), (32, 16))
    with pytest.raises(ConfigError, match="min_bucket_reso <= resolution"):
        build_config(None, {**BUCKETS, "min_bucket_reso": 48})


def test_bucket_order_batches_hold_one_bucket_and_every_image():
    c = build_config(None, BUCKETS)
    sizes = [SIZES["square"]] * 3 + [SIZES["wide"]] * 2 + [SIZES["tall"]]
    buckets = make_buckets(sizes, c)
    assert buckets.sizes == [(24, 40), (32, 32), (40, 24)]
    order = BucketOrder(buckets, batch_size=2, seed=5)
    assert order.pass_length == 2 * (2 + 1 + 1)      # 3 square -> 2 batches (one filled up), 2 wide, 1 tall
    passes = []
    for p in range(3):
        items = [order(p * order.pass_length + i) for i in range(order.pass_length)]
        assert all(q == p for q, _ in items)
        items = [i for _, i in items]
        for k in range(0, len(items), 2):          # each batch from one bucket
            assert len({buckets.of_item[i] for i in items[k:k + 2]}) == 1
        assert set(items) == set(range(6))         # every image each pass
        passes.append(items)
    assert passes[0] != passes[1]
    again = BucketOrder(buckets, batch_size=2, seed=5)   # a fresh object (a resumed run) gives the same order
    assert [again(i)[1] for i in range(2 * order.pass_length)] == passes[0] + passes[1]


def _bucket_data(root):
    folder = root / "shapes"
    os.makedirs(folder)
    for k, (name, size) in enumerate(SIZES.items()):
        for j in range(2):
            random_image(str(folder / f"{name}{j}.png"), size=size, seed=10 * k + j)
    return str(root)


def test_dry_run_prints_the_bucket_table(tmp_path, capsys):
    from jdiffusion_lora.cli import main
    root = _bucket_data(tmp_path)
    assert main(["train", "--data-root", root, "--enable_bucket", "--resolution", "32", "--min_bucket_reso", "16",
                 "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--train-batch-size", "2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "aspect-ratio buckets (3; area <= 32x32, step 8, 16..64; a pass is 6 samples" in out
    for line in ("24 x 40    aspect  0.60     2 image(s): shapes/tall0.png, shapes/tall1.png",
                 "32 x 32    aspect  1.00     2 image(s): shapes/square0.png, shapes/square1.png",
                 "40 x 24    aspect  1.67     2 image(s): shapes/wide0.png, shapes/wide1.png"):
        assert line in [text.strip() for text in out.splitlines()]


@pytest.mark.slow
def test_three_aspect_ratios_train_in_buckets_and_resume_bit_exact(tmp_path):
    from jdiffusion_lora.train import adapters as ad
    from jdiffusion_lora.train.trainer import Trainer
    from train_fixtures import config, tiny_pipeline

    root = _bucket_data(tmp_path)
    common = dict(data_root=root, styles=[], max_train_steps=6, train_batch_size=2, lora_dropout=0.1,
                  crop="random", flip_p=0.5, cache_latents="disk", **BUCKETS)
    straight = Trainer(config(tmp_path / "a", **common), pipeline=tiny_pipeline(), printer=lambda s: None)
    straight.setup()
    batches = []
    real = straight.batches.micro_batch

    def recording(step, micro):
        samples = real(step, micro)
        batches.append([(os.path.basename(s.source), s.size, s.latent.shape) for s in samples])
        return samples

    straight.batches.micro_batch = recording
    straight.run()
    assert len(batches) == 6
    for batch in batches:                      # one bucket per batch: one size, latents of that size
        assert len({size for _, size, _ in batch}) == 1 and len({shape for _, _, shape in batch}) == 1
        assert len({re.sub(r"\d\.png$", "", n) for n, _, _ in batch}) == 1   # square*, wide* or tall*
        w, h = batch[0][1]
        assert batch[0][2][1:] == (h // 4, w // 4)   # the tiny VAE downsamples by 4
    assert Counter(size for b in batches for _, size, _ in b) == {(24, 40): 4, (32, 32): 4, (40, 24): 4}
    # the latent cache holds each bucket's encodings (random crops of the wider images are encoded when drawn)
    assert straight.latent_cache.misses > 0

    first = Trainer(config(tmp_path / "b", **common), pipeline=tiny_pipeline(), printer=lambda s: None)
    assert first.run(until=3).stopped == "until"
    second = Trainer(config(tmp_path / "b", resume="latest", **common), pipeline=tiny_pipeline(),
                     printer=lambda s: None)
    second.run()
    a, b = ad.adapter_arrays(straight.pairs), ad.adapter_arrays(second.pairs)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert np.array_equal(a[k], b[k]), k
