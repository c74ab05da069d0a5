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

from ptqbench.registry import Registry

METRICS: Registry[type[Metric]] = Registry(
    "metric", group="ptqbench.metrics", builtins=("ptqbench.metrics.catalog",)
)
Need = Literal["reference", "prompts", "real"]


@dataclass(frozen=True)
class MetricInputs:
    """Everything a metric may use. Images are float32 ``[N, 3, H, W]`` in [0, 1] (CPU)."""

    images: torch.Tensor
    reference: torch.Tensor | None = None
    prompts: Sequence[str] | None = None
    real_dir: Path | None = None
    device: str = "cpu"


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


_FIELD = {"reference": "reference", "prompts": "prompts", "real": "real_dir"}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: register a Metric subclass under its ``name``."""
    METRICS.register(cls.name, cls)
    return cls


def get_metric(name: str) -> Metric:
    return METRICS.get(name)()
