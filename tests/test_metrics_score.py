"""The total-score formula reproduces the seed README's six results from their sub-scores."""
import pytest

from jdiffusion_lora.metrics.score import METRICS, total_from, total_score

# (dino, hist, fid, lpips, clip_iqa, clip_r) -> total, as printed in the seed README (B board).
SEED_ROWS = [
    ((0.2125, 0.747, 2.813, 0.3939, 0.7451, 0.62), 0.4251),     # pack n=2 / 10k steps + adaptive lr
    ((0.1916, 0.73, 3.8127, 0.4113, 0.7579, 0.7629), 0.4419),   # n=8
    ((0.1762, 0.6811, 3.1457, 0.4223, 0.7471, 0.8457), 0.4497),  # n=14
    ((0.1737, 0.7144, 3.272, 0.4154, 0.7463, 0.8586), 0.4648),   # n=28, final
    ((0.2078, 0.7663, 3.8347, 0.3976, 0.7459, 0.6843), 0.4359),  # negative-prompt submission 1
    ((0.1921, 0.7456, 3.3376, 0.4114, 0.7591, 0.6771), 0.4278),  # negative-prompt submission 2
]


@pytest.mark.parametrize("subs,total", SEED_ROWS)
def test_total_reproduces_seed_readme(subs, total):
    assert round(total_score(*subs), 4) == total
    assert round(total_from(dict(zip(METRICS, subs))), 4) == total


def test_fid_is_clipped_at_20_and_missing_metric_gives_none():
    subs = dict(dino=0.2, hist=0.7, lpips=0.4, clip_iqa=0.7, clip_r=0.8)
    assert total_from({**subs, "fid": 20.0}) == total_from({**subs, "fid": 55.0})
    assert total_from({**subs, "fid": 0.0}) > total_from({**subs, "fid": 20.0})
    assert total_from(subs) is None
    assert total_from({**subs, "fid": "not computed"}) is None
