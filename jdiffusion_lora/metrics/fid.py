"""Frechet distance between two sets of features (the "fid" sub-score), numpy only.

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

pytorch-fid takes scipy's general `sqrtm(S1 @ S2)`, which can return complex noise or fail on
the singular covariances a few reference images give. Here the trace of the square root is
computed from symmetric eigen-decompositions only:
    Tr((S1 S2)^(1/2)) = sum of singular values of S1^(1/2) S2^(1/2)
(the eigenvalues of S1 S2 are those of S1^(1/2) S2 S1^(1/2) = A A^T with A = S1^(1/2) S2^(1/2),
whose square roots are A's singular values). S^(1/2) comes from `eigh` with negative rounding
noise clipped to 0, so the result is real and accurate to about eps * |S| even when S1 = S2
(then it is exactly the identity Tr(S) = sum of eigenvalues).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), in float64 (as `np.cov`)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative noise -> 0)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 (see module docstring)."""
    a = sqrtm_psd(sigma1) @ sqrtm_psd(sigma2)
    return float(np.linalg.svd(a, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
