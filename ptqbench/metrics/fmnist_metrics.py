"""Metrics of the shipped Fashion-MNIST model, computed with its shipped classifier.

- ``class_accuracy``: fraction of generated images that the classifier assigns to the class
  their prompt names (higher is better).
- ``fd_fmnist``: Frechet distance between the classifier's penultimate features (128-d) of the
  generated images and of the 10k real Fashion-MNIST test images (lower is better). Not FID: the
  features are this classifier's, not Inception's; like FID it is only comparable at equal n.
  The real statistics ship as ``assets/fmnist_test_feature_stats.npz``, tied to the classifier
  by its SHA-256; for another classifier they are computed from the test set and cached.
- ``fd_fmnist_ref``: the same distance between the generated images and the 16-bit model's
  images for the same prompts and seeds (fidelity to the unquantized model, at the distribution
  level). ``fd_fmnist`` alone does not rank fidelity: guidance narrows the 16-bit model's samples,
  and quantization noise can widen them towards the real data (H100, n = 200: 70.7 for the 16-bit
  model, 44.6 for W4A4 mxfp4 RTN).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ptqbench.cache import Cache, cache_key
from ptqbench.errors import UserError
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, image_floats, register_metric
from ptqbench.metrics.frechet import feature_stats, frechet_distance_from_stats
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


def _feature_stats(
    model: fmnist.FMNISTClassifier, images: torch.Tensor, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier's features of ``images`` (uint8 or float in [0, 1])."""
    return feature_stats(fmnist.classify(model, image_floats(images), device)[1].numpy())


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
        value = float((pred == labels).float().mean())
        return MetricResult(self.name, value, len(labels), higher_is_better=self.higher_is_better)


@register_metric
class FDFMNIST(_FMNISTMetric):
    """Frechet distance of the Fashion-MNIST classifier's features: generated vs the 10k test images."""

    name = "fd_fmnist"
    higher_is_better = False
    needs = frozenset()

    def compute(self, inputs: MetricInputs) -> MetricResult:
        n = inputs.n
        if n < 2:
            return MetricResult.missing(self, f"fd_fmnist needs at least 2 images, got {n}")
        try:
            model, digest = self._load()
            mu_r, sigma_r = real_feature_stats(model, digest, inputs.cache, self.data, inputs.device)
        except UserError as exc:
            return MetricResult.missing(self, str(exc))
        value = frechet_distance_from_stats(*_feature_stats(model, inputs.stored(), inputs.device), mu_r, sigma_r)
        return MetricResult(self.name, value, n, higher_is_better=self.higher_is_better)


@register_metric
class FDFMNISTRef(_FMNISTMetric):
    """Frechet distance of the Fashion-MNIST classifier's features: generated vs the 16-bit images."""

    name = "fd_fmnist_ref"
    higher_is_better = False
    needs = frozenset({"reference"})

    def compute(self, inputs: MetricInputs) -> MetricResult:
        n = inputs.n
        reference = inputs.stored("reference")
        assert reference is not None  # Metric.__call__ reports a missing reference (needs)
        if n < 2 or len(reference) < 2:
            return MetricResult.missing(self, f"fd_fmnist_ref needs at least 2 images on each side, got {n}")
        try:
            model, _ = self._load()
        except UserError as exc:
            return MetricResult.missing(self, str(exc))
        stats = [_feature_stats(model, x, inputs.device) for x in (inputs.stored(), reference)]
        value = frechet_distance_from_stats(*stats[0], *stats[1])
        return MetricResult(self.name, value, n, higher_is_better=self.higher_is_better)
