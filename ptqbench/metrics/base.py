"""The metric interface.

A metric is a registered class with ``name``, ``higher_is_better`` and what it ``needs``
(``reference`` images of the 16-bit model, the ``prompts``, a folder of ``real`` images).
``compute`` returns a :class:`MetricResult` with the value and the sample count ``n``; a metric
whose weights or inputs are missing returns ``status="not_computed"`` with a reason that names
the missing file, where it was looked for and how to provide it: never 0, never dropped.
A per-image metric also returns its ``per_image`` values, in the order of the inputs (the prompt
set's ``keys``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ptqbench.metrics.weights import WeightSpec
from ptqbench.registry import Registry

METRICS: Registry[type[Metric]] = Registry(
    "metric", group="ptqbench.metrics", builtins=("ptqbench.metrics.catalog",)
)
Need = Literal["reference", "prompts", "real"]


class MetricInputs:
    """Everything a metric may use: images ``[N, 3, H, W]`` on the CPU, optionally the 16-bit
    reference images (same prompts and seeds), the prompts, a folder of real images, a device,
    and the prompt ``keys`` of the images (real images are matched to them by file name).

    Images may be given as uint8, as their PNGs hold them (the runner does: a quarter of
    float32's memory at N = 5000, 1024 px), or as floats in [0, 1]. ``images`` and ``reference``
    always read as float32 in [0, 1] (converted on each access); metrics that stream read
    :meth:`stored` slices through :func:`image_floats` instead.
    """

    __slots__ = ("_images", "_reference", "device", "keys", "prompts", "real_dir")

    def __init__(
        self,
        images: torch.Tensor,
        reference: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        real_dir: Path | None = None,
        device: str = "cpu",
        keys: Sequence[str] | None = None,
    ):
        self._images, self._reference = images, reference
        self.prompts, self.real_dir, self.device = prompts, real_dir, device
        if keys is not None and len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        self.keys = None if keys is None else tuple(keys)

    @property
    def images(self) -> torch.Tensor:
        return image_floats(self._images)

    @property
    def reference(self) -> torch.Tensor | None:
        return None if self._reference is None else image_floats(self._reference)

    def stored(self, which: Literal["images", "reference"] = "images") -> torch.Tensor | None:
        """The images (or reference) as given: uint8 or float."""
        return self._images if which == "images" else self._reference

    @property
    def n(self) -> int:
        return int(self._images.shape[0])


def image_floats(
    images: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Images in [0, 1] as ``dtype`` on ``device`` (uint8 ones divided by 255 in ``dtype``)."""
    x = images.to(device=device, dtype=dtype)
    return x.div_(255) if images.dtype == torch.uint8 else x


@dataclass(frozen=True)
class MetricResult:
    name: str
    value: float | None
    n: int
    status: Literal["ok", "not_computed"] = "ok"
    reason: str = ""
    higher_is_better: bool = True
    per_image: tuple[float, ...] = ()

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
        return self.compute(inputs)


_FIELD = {"reference": "_reference", "prompts": "prompts", "real": "real_dir"}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: register a Metric subclass under its ``name``."""
    METRICS.register(cls.name, cls)
    return cls


def get_metric(name: str) -> Metric:
    return METRICS.get(name)()
