"""hist sub-score: the organisers' histogram definition, checked by construction and against OpenCV."""
import colorsys

import numpy as np
import pytest

from jdiffusion_lora.metrics import hist as H


def hsv72_by_definition(rgb):
    """Independent colour index of one (r, g, b) pixel from colorsys, with the interval rules spelled out."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    deg = h * 360.0
    if deg > 315 or deg <= 20:
        hb = 0
    elif deg <= 40:
        hb = 1
    elif deg <= 75:
        hb = 2
    elif deg <= 155:
        hb = 3
    elif deg <= 190:
        hb = 4
    elif deg <= 270:
        hb = 5
    elif deg <= 295:
        hb = 6
    else:
        hb = 7

    def sv(x):
        return 0 if x <= 0.2 else (1 if x <= 0.7 else 2)
    return 9 * hb + 3 * sv(s) + sv(v)


# Colours well inside their HSV cells (no rounding can move them across an edge).
COLOURS = [(230, 20, 20), (240, 130, 30), (200, 200, 40), (40, 180, 60), (30, 200, 210), (50, 60, 220),
           (150, 40, 200), (210, 40, 160), (128, 128, 128), (10, 10, 10), (245, 245, 245), (120, 60, 60)]


def block_image(counts):
    """Image made of solid colour runs: {colour: pixel count}, 1 pixel high."""
    row = np.concatenate([np.tile(np.array(c, np.uint8), (n, 1)) for c, n in counts.items()])
    return row[None]


def histograms_by_construction(counts):
    rgb = np.zeros((16, 16, 16))
    hsv = np.zeros(72)
    total = sum(counts.values())
    for c, n in counts.items():
        rgb[c[0] // 16, c[1] // 16, c[2] // 16] += n / total
        hsv[hsv72_by_definition(c)] += n / total
    return rgb, hsv


def test_known_histograms_and_score(rng):
    gen_counts = [dict(zip(COLOURS, rng.integers(1, 50, len(COLOURS)))) for _ in range(3)]
    ref_counts = [dict(zip(COLOURS[:8], rng.integers(0, 50, 8))) for _ in range(2)]
    for counts in gen_counts + ref_counts:
        rgb, hsv = histograms_by_construction(counts)
        img = block_image(counts)
        np.testing.assert_allclose(H.rgb_histogram(img), rgb, atol=1e-15)
        np.testing.assert_allclose(H.hsv72_histogram(img), hsv, atol=1e-15)
    ref_rgb = np.mean([histograms_by_construction(c)[0] for c in ref_counts], axis=0)
    ref_hsv = np.mean([histograms_by_construction(c)[1] for c in ref_counts], axis=0)
    expected = [0.5 * (np.corrcoef(histograms_by_construction(c)[0].ravel(), ref_rgb.ravel())[0, 1]
                       + np.corrcoef(histograms_by_construction(c)[1], ref_hsv)[0, 1]) for c in gen_counts]
    got = H.hist_scores([block_image(c) for c in gen_counts], [block_image(c) for c in ref_counts])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_interval_edges_are_closed_on_the_right():
    # hue exactly 20 degrees (OpenCV H = 10) is red (bin 0); 22 degrees is orange (bin 1)
    assert H.hsv72_index(np.array([[[10, 255, 255]]]))[0, 0] == 0 * 9 + 2 * 3 + 2
    assert H.hsv72_index(np.array([[[11, 255, 255]]]))[0, 0] == 1 * 9 + 2 * 3 + 2
    # hue 316 degrees wraps to red; 314 is bin 7
    assert H.hsv72_index(np.array([[[158, 255, 255]]]))[0, 0] == 0 * 9 + 8
    assert H.hsv72_index(np.array([[[157, 255, 255]]]))[0, 0] == 7 * 9 + 8
    # (H = 60: 120 degrees, bin 3) S = 51/255 = 0.2 exactly stays in the low bin, 52/255 goes up; same for V
    assert H.hsv72_index(np.array([[[60, 51, 52]]]))[0, 0] == 3 * 9 + 0 * 3 + 1
    assert H.hsv72_index(np.array([[[60, 52, 51]]]))[0, 0] == 3 * 9 + 1 * 3 + 0


def test_correl_matches_pearson_and_constant_case(rng):
    a, b = rng.random(100), rng.random(100)
    assert H.compare_correl(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert H.compare_correl(np.ones(10), b[:10]) == 1.0


def test_matches_opencv(rng):
    cv2 = pytest.importorskip("cv2")
    # every 8-bit colour through OpenCV's converter, in slices
    codes = np.arange(1 << 24, dtype=np.uint32).reshape(-1, 2048)
    for part in np.array_split(codes, 8):
        img = np.stack([(part >> 16) & 255, (part >> 8) & 255, part & 255], -1).astype(np.uint8)
        np.testing.assert_array_equal(H.rgb_to_hsv_opencv(img), cv2.cvtColor(img, cv2.COLOR_RGB2HSV))

    def cv_hists(img):
        rgb = cv2.calcHist([img], [0, 1, 2], None, [16, 16, 16], [0, 256, 0, 256, 0, 256])
        idx = H.hsv72_index(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)).astype(np.uint8)
        hsv = cv2.calcHist([idx], [0], None, [72], [0, 72])
        n = img.shape[0] * img.shape[1]
        # flattened: compareHist reads a (16, 16, 16) numpy array as a 16-channel 2-D Mat and
        # returns nonsense for it (-1 for two equal histograms)
        return rgb.ravel() / n, hsv.ravel() / n

    def smooth_image(seed):
        r = np.random.default_rng(seed)
        low = r.random((8, 8, 3)) * 255
        img = np.kron(low, np.ones((8, 8, 1))) + r.normal(0, 20, (64, 64, 3))
        return np.clip(img, 0, 255).astype(np.uint8)

    gens = [smooth_image(i) for i in range(4)]
    refs = [smooth_image(10 + i) for i in range(3)]
    ref_cv = [cv_hists(r) for r in refs]
    ref_rgb = np.mean([h[0] for h in ref_cv], axis=0)
    ref_hsv = np.mean([h[1] for h in ref_cv], axis=0)
    expected = []
    for g in gens:
        rgb, hsv = cv_hists(g)
        np.testing.assert_allclose(H.rgb_histogram(g).ravel(), rgb, atol=1e-7)
        np.testing.assert_allclose(H.hsv72_histogram(g), hsv, atol=1e-7)
        expected.append(0.5 * (cv2.compareHist(rgb, ref_rgb.astype(np.float32), cv2.HISTCMP_CORREL)
                               + cv2.compareHist(hsv, ref_hsv.astype(np.float32), cv2.HISTCMP_CORREL)))
    np.testing.assert_allclose(H.hist_scores(gens, refs), expected, atol=1e-6)
