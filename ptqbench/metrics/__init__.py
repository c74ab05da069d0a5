"""Metric registry: image-quality metrics with ``higher_is_better`` and sample counts."""

from ptqbench.metrics.base import METRICS, Metric, MetricInputs, MetricResult, get_metric

__all__ = ["METRICS", "Metric", "MetricInputs", "MetricResult", "get_metric"]
