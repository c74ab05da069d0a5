"""Evaluate one (pipeline, method) cell: calibrate, quantize, generate, score, restore.

:func:`evaluate` calibrates (always: besides what the method uses, calibration draws held-out rows
per layer, never given to the method, on which every method's per-layer output error is measured),
quantizes the transformer's selected layers in place, records per-layer errors (see
:mod:`ptqbench.analysis`), generates images with the prompts' fixed seeds,
scores the metrics against the cached 16-bit reference images and always restores the
transformer, so one loaded pipeline serves many cells. ``method=None`` is the 16-bit reference.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ptqbench.analysis import layer_errors
from ptqbench.cache import Cache
from ptqbench.calibration import CalibConfig, calibrate
from ptqbench.errors import UserError
from ptqbench.generation import NullProgress, StageProgress, generate_images, reference_images
from ptqbench.memory import model_bits
from ptqbench.method import Method
from ptqbench.metrics.base import MetricInputs, MetricResult, get_metric
from ptqbench.models.base import GenSettings, Pipeline
from ptqbench.patching import LayerPlan, PatchReport, quantize_model, restore_model, select_layers
from ptqbench.prompts import PromptSet, get_prompt_set
from ptqbench.shapes import model_bytes, other_elements
from ptqbench.stats import LayerStats, StatsSpec
from ptqbench.uncertainty import DEFAULT as DEFAULT_BOOTSTRAP
from ptqbench.uncertainty import Bootstrap

__all__ = ["EvalResult", "evaluate"]

LAYER_ERROR_COLUMNS = (
    "layer", "out_features", "in_features", "rank", "bits", "bits_per_weight",
    "rel_weight_error", "rel_output_error", "seconds", "info", "insample_output_error",
)
HELDOUT_ROWS = 256  # held-out calibration rows per layer: rel_output_error (the method never saw them)
SAMPLE_ROWS = 64  # of the method's calibration rows: insample_output_error (methods that use rows)

REFERENCE_ITSELF = "the 16-bit reference is not compared with itself"

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Everything one cell produced (see the evaluate contract)."""

    metrics: dict[str, MetricResult]
    layer_errors: pd.DataFrame
    bits: int
    weights: int
    bits_per_weight: float
    model_bytes: int
    quantized: list[str]
    skipped: dict[str, str]
    images_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


def _calibrate(
    pipeline: Pipeline,
    layers: Mapping[str, nn.Module],
    spec: StatsSpec,
    calibration: CalibConfig,
    settings: GenSettings,
    cache: Cache,
    progress: StageProgress,
) -> dict[str, LayerStats]:
    """The method's statistics plus HELDOUT_ROWS held-out rows per layer. For a method that uses no
    statistics the held-out rows only serve the per-layer output error: its calibration prompts are
    capped at the set's size, and a set that cannot be loaded leaves the layers without (logged)."""
    collect = spec | StatsSpec(heldout=HELDOUT_ROWS)
    if spec.empty:
        try:
            available = len(get_prompt_set(calibration.prompt_set, path=calibration.path))
        except UserError as exc:
            log.warning("no held-out rows for the per-layer output errors: %s", exc)
            return {}
        calibration = dataclasses.replace(calibration, n_prompts=min(calibration.n_prompts, available))
    progress.stage("calibrate", calibration.n_prompts)
    return calibrate(pipeline, layers, collect, calibration, settings, cache, progress)


def heldout_inputs(stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
    """The held-out rows of each layer (those calibration drew besides the method's sample)."""
    return {name: st.heldout for name, st in stats.items() if st.heldout is not None}


def insample_inputs(stats: Mapping[str, LayerStats] | None, spec: StatsSpec) -> dict[str, torch.Tensor]:
    """Up to SAMPLE_ROWS of the rows a method was given, for methods that use rows (else none)."""
    if not stats or spec.rows == 0:
        return {}
    return {name: st.rows[:SAMPLE_ROWS] for name, st in stats.items() if st.rows is not None}


class _Timer:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def _quantize(
    transformer: nn.Module,
    method: Method,
    stats: Mapping[str, LayerStats] | None,
    plan: LayerPlan,
    ranks: Mapping[str, int] | None,
    progress: StageProgress,
) -> tuple[PatchReport, dict[str, float]]:
    """quantize_model with per-layer seconds (time between progress callbacks)."""
    seconds: dict[str, float] = {}
    last = [time.perf_counter()]

    def tick(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = now - last[0]
        last[0] = now
        progress.advance()

    device = next(transformer.parameters()).device
    moved = None if stats is None else {k: v.to(device) for k, v in stats.items()}
    return quantize_model(transformer, method, moved, plan, ranks, progress=tick), seconds


def evaluate(
    pipeline: Pipeline,
    method: Method | None,
    prompts: PromptSet,
    *,
    metrics: Sequence[str],
    settings: GenSettings,
    calibration: CalibConfig,
    cache: Cache,
    out_dir: Path,
    plan: LayerPlan | None = None,
    ranks: dict[str, int] | None = None,
    progress: StageProgress | None = None,
    real_dir: Path | None = None,
    bootstrap: Bootstrap | None = DEFAULT_BOOTSTRAP,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvalResult:
    """Run one cell; ``method=None`` is the 16-bit reference (its images are the cached reference).

    Quantized images go to ``out_dir/images``; ``real_dir`` (real images, for FID) is passed to
    the metrics, ``bootstrap`` how they compute intervals (None: none) and ``metric_options``
    the options of each metric by name (e.g. ``{"fid": {"min_n": 1000}}``). Timings (seconds):
    reference, calibrate, quantize, generate, metrics, total.
    """
    progress = progress or NullProgress()
    start = time.perf_counter()
    timings = {"reference": 0.0, "calibrate": 0.0, "quantize": 0.0, "generate": 0.0, "metrics": 0.0}
    options = metric_options or {}
    scorers = {name: get_metric(name, **options.get(name, {})) for name in metrics}  # unknown names fail first
    transformer = pipeline.transformer
    plan = plan or LayerPlan.for_model(transformer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    progress.stage("reference", len(prompts))
    with _Timer(timings, "reference"):
        ref_dir, reference = reference_images(pipeline, prompts, settings, cache, progress, uint8=True)

    selection = select_layers(transformer, plan)
    if method is None:
        shapes = selection.shapes()
        bits, weights = model_bits(None, shapes), sum(s.weights for s in shapes)
        total_bytes = model_bytes(bits, other_elements(transformer, selection.layers))
        errors = pd.DataFrame(columns=list(LAYER_ERROR_COLUMNS))
        images, images_dir, quantized, skipped = reference, ref_dir, [], dict(selection.skipped)
    else:
        spec = method.stats_spec()
        with _Timer(timings, "calibrate"):
            stats = _calibrate(pipeline, selection.layers, spec, calibration, settings, cache, progress)
        given = None if spec.empty else {name: st.without_heldout() for name, st in stats.items()}
        report = None
        try:
            progress.stage("quantize", len(selection.layers))
            with _Timer(timings, "quantize"):
                report, seconds = _quantize(transformer, method, given, plan, ranks, progress)
            errors = layer_errors(
                report.originals, report.quantized, heldout_inputs(stats), seconds, insample_inputs(given, spec)
            )
            progress.stage("generate", len(prompts))
            images_dir = out_dir / "images"
            with _Timer(timings, "generate"):
                images = generate_images(pipeline, prompts, settings, images_dir, progress, uint8=True)
        finally:
            if report is not None:
                restore_model(transformer, report)
        bits, weights = report.bits(), report.weights()
        total_bytes = model_bytes(bits, other_elements(transformer, report.originals))
        quantized, skipped = list(report.quantized), dict(report.skipped)

    progress.stage("metrics", len(scorers))
    results: dict[str, MetricResult] = {}
    with _Timer(timings, "metrics"):
        inputs = MetricInputs(images, reference, list(prompts.prompts), real_dir, str(pipeline.device),
                              bootstrap=bootstrap, cache=cache, keys=prompts.keys)
        for name, scorer in scorers.items():
            if method is None and "reference" in scorer.needs:
                results[name] = MetricResult.missing(scorer, REFERENCE_ITSELF)
            else:
                results[name] = scorer(inputs)
            progress.advance()
    timings["total"] = time.perf_counter() - start
    return EvalResult(
        metrics=results,
        layer_errors=errors,
        bits=bits,
        weights=weights,
        bits_per_weight=bits / weights if weights else 0.0,
        model_bytes=total_bytes,
        quantized=quantized,
        skipped=skipped,
        images_dir=images_dir,
        timings=timings,
    )
