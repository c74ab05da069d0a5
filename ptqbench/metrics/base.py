"""The metric interface.

A metric is a registered class with ``name``, ``higher_is_better`` and what it ``needs``
(``reference`` images of the 16-bit model, the ``prompts``, a folder of ``real`` images).
``compute`` returns a :class:`MetricResult` with the value and the sample count ``n``; a metric
whose weights or inputs are missing returns ``status="not_computed"`` with a reason that names
the missing file, where it was looked for and how to provide it: never 0, never dropped.

A per-image metric also returns its ``per_image`` values, in the order of the inputs (the prompt
set's ``keys`` and seeds); calling the metric adds their bootstrap interval over prompts (``lo``,
``hi`` at ``level``, :mod:`ptqbench.uncertainty`). Set metrics (Frechet distances, KID) compute
their own interval from features. :func:`write_per_image` / :func:`read_per_image` keep the
per-image values of a run as one table (``per_image.csv``: key, seed, a column per metric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ptqbench.cache import Cache
from ptqbench.errors import UserError
from ptqbench.imagestore import ImageFolder
from ptqbench.metrics.weights import WeightSpec
from ptqbench.registry import Registry
from ptqbench.uncertainty import DEFAULT as DEFAULT_BOOTSTRAP
from ptqbench.uncertainty import Bootstrap, Interval, mean_interval

if TYPE_CHECKING:
    import pandas as pd

METRICS: Registry[type[Metric]] = Registry(
    "metric", group="ptqbench.metrics", builtins=("ptqbench.metrics.catalog",)
)
Need = Literal["reference", "prompts", "real"]


class MetricInputs:
    """Everything a metric may use: images ``[N, 3, H, W]`` on the CPU, optionally the 16-bit
    reference images (same prompts and seeds), the prompts, a folder of real images, a device,
    the run's :class:`~ptqbench.cache.Cache` (``--cache-dir``; by default the default root), where
    metrics keep what they compute once (e.g. real-image statistics), and how intervals are
    computed (``bootstrap``; None: no interval),
    and the prompt ``keys`` of the images (real images are matched to them by file name).

    Images may be given as uint8, as their PNGs hold them (the runner does: a quarter of
    float32's memory at N = 5000, 1024 px), or as floats in [0, 1]. ``images`` and ``reference``
    always read as float32 in [0, 1] (converted on each access); metrics that stream read
    :meth:`stored` slices through :func:`image_floats` instead. Images may also be a folder on
    disk (:class:`~ptqbench.imagestore.ImageFolder`, :meth:`from_folders`): ``stored()`` is then
    the folder, whose slices read only their PNGs, so host memory stays bounded at any N.
    """

    __slots__ = ("_images", "_reference", "bootstrap", "cache", "device", "keys", "prompts", "real_dir")

    def __init__(
        self,
        images: torch.Tensor | ImageFolder,
        reference: torch.Tensor | ImageFolder | None = None,
        prompts: Sequence[str] | None = None,
        real_dir: Path | None = None,
        device: str = "cpu",
        bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
        cache: Cache | None = None,
        keys: Sequence[str] | None = None,
    ):
        self._images, self._reference = images, reference
        self.prompts, self.real_dir, self.device = prompts, real_dir, device
        self.bootstrap = bootstrap
        self.cache = cache if cache is not None else Cache()
        if keys is not None and len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        self.keys = None if keys is None else tuple(keys)

    @property
    def images(self) -> torch.Tensor:
        return image_floats(self._images)

    @property
    def reference(self) -> torch.Tensor | None:
        return None if self._reference is None else image_floats(self._reference)

    @classmethod
    def from_folders(
        cls,
        images: str | Path,
        reference: str | Path | None = None,
        prompts: Sequence[str] | None = None,
        real_dir: Path | None = None,
        device: str = "cpu",
        bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
        cache: Cache | None = None,
    ) -> MetricInputs:
        """Inputs read lazily from image folders (``index.json`` and PNGs, as generation writes
        them); the prompt keys are the folder's."""
        folder = ImageFolder(images)
        ref = None if reference is None else ImageFolder(reference)
        return cls(folder, ref, prompts, real_dir, device, bootstrap, cache, folder.keys)

    def stored(self, which: Literal["images", "reference"] = "images") -> torch.Tensor | ImageFolder | None:
        """The images (or reference) as given: uint8 or float tensors, or a lazily read folder."""
        return self._images if which == "images" else self._reference

    @property
    def n(self) -> int:
        return int(self._images.shape[0])


def image_floats(
    images: torch.Tensor | ImageFolder, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Images in [0, 1] as ``dtype`` on ``device`` (uint8 ones divided by 255 in ``dtype``; a folder is read whole)."""
    if isinstance(images, ImageFolder):
        images = images[:]
    x = images.to(device=device, dtype=dtype)
    return x.div_(255) if images.dtype == torch.uint8 else x


@dataclass(frozen=True)
class MetricResult:
    """A metric's value over ``n`` images; ``per_image`` (per-image metrics) in the inputs' order;
    ``lo``/``hi`` its confidence interval at ``level``; ``warning`` a caveat of a computed value."""

    name: str
    value: float | None
    n: int
    status: Literal["ok", "not_computed"] = "ok"
    reason: str = ""
    higher_is_better: bool = True
    per_image: tuple[float, ...] = ()
    lo: float | None = None
    hi: float | None = None
    level: float | None = None
    warning: str = ""

    @classmethod
    def missing(cls, metric: Metric, reason: str) -> MetricResult:
        return cls(metric.name, None, 0, "not_computed", reason, metric.higher_is_better)

    @classmethod
    def of_images(cls, metric: Metric, values: Sequence[float] | torch.Tensor) -> MetricResult:
        """The mean of per-image ``values`` (kept in order), or not computed when one is not finite."""
        per_image = tuple(float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values))
        if not per_image:
            return cls.missing(metric, f"{metric.name}: no images")
        if not all(math.isfinite(v) for v in per_image):
            return cls.missing(metric, f"{metric.name}: non-finite value (images hold NaN or inf)")
        return cls(metric.name, math.fsum(per_image) / len(per_image), len(per_image),
                   higher_is_better=metric.higher_is_better, per_image=per_image)

    def with_interval(self, interval: Interval) -> MetricResult:
        return replace(self, lo=interval.lo, hi=interval.hi, level=interval.level)

    def summary(self) -> dict[str, float]:
        """What a run logs of a computed result: ``<name>``, ``<name>_n``, ``<name>.lo``/``.hi``."""
        if self.status != "ok" or self.value is None:
            return {}
        out = {self.name: self.value, f"{self.name}_n": float(self.n)}
        if self.lo is not None and self.hi is not None:
            out.update({f"{self.name}.lo": self.lo, f"{self.name}.hi": self.hi})
        return out


class Metric:
    """Base class for metrics; subclasses set the class attributes and ``compute``."""

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[Need]] = frozenset()
    weight_files: ClassVar[tuple[WeightSpec, ...]] = ()  # the files it loads (``ptqbench list metrics`` checks them)

    def compute(self, inputs: MetricInputs) -> MetricResult:
        raise NotImplementedError

    def __call__(self, inputs: MetricInputs) -> MetricResult:
        missing = [n for n in sorted(self.needs) if getattr(inputs, _FIELD[n]) is None]
        if missing:
            return MetricResult.missing(self, f"{self.name} needs {', '.join(missing)}, which this run did not provide")
        result = self.compute(inputs)
        if result.per_image and result.lo is None and inputs.bootstrap is not None:
            result = result.with_interval(mean_interval(result.per_image, inputs.bootstrap))
        return result


_FIELD = {"reference": "_reference", "prompts": "prompts", "real": "real_dir"}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: register a Metric subclass under its ``name``."""
    METRICS.register(cls.name, cls)
    return cls


def get_metric(name: str, **options: Any) -> Metric:
    """A metric by name, built with its ``options`` (e.g. ``min_n`` of a Frechet distance)."""
    cls = METRICS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise UserError(f"metric {name}: bad options {sorted(options)} ({err})") from None


# ----------------------------------------------------------------------------- per-image table



def per_image_frame(keys: Sequence[str], seeds: Sequence[int], results: Mapping[str, MetricResult]) -> pd.DataFrame:
    """One row per image (``key``, ``seed``, a column per metric with per-image values), in input order."""
    import pandas as pd

    if len(keys) != len(seeds):
        raise ValueError(f"{len(keys)} keys but {len(seeds)} seeds")
    frame = pd.DataFrame({"key": list(keys), "seed": [int(s) for s in seeds]})
    for name in sorted(results):
        values = results[name].per_image
        if not values:
            continue
        if len(values) != len(keys):
            raise ValueError(f"{name}: {len(values)} per-image values for {len(keys)} images")
        frame[name] = list(values)
    return frame


def write_per_image(path: Path, keys: Sequence[str], seeds: Sequence[int],
                    results: Mapping[str, MetricResult]) -> Path:
    """Write :func:`per_image_frame` as CSV (floats round-trip exactly)."""
    return write_per_image_frame(path, per_image_frame(keys, seeds, results))


def write_per_image_frame(path: Path, frame: pd.DataFrame) -> Path:
    """Write a per-image table (``key``, ``seed``, metric columns) as CSV: floats round-trip exactly,
    text cells (e.g. another table's values kept as read) are written as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.17g", lineterminator="\n")
    return path


def read_per_image(path: Path) -> pd.DataFrame:
    """A table written by :func:`write_per_image` (keys as strings, seeds as integers)."""
    import pandas as pd

    frame = pd.read_csv(path, dtype={"key": str}, keep_default_na=False, na_values=[""])
    if list(frame.columns[:2]) != ["key", "seed"]:
        raise ValueError(f"{path}: not a per-image table (columns {list(frame.columns)[:3]}...)")
    return frame
