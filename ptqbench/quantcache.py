"""Quantized layers kept on disk while a cell runs, so a killed cell resumes without requantizing.

:func:`quantize_cached` runs the quantization once and saves the quantized modules (with their
per-layer seconds) under a key of everything that changes them: the model's identity, the method's
configuration (formats, rank, seeds), per-layer ranks, the layer plan and the calibration key.
A resumed cell finds the file and swaps the saved modules in: the same layers, bit for bit.
The runner deletes the folder once the cell finished (the images are what is kept).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench import distributed as dist
from ptqbench.cache import cache_key
from ptqbench.generation import StageProgress
from ptqbench.method import Method
from ptqbench.patching import LayerPlan, PatchReport, replace_module, select_layers

FOLDER = "quantized"


def quantized_key(
    identity: Mapping[str, Any], method: Method, plan: LayerPlan, ranks: Mapping[str, int] | None,
    calibration: str | None,
) -> str:
    """Key of a model's quantized layers (``calibration``: the statistics' cache key, or None)."""
    return cache_key("quantized", dict(identity), method.name, method.params(), plan.key(),
                     dict(sorted((ranks or {}).items())), calibration)


def quantize_cached(
    path: Path,
    transformer: nn.Module,
    plan: LayerPlan,
    progress: StageProgress,
    quantize: Callable[[], tuple[PatchReport, dict[str, float]]],
) -> tuple[PatchReport, dict[str, float]]:
    """``quantize()`` (which patches ``transformer`` and returns its report and per-layer seconds),
    saved to ``path``; when ``path`` exists, its modules are patched in instead."""
    if dist.broadcast_object(path.is_file()):  # one decision for every rank (quantizing is collective)
        saved = torch.load(path, map_location="cpu", weights_only=False)
        selection = select_layers(transformer, plan)
        device = next(transformer.parameters()).device
        quantized = {name: module.to(device) for name, module in saved["quantized"].items()}
        if set(quantized) != set(selection.layers):
            raise RuntimeError(f"{path}: saved layers do not match the selection; delete it to requantize")
        for name, module in quantized.items():
            replace_module(transformer, name, module)
            progress.advance()
        return PatchReport(quantized, selection.skipped, dict(selection.layers)), dict(saved["seconds"])
    report, seconds = quantize()
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"quantized": report.quantized, "seconds": seconds}, tmp)
        os.replace(tmp, path)
    return report, seconds
