"""Calibration: run the 16-bit pipeline on calibration prompts and collect layer-input statistics.

Forward pre-hooks on the targeted transformer layers see every denoising step's batched call
(both classifier-free-guidance halves). Statistics are bounded in memory (per-channel abs-max,
a seeded reservoir of ``rows`` input rows, ``X^T X`` only when a method asks) and cached as
safetensors under ``calibration/<key>``, keyed on everything that changes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptqbench import distributed as dist
from ptqbench.cache import Cache, cache_key
from ptqbench.errors import UserError
from ptqbench.generation import NullProgress, StageProgress, model_identity
from ptqbench.layers import QuantLinear
from ptqbench.models.base import GenSettings, Pipeline
from ptqbench.prompts import SEED_RULE, PromptSet, get_prompt_set, seed_for
from ptqbench.stats import SAMPLER, LayerStats, StatsCollector, StatsSpec

STATS_FILE = "stats.safetensors"
_SEP = "::"


@dataclass(frozen=True)
class CalibConfig:
    """Calibration prompts and sampling; ``None`` settings mean the evaluation's own. A suite's
    ``calibration:`` section is one (``set`` and ``n`` name ``prompt_set`` and ``n_prompts``).

    ``seed`` seeds the row reservoir and, when not 0, is mixed into each prompt's noise seed.
    ``rows`` is the reservoir size per layer (merged with what the method needs).
    ``path`` locates external prompt files (mjhq-calib's meta_data.json).
    """

    prompt_set: str = "builtin-calib"
    n_prompts: int = 64
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    seed: int = 0
    rows: int = 256
    path: str | None = None

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise UserError(f"calibration.n_prompts: must be >= 1, got {self.n_prompts}")
        if self.rows < 0:
            raise UserError(f"calibration.rows: must be >= 0, got {self.rows}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"calibration.steps: must be >= 1 or null, got {self.steps}")
        if self.resolution is not None and self.resolution < 1:
            raise UserError(f"calibration.resolution: must be >= 1 or null, got {self.resolution}")

    def settings(self, base: GenSettings) -> GenSettings:
        """The sampling settings of calibration: ``base`` with this config's overrides."""
        return GenSettings(
            steps=self.steps if self.steps is not None else base.steps,
            guidance=self.guidance if self.guidance is not None else base.guidance,
            resolution=self.resolution if self.resolution is not None else base.resolution,
            batch_size=base.batch_size,
        )

    def prompts(self) -> PromptSet:
        return get_prompt_set(self.prompt_set, self.n_prompts, self.path)

    def seeds(self, prompts: PromptSet) -> list[int]:
        return [seed_for(k if self.seed == 0 else f"{k}#seed{self.seed}") for k in prompts.keys]


def effective_spec(spec: StatsSpec, calib: CalibConfig) -> StatsSpec:
    """What calibration collects: the method's needs, plus abs-max and ``calib.rows`` sample rows
    (cheap, shared across methods, and used for per-layer output errors)."""
    return spec | StatsSpec(absmax=True, rows=calib.rows)


def calibration_key(
    pipeline: Pipeline, layer_names: list[str], spec: StatsSpec, calib: CalibConfig, settings: GenSettings
) -> str:
    """Cache key over everything that changes the statistics."""
    prompts = calib.prompts()
    s = calib.settings(settings)
    return cache_key(
        "calibration",
        model_identity(pipeline),
        {"steps": s.steps, "guidance": s.guidance, "resolution": s.resolution, "batch_size": s.batch_size},
        {"name": prompts.name, "keys": list(prompts.keys), "prompts": list(prompts.prompts)},
        {"seed_rule": SEED_RULE, "seed": calib.seed, "sampler": SAMPLER},
        sorted(layer_names),
        effective_spec(spec, calib),
    )


def save_stats(path: str | Path, stats: Mapping[str, LayerStats]) -> None:
    tensors = {f"{name}{_SEP}{field}": t for name, st in stats.items() for field, t in st.state().items()}
    save_file(tensors, str(path), metadata={"layers": json.dumps(list(stats))})


def load_stats(path: str | Path) -> dict[str, LayerStats]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = json.loads(f.metadata()["layers"])
    tensors = load_file(str(path))
    grouped: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for k, t in tensors.items():
        name, _, field = k.rpartition(_SEP)
        grouped[name][field] = t
    return {n: LayerStats.from_state(grouped[n]) for n in names}


def _check_unquantized(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    if any(isinstance(m, QuantLinear) for m in model.modules()) or any(
        isinstance(m, QuantLinear) for m in layers.values()
    ):
        raise RuntimeError("calibrate needs the 16-bit transformer: restore_model() it before calibrating")


@torch.no_grad()
def calibrate(
    pipeline: Pipeline,
    layers: Mapping[str, nn.Module],
    spec: StatsSpec,
    calib: CalibConfig,
    settings: GenSettings,
    cache: Cache,
    progress: StageProgress | None = None,
) -> dict[str, LayerStats]:
    """Statistics of ``layers``' inputs over the calibration prompts, every step (cached on disk).

    Returns float32 CPU statistics per layer name; the method's ``spec`` is merged with
    :func:`effective_spec`.
    """
    progress = progress or NullProgress()
    names = list(layers)
    key = calibration_key(pipeline, names, spec, calib, settings)
    path = cache.path("calibration", key) / STATS_FILE
    prompts = calib.prompts()
    with dist.held_by_main(lambda: cache.lock("calibration", key)):
        if dist.broadcast_object(cache.done("calibration", key)):
            progress.advance(len(prompts))
            return load_stats(path)
        _check_unquantized(pipeline.transformer, layers)
        s = calib.settings(settings)
        with StatsCollector(layers, effective_spec(spec, calib), seed=calib.seed) as collector:
            feed_batches(pipeline, prompts, calib.seeds(prompts), s, collector, progress)
        stats = collector.result()  # collective: every rank's batches, reduced exactly
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_stats(path, stats)
            meta = {"model": model_identity(pipeline), "calibration": dataclasses.asdict(calib), "settings": s.__dict__}
            (path.parent / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            cache.mark_done("calibration", key)
        dist.barrier()
    return stats


def feed_batches(
    pipeline: Pipeline,
    prompts: PromptSet,
    seeds: list[int],
    settings: GenSettings,
    collector: StatsCollector,
    progress: StageProgress,
) -> None:
    """Run this rank's share of the calibration batches (:func:`~ptqbench.distributed.batch_share`),
    telling ``collector`` each batch's global index; progress counts every rank's images."""
    mine = dist.batch_share(len(prompts), settings.batch_size)
    for start in range(0, len(mine), settings.batch_size):
        batch = mine[start : start + settings.batch_size]
        collector.begin_batch(batch[0] // settings.batch_size)
        pipeline.generate([prompts.prompts[i] for i in batch], [seeds[i] for i in batch], settings)
        progress.advance(len(batch) * dist.size())
