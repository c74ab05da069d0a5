"""Metrics of the shipped Fashion-MNIST model, computed with its shipped classifier.

- ``class_accuracy``: fraction of generated images that the classifier assigns to the class
  their prompt names (higher is better); ``class_agreement``: fraction it assigns to the class
  it gives the 16-bit image of the same prompt and seed. Both keep their per-image 0/1 values.
- ``fd_fmnist``: Frechet distance between the classifier's penultimate features (128-d) of the
  generated images and of the 10k real Fashion-MNIST test images (lower is better). Not FID: the
  features are this classifier's, not Inception's; like FID it is only comparable at equal n.
  The real statistics ship as ``assets/fmnist_test_feature_stats.npz``, tied to the classifier
  by its SHA-256; for another classifier they are computed from the test set and cached.
- ``fd_fmnist_ref``: the same distance between the generated images and the 16-bit model's
  images for the same prompts and seeds (fidelity to the unquantized model, at the distribution
  level). ``fd_fmnist`` alone does not rank fidelity: guidance narrows the 16-bit model's samples,
  and quantization noise can widen them towards the real data (H100, n = 200: 70.7 for the 16-bit
  model, 44.6 for W4A4 mxfp4 RTN). Below n = 128 images both warn (mostly estimator bias);
  ``min_n`` makes them refuse below it instead.
- ``kid_fmnist`` / ``kid_fmnist_ref``: KID (:mod:`ptqbench.metrics.kid`) on the same features,
  unbiased at small n. Against the real images it needs the test set itself (its features are
  computed once per classifier and cached); the shipped statistics are not enough.

Set metrics carry a bootstrap interval over the generated images (features computed once).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqbench.cache import Cache, cache_key
from ptqbench.errors import UserError
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, image_floats, register_metric
from ptqbench.metrics.frechet import feature_stats, frechet_result, n_problem
from ptqbench.metrics.kid import kid_result
from ptqbench.models import fmnist
from ptqbench.models.fmnist_data import FMNIST_CLASSES, load_split, to_unit

STATS_FILE = "fmnist_test_feature_stats.npz"
CLASSIFIER_ENV = "PTQBENCH_FMNIST_CLASSIFIER"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def _classifier(path: str | None, mtime: float) -> tuple[fmnist.FMNISTClassifier, str]:
    model, info = fmnist.load_classifier(path)
    return model, file_sha256(info["file"])


def get_classifier(path: str | Path | None = None) -> tuple[fmnist.FMNISTClassifier, str]:
    """``(classifier, sha256 of its file)``: ``path``, else ``$PTQBENCH_FMNIST_CLASSIFIER``, else shipped."""
    chosen = path if path is not None else os.environ.get(CLASSIFIER_ENV) or None
    file = Path(chosen) if chosen else fmnist.ASSETS / fmnist.CLASSIFIER_FILE
    mtime = file.stat().st_mtime if file.exists() else 0.0
    return _classifier(None if chosen is None else str(chosen), mtime)


def real_feature_stats(model: fmnist.FMNISTClassifier, digest: str, cache: Cache, data: str | Path | None = None,
                       device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier's features on the 10k test images.

    The shipped ``STATS_FILE`` when it was made with this classifier, else computed from the
    test set (UserError when it is absent) and kept in ``cache`` under the classifier's digest.
    """
    shipped = fmnist.ASSETS / STATS_FILE
    if shipped.is_file():
        z = np.load(shipped)
        if str(z["classifier_sha256"]) == digest:
            return z["mu"], z["sigma"]
    key = cache_key("fmnist-test-feature-stats", digest)
    file = cache.path("fmnist_stats", key) / STATS_FILE
    if cache.done("fmnist_stats", key):
        z = np.load(file)
        return z["mu"], z["sigma"]
    mu, sigma = compute_real_stats(model, data, device)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_stats(file, mu, sigma, digest)
    cache.mark_done("fmnist_stats", key)
    return mu, sigma


def compute_real_stats(model: fmnist.FMNISTClassifier, data: str | Path | None = None,
                       device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    images, _ = load_split("test", data)
    _, feats = fmnist.classify(model, to_unit(images), device)
    return feature_stats(feats.numpy())


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, digest: str) -> Path:
    np.savez(path, mu=mu, sigma=sigma, classifier_sha256=np.array(digest))
    return Path(path)


def features(model: fmnist.FMNISTClassifier, images: torch.Tensor, device: str) -> np.ndarray:
    """The classifier's penultimate features ``[N, F]`` (float64) of ``images`` (uint8 or float in [0, 1])."""
    return fmnist.classify(model, image_floats(images), device)[1].numpy()


def real_features(model: fmnist.FMNISTClassifier, digest: str, cache: Cache, data: str | Path | None = None,
                  device: str = "cpu") -> np.ndarray:
    """The classifier's features of the 10k test images (for KID, which needs more than their
    mean and covariance), cached under the classifier's digest; UserError when the test set is absent."""
    key = cache_key("fmnist-test-features", digest)
    file = cache.path("fmnist_features", key) / "features.npy"
    if cache.done("fmnist_features", key):
        return np.load(file)
    images, _ = load_split("test", data)
    feats = fmnist.classify(model, to_unit(images), device)[1].numpy()
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, feats)
    cache.mark_done("fmnist_features", key)
    return feats


class _FMNISTMetric(Metric):
    """Shared: the classifier (``classifier`` path, else env, else shipped) and the real data folder."""

    def __init__(self, classifier: str | Path | None = None, data: str | Path | None = None):
        self.classifier_path, self.data = classifier, data

    def _load(self) -> tuple[fmnist.FMNISTClassifier, str]:
        return get_classifier(self.classifier_path)


@register_metric
class ClassAccuracy(_FMNISTMetric):
    """Fraction of images the shipped Fashion-MNIST classifier assigns to their prompt's class."""

    name = "class_accuracy"
    higher_is_better = True
    needs = frozenset({"prompts"})

    def compute(self, inputs: MetricInputs) -> MetricResult:
        prompts = list(inputs.prompts or [])
        if len(prompts) != inputs.n:
            raise ValueError(f"class_accuracy: {inputs.n} images but {len(prompts)} prompts")
        if not prompts:
            return MetricResult.missing(self, "class_accuracy got no images")
        names = [p.strip().lower() for p in prompts]
        bad = sorted({p for p, n in zip(prompts, names, strict=True) if n not in FMNIST_CLASSES})
        if bad:
            return MetricResult.missing(self, f"class_accuracy applies to Fashion-MNIST class-name prompts "
                                              f"(fmnist-dit); got {bad[:3]!r} (valid: {', '.join(FMNIST_CLASSES)})")
        try:
            model, _ = self._load()
        except UserError as exc:
            return MetricResult.missing(self, str(exc))
        labels = torch.tensor([FMNIST_CLASSES.index(n) for n in names])
        pred, _ = fmnist.classify(model, inputs.images, inputs.device)
        return MetricResult.of_images(self, (pred == labels).double())


@register_metric
class ClassAgreement(_FMNISTMetric):
    """Fraction of images the classifier puts in the class it gives the 16-bit image of the same prompt and seed."""

    name = "class_agreement"
    higher_is_better = True
    needs = frozenset({"reference"})

    def compute(self, inputs: MetricInputs) -> MetricResult:
        reference = inputs.stored("reference")
        assert reference is not None  # Metric.__call__ reports a missing reference (needs)
        if len(reference) != inputs.n or inputs.n == 0:
            return MetricResult.missing(self, f"class_agreement: {inputs.n} images but {len(reference)} references")
        try:
            model, _ = self._load()
        except UserError as exc:
            return MetricResult.missing(self, str(exc))
        pred, _ = fmnist.classify(model, inputs.images, inputs.device)
        pred_ref, _ = fmnist.classify(model, image_floats(reference), inputs.device)
        return MetricResult.of_images(self, (pred == pred_ref).double())


class _SetMetric(_FMNISTMetric):
    """A set metric on the classifier's features: vs the real test images or vs the 16-bit images."""

    higher_is_better = False
    against: str = "real"

    def __init__(self, classifier: str | Path | None = None, data: str | Path | None = None,
                 min_n: int | None = None):
        super().__init__(classifier, data)
        self.min_n = min_n

    def compute(self, inputs: MetricInputs) -> MetricResult:
        reference = inputs.stored("reference")
        n = inputs.n if reference is None else min(inputs.n, len(reference))
        if self.against == "reference" and reference is not None and len(reference) != inputs.n:
            return MetricResult.missing(self, f"{self.name}: {inputs.n} images but {len(reference)} references")
        try:
            model, digest = self._load()
            refusal, warning = self.check_n(n, model.n_features)
            if refusal:
                return MetricResult.missing(self, refusal)
            feats = features(model, inputs.stored(), inputs.device)
            if self.against == "reference":
                assert reference is not None  # Metric.__call__ reports a missing reference (needs)
                return self.score(feats, features(model, reference, inputs.device), inputs, warning)
            return self.score(feats, self.real(model, digest, inputs.cache, inputs.device), inputs, warning)
        except UserError as exc:
            return MetricResult.missing(self, str(exc))

    def check_n(self, n: int, dim: int) -> tuple[str | None, str]:
        raise NotImplementedError

    def real(self, model: fmnist.FMNISTClassifier, digest: str, cache: Cache, device: str) -> Any:
        raise NotImplementedError

    def score(self, feats: np.ndarray, other: Any, inputs: MetricInputs, warning: str) -> MetricResult:
        raise NotImplementedError


class _Frechet(_SetMetric):
    def check_n(self, n: int, dim: int) -> tuple[str | None, str]:
        return n_problem(self.name, n, dim, self.min_n)

    def real(self, model: fmnist.FMNISTClassifier, digest: str, cache: Cache, device: str) -> Any:
        return real_feature_stats(model, digest, cache, self.data, device)

    def score(self, feats: np.ndarray, other: Any, inputs: MetricInputs, warning: str) -> MetricResult:
        return frechet_result(self, feats, other, inputs.bootstrap, warning, inputs.device)


class _KID(_SetMetric):
    def check_n(self, n: int, dim: int) -> tuple[str | None, str]:
        floor = max(2, self.min_n or 2)
        return (f"{self.name}: needs at least {floor} images on each side, got {n}" if n < floor else None), ""

    def real(self, model: fmnist.FMNISTClassifier, digest: str, cache: Cache, device: str) -> Any:
        return real_features(model, digest, cache, self.data, device)

    def score(self, feats: np.ndarray, other: Any, inputs: MetricInputs, warning: str) -> MetricResult:
        return kid_result(self, feats, other, self.against == "reference", inputs.bootstrap)


@register_metric
class FDFMNIST(_Frechet):
    """Frechet distance of the Fashion-MNIST classifier's features: generated vs the 10k test images."""

    name = "fd_fmnist"
    needs = frozenset()
    against = "real"


@register_metric
class FDFMNISTRef(_Frechet):
    """Frechet distance of the Fashion-MNIST classifier's features: generated vs the 16-bit images."""

    name = "fd_fmnist_ref"
    needs = frozenset({"reference"})
    against = "reference"


@register_metric
class KIDFMNIST(_KID):
    """KID of the Fashion-MNIST classifier's features: generated vs the 10k test images (needs the test set)."""

    name = "kid_fmnist"
    needs = frozenset()
    against = "real"


@register_metric
class KIDFMNISTRef(_KID):
    """KID of the Fashion-MNIST classifier's features: generated vs the 16-bit images."""

    name = "kid_fmnist_ref"
    needs = frozenset({"reference"})
    against = "reference"
