"""KID: the unbiased squared MMD with the cubic polynomial kernel, as clean-fid and torchmetrics compute it.

``k(x, y) = (x . y / d + 1)^3`` on d-dimensional features (degree 3, gamma 1/d, coef 1); the
estimate of one subset pair of size m is ``(sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)) /
(m (m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2`` (clean-fid's ``kernel_distance``), averaged over
``subsets`` random pairs of subsets of size ``m = min(n_x, n_y, subset_size)`` drawn without
replacement (seeded here). When both sets have m rows, every subset is the whole set and the
estimate is exact. Unlike a Frechet distance it is unbiased at small n (it can be slightly
negative), so it ranks at the main job's sizes where FID cannot.

Against the 16-bit images (``*_ref``) the sets are *paired*: image i of both comes from the same
prompt and seed, so ``k(x_i, y_i)`` is not an independent draw and clean-fid's cross term (which
includes ``i = j``) is biased low, far below 0 for a faithful model (measured: -0.76 on 12
Fashion-MNIST images with noise). The paired estimate averages the cross term over ``i != j``
(Gretton et al.'s MMD^2_u), which is unbiased; against real images nothing is paired and the
value is clean-fid's.

Its interval bootstraps the generated images (and, against the 16-bit images, their pairs) with
the kernel matrices computed once (:func:`kid_counts_statistic`); the spread is that of the
full-set estimate, centred on the reported value.

Metrics: ``kid`` / ``kid_ref`` on clean-fid's Inception features (beside ``fid`` / ``fid_ref``,
with the same "not computed" path when ``inception-2015-12-05.pt`` is missing); ``kid_fmnist`` /
``kid_fmnist_ref`` on the Fashion-MNIST classifier's features live in
:mod:`ptqbench.metrics.fmnist_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from ptqbench.cache import Cache, cache_key
from ptqbench.metrics import fid
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, register_metric
from ptqbench.metrics.weights import Missing
from ptqbench.uncertainty import Bootstrap, set_interval

SUBSETS = 100
SUBSET_SIZE = 1000
BLOCK = 2048  # rows per block of a large kernel matrix


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x y^T / d + 1)^3`` in float64 for features ``[n, d]``, ``[m, d]``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _offdiag_sum(k: np.ndarray) -> float:
    return float(k.sum() - np.trace(k))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, paired: bool = False) -> float:
    """The KID estimate of one pair of equal-size sets ``[m, d]`` (m >= 2): clean-fid's, or with
    ``paired`` (row i of x and of y come from the same prompt and seed, so they are dependent) the
    cross term over ``i != j`` only, which keeps it unbiased."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"one KID subset pair needs two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    within = _offdiag_sum(polynomial_kernel(x, x)) + _offdiag_sum(polynomial_kernel(y, y))
    kxy = polynomial_kernel(x, y)
    cross = _offdiag_sum(kxy) / (m * (m - 1)) if paired else float(kxy.sum()) / m**2
    return within / (m * (m - 1)) - 2.0 * cross


def kernel_distance(x: np.ndarray, y: np.ndarray, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
                    seed: int = 0, paired: bool = False) -> float:
    """KID of features ``x`` ``[n_x, d]`` and ``y`` ``[n_y, d]``: the mean estimate of ``subsets``
    seeded subset pairs of size ``min(n_x, n_y, subset_size)`` (one exact pair when both are that
    size); ``paired`` rows (equal n) share each subset's indices and drop the ``i = j`` cross pairs."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or (paired and x.shape != y.shape):
        raise ValueError(f"KID needs features [n, d] of equal d (equal n if paired), got {x.shape} and {y.shape}")
    m = min(x.shape[0], y.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == y.shape[0] == m:
        return mmd2_unbiased(x, y, paired)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        i = rng.choice(x.shape[0], m, replace=False)
        j = i if paired else rng.choice(y.shape[0], m, replace=False)
        total += mmd2_unbiased(x[i], y[j], paired)
    return total / subsets


def within_mean(y: np.ndarray) -> float:
    """``sum_{i!=j} k(y_i, y_j) / (n (n-1))`` of a (large) set, in blocks of rows."""
    y = np.asarray(y, np.float64)
    n = y.shape[0]
    total = 0.0
    for i in range(0, n, BLOCK):
        total += float(polynomial_kernel(y[i : i + BLOCK], y).sum())
    total -= float(((np.einsum("ij,ij->i", y, y) / y.shape[1] + 1.0) ** 3).sum())
    return total / (n * (n - 1))


def _pair_sum(k: np.ndarray, w: np.ndarray) -> float:
    """``sum_{a != b} w_a w_b k[a, b]``: pairs of distinct images of a resample drawn ``w`` times each."""
    return float(w @ k @ w - (w * w) @ np.diag(k))


def kid_counts_statistic(x: np.ndarray, other: np.ndarray, paired: bool,
                         other_within: float | None = None) -> Callable[[np.ndarray], float]:
    """The full-set KID of a resample of ``x`` ``[n, d]`` (counts ``[n]``) against ``other``: fixed
    features (``paired=False``; ``other_within`` is its :func:`within_mean`, computed once), or
    features paired row by row with ``x`` and resampled with the same counts. Each resample is the
    weighted U-statistic over pairs of *distinct* images (``n^2 - sum w^2`` of them), so a drawn
    image never meets its own copy and every resample stays unbiased; all ones is the full estimate."""
    n = x.shape[0]
    kxx = polynomial_kernel(x, x)
    if not paired:
        c = within_mean(other) if other_within is None else other_within
        cross = np.concatenate([polynomial_kernel(x, other[j : j + BLOCK]) for j in range(0, len(other), BLOCK)], 1)
        cross_mean = cross.mean(axis=1)

        def fixed(counts: np.ndarray) -> float:
            w = counts.astype(np.float64)
            return _pair_sum(kxx, w) / (n * n - w @ w) + c - 2.0 * (w @ cross_mean) / n

        return fixed
    if other.shape != x.shape:
        raise ValueError(f"paired features need equal shapes, got {x.shape} and {other.shape}")
    kyy, kxy = polynomial_kernel(other, other), polynomial_kernel(x, other)

    def pairs(counts: np.ndarray) -> float:
        w = counts.astype(np.float64)
        return (_pair_sum(kxx, w) + _pair_sum(kyy, w) - 2.0 * _pair_sum(kxy, w)) / (n * n - w @ w)

    return pairs


def kid_result(metric: Metric, x: np.ndarray, other: np.ndarray, paired: bool, bootstrap: Bootstrap | None,
               other_within: float | None = None, seed: int = 0) -> MetricResult:
    """A KID metric's result: :func:`kernel_distance` and its bootstrap interval over the images."""
    x, other = np.asarray(x, np.float64), np.asarray(other, np.float64)
    paired = paired and x.shape == other.shape  # rows of another count cannot be paired
    value = kernel_distance(x, other, seed=seed, paired=paired)
    result = MetricResult(metric.name, value, int(x.shape[0]), higher_is_better=False)
    if bootstrap is None:
        return result
    statistic = kid_counts_statistic(x, other, paired, other_within)
    full = statistic(np.ones(x.shape[0], dtype=np.int64))
    iv = set_interval(statistic, x.shape[0], bootstrap, full)
    return result.with_interval(replace(iv, value=value, lo=iv.lo + value - full, hi=iv.hi + value - full))


# ----------------------------------------------------------------------------- Inception KID


def real_features(path: Path, files: list[str], net: fid.FeatureNet, cache: Cache) -> np.ndarray:
    """Features ``[N, D]`` of a real image folder through clean-fid's reader (as FID's statistics),
    kept in ``cache`` by the network and every file's name, size and mtime."""
    from cleanfid.fid import get_files_features

    key = cache_key("real_features", net.name, net.size, str(path.resolve()), fid._fingerprint(path, files))
    target = cache.path("real_features", key) / "features.npy"
    if cache.done("real_features", key):
        return np.load(target)
    feats = get_files_features(
        files, model=net.model, num_workers=0 if len(files) < 256 else fid._workers(), batch_size=fid.BATCH,
        device=torch.device(net.device), mode="clean", custom_fn_resize=fid.clean_resizer(net.size),
        fdir=str(path), verbose=False,
    ).astype(np.float64)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, feats)
    cache.mark_done("real_features", key)
    return feats


class _InceptionKID(Metric):
    higher_is_better = False
    against: ClassVar[Literal["real", "reference"]]

    def __init__(self) -> None:
        self._nets: dict[str, fid.FeatureNet] = {}

    def network(self, device: str) -> fid.FeatureNet | Missing:
        if device not in self._nets:
            net = fid.load_inception(device)
            if isinstance(net, Missing):
                return net
            self._nets[device] = net
        return self._nets[device]

    def compute(self, inputs: MetricInputs) -> MetricResult:
        reference = inputs.stored("reference")
        if inputs.n < 2 or (self.against == "reference" and reference is not None and len(reference) < 2):
            return MetricResult.missing(self, f"{self.name}: needs at least 2 images on each side, got {inputs.n}")
        files: list[str] = []
        if self.against == "real":
            assert inputs.real_dir is not None
            found = fid.real_image_files(Path(inputs.real_dir), inputs.keys)
            if isinstance(found, Missing):
                return MetricResult.missing(self, f"{self.name}: {found.reason}")
            files = found
        net = self.network(inputs.device)
        if isinstance(net, Missing):
            return MetricResult.missing(self, f"{self.name}: {net.reason}")
        feats = fid.tensor_features(inputs.stored(), net)
        if self.against == "reference":
            assert reference is not None
            return kid_result(self, feats, fid.tensor_features(reference, net), True, inputs.bootstrap)
        assert inputs.real_dir is not None
        real = real_features(Path(inputs.real_dir), files, net, inputs.cache)
        return kid_result(self, feats, real, False, inputs.bootstrap)


@register_metric
class KID(_InceptionKID):
    """KID (clean-fid's kernel distance on Inception-V3 features) of the images vs the real images in real_dir."""

    name = "kid"
    needs: ClassVar[frozenset[Need]] = frozenset({"real"})
    against = "real"


@register_metric
class KIDRef(_InceptionKID):
    """KID (clean-fid's kernel distance on Inception-V3 features) of the images vs the 16-bit model's images."""

    name = "kid_ref"
    needs: ClassVar[frozenset[Need]] = frozenset({"reference"})
    against = "reference"
