"""The metric interface.

A metric is a registered class with ``name``, ``higher_is_better`` and what it ``needs``
(``reference`` images of the 16-bit model, the ``prompts``, a folder of ``real`` images).
``compute`` returns a :class:`MetricResult` with the value and the sample count ``n``; a metric
whose weights or inputs are missing returns ``status="not_computed"`` with a reason that names
the missing file, where it was looked for and how to provide it: never 0, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ptqbench.imagestore import ImageFolder
from ptqbench.registry import Registry

METRICS: Registry[type[Metric]] = Registry(
    "metric", group="ptqbench.metrics", builtins=("ptqbench.metrics.catalog",)
)
Need = Literal["reference", "prompts", "real"]


class MetricInputs:
    """Everything a metric may use: images ``[N, 3, H, W]`` on the CPU, optionally the 16-bit
    reference images (same prompts and seeds), the prompts, a folder of real images, a device.

    Images may be given as uint8, as their PNGs hold them (the runner does: a quarter of
    float32's memory at N = 5000, 1024 px), or as floats in [0, 1]. ``images`` and ``reference``
    always read as float32 in [0, 1] (converted on each access); metrics that stream read
    :meth:`stored` slices through :func:`image_floats` instead. Images may also be a folder on
    disk (:class:`~ptqbench.imagestore.ImageFolder`, :meth:`from_folders`): ``stored()`` is then
    the folder, whose slices read only their PNGs, so host memory stays bounded at any N.
    """

    __slots__ = ("_images", "_reference", "device", "prompts", "real_dir")

    def __init__(
        self,
        images: torch.Tensor | ImageFolder,
        reference: torch.Tensor | ImageFolder | None = None,
        prompts: Sequence[str] | None = None,
        real_dir: Path | None = None,
        device: str = "cpu",
    ):
        self._images, self._reference = images, reference
        self.prompts, self.real_dir, self.device = prompts, real_dir, device

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
    ) -> MetricInputs:
        """Inputs read lazily from image folders (``index.json`` and PNGs, as generation writes them)."""
        ref = None if reference is None else ImageFolder(reference)
        return cls(ImageFolder(images), ref, prompts, real_dir, device)

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
    name: str
    value: float | None
    n: int
    status: Literal["ok", "not_computed"] = "ok"
    reason: str = ""
    higher_is_better: bool = True

    @classmethod
    def missing(cls, metric: Metric, reason: str) -> MetricResult:
        return cls(metric.name, None, 0, "not_computed", reason, metric.higher_is_better)


class Metric:
    """Base class for metrics; subclasses set the class attributes and ``compute``."""

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[Need]] = frozenset()

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
