"""The one Frechet distance used by every FID-like metric (FID, fd_effnet, fd_fmnist...).

``d^2 = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})`` between the Gaussians
fitted to two feature sets, in float64, with ``np.cov`` (unbiased) covariances as clean-fid uses.
``Tr((S_a S_b)^{1/2})`` is computed exactly through eigenvalues: ``S_a S_b`` is similar to the
symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``, so the trace is the sum of the square roots of
its eigenvalues (those below ``D * eps * max``, rounding noise of a singular matrix, count as 0).
This equals clean-fid's ``scipy.linalg.sqrtm`` route on well-conditioned covariances (and is about
6x faster at D = 2048), and stays real and exact when they are singular (fewer samples than dimensions).
"""

from __future__ import annotations

import numpy as np


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _clip_null(eig: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (below ``D * eps * max``) set to exactly 0."""
    tol = eig.size * np.finfo(np.float64).eps * max(float(np.abs(eig).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(eig > tol, eig, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(_clip_null(w))) @ v.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """``Tr((S_a S_b)^{1/2})`` for symmetric PSD ``S_a``, ``S_b``."""
    root_a = _psd_sqrt(np.asarray(sigma_a, dtype=np.float64))
    inner = root_a @ np.asarray(sigma_b, dtype=np.float64) @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(_clip_null(eig)).sum())


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b); rounding below 0 is clipped to 0."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.size, mu_a.size):
        shapes = f"mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}"
        raise ValueError(f"mismatched statistics: {shapes}")
    diff = mu_a - mu_b
    d = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b)
    return float(max(d, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to features ``[Na, D]`` and ``[Nb, D]``."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))
