"""fid sub-score: the Frechet distance and the FID Inception-v3 network."""
import numpy as np
import pytest

from helpers import max_abs_diff
from jdiffusion_lora.metrics.fid import feature_statistics, fid_from_features, frechet_distance


def scipy_frechet(mu1, s1, mu2, s2):
    linalg = pytest.importorskip("scipy.linalg")
    covmean = linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_fid_of_a_set_with_itself_is_zero(rng):
    for n, d in [(50, 64), (25, 64), (3, 64), (200, 768)]:
        x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d) + rng.normal(size=d)
        assert abs(fid_from_features(x, x)) < 1e-6, (n, d)


def test_matches_scipy_sqrtm(rng):
    for n, d in [(200, 64), (100, 16), (500, 128)]:
        a = rng.normal(size=(n, d))
        b = 1.3 * rng.normal(size=(n, d)) + 0.3 * a + 0.2
        m1, s1 = feature_statistics(a)
        m2, s2 = feature_statistics(b)
        ours, ref = frechet_distance(m1, s1, m2, s2), scipy_frechet(m1, s1, m2, s2)
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_singular_covariances_stay_real_and_finite(rng):
    # 3 references in 64 dimensions (one competition style): rank-2 covariance
    refs, gens = rng.normal(size=(3, 64)), rng.normal(size=(25, 64))
    value = fid_from_features(gens, refs)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_frechet(*feature_statistics(gens), *feature_statistics(refs)), rel=1e-5)


@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from metrics_torch_refs import TorchFIDInception, randomize_batchnorm
    from jdiffusion_lora.metrics.nets.inception import FID_WEIGHTS_NAME, FIDInceptionV3, find_inception_weights

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = randomize_batchnorm(TorchFIDInception(), gen)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(ref.state_dict(), folder / FID_WEIGHTS_NAME)     # with fc and num_batches_tracked, like the real file
    path = find_inception_weights(str(folder))
    assert path == str(folder / FID_WEIGHTS_NAME)
    return ref, FIDInceptionV3.from_file(path)


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_inception_64_features_match_torch(inception_pair, rng):
    import torch
    from jdiffusion_lora._runtime import jt
    ref, ours = inception_pair
    x = rng.random((2, 3, 48, 40)).astype(np.float32)              # resized to 299 x 299 inside
    with torch.no_grad():
        expected = ref.features(torch.tensor(x), 64).numpy()
    got = ours(jt.array(x), dims=64).numpy()
    assert got.shape == (2, 64)
    assert max_abs_diff(got, expected) <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.slow   # compiles kernels no default test needs (cold-cache time; CI runs the slow set)
def test_inception_2048_features_match_torch(inception_pair, rng):
    import torch
    from jdiffusion_lora._runtime import jt
    ref, ours = inception_pair
    x = rng.random((1, 3, 80, 80)).astype(np.float32)
    with torch.no_grad():
        expected = ref.features(torch.tensor(x), 2048, resize_input=False).numpy()
    got = ours(jt.array(x), dims=2048, resize_input=False).numpy()
    assert got.shape == (1, 2048)
    assert max_abs_diff(got, expected) <= 1e-4 * max(1.0, np.abs(expected).max())
