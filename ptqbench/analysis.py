"""Per-layer error analysis shared by the runner and ``ptqbench layers``.

The relative output error ``rel_output_error`` is measured on held-out input rows, which the
method never saw (``ptqbench layers``: the evaluation half of its texts; the runner: the held-out
calibration rows, :attr:`ptqbench.stats.StatsSpec.heldout`); the runner also records
``insample_output_error`` on rows the method was calibrated on, for methods that used rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pandas as pd
import torch
from torch import nn

from ptqbench.layers import QuantLinear, dense_weight


@torch.no_grad()
def relative_weight_error(layer: nn.Module, quantized: QuantLinear) -> float:
    """``||W - W_eff|| / ||W||`` (Frobenius, float64)."""
    w = dense_weight(layer).detach().double()
    err = torch.linalg.norm(w - quantized.effective_weight().detach().double())
    return float(err / torch.linalg.norm(w).clamp_min(1e-30))


@torch.no_grad()
def relative_output_error(layer: nn.Module, quantized: QuantLinear, x: torch.Tensor) -> float:
    """``||y - y_q|| / ||y||`` on input rows ``x`` [tokens, in], activations quantized as deployed."""
    w = dense_weight(layer)
    x = x.to(device=w.device, dtype=w.dtype)
    bias = layer.bias
    y = nn.functional.linear(x, w, bias).double()
    yq = quantized._linear(x).double()
    return float(torch.linalg.norm(y - yq) / torch.linalg.norm(y).clamp_min(1e-30))


@torch.no_grad()
def layer_errors(
    originals: Mapping[str, nn.Module],
    quantized: Mapping[str, QuantLinear],
    inputs: Mapping[str, torch.Tensor] | None = None,
    seconds: Mapping[str, float] | None = None,
    insample: Mapping[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One row per quantized layer: shape, bits, bits per weight, relative weight error,
    relative output error on the held-out rows ``inputs`` (NaN where a layer has none), seconds
    spent quantizing, ``info`` (what the method decided, as JSON: chosen smoothing, SVD, LoRaQ loss
    curve, ...); with ``insample`` (rows the method saw), an ``insample_output_error`` column."""
    rows = []
    for name, q in quantized.items():
        layer = originals[name]
        x = _nonempty(inputs, name)
        row = {
            "layer": name,
            "out_features": q.out_features,
            "in_features": q.in_features,
            "rank": q.branch.rank if q.branch is not None else 0,
            "bits": q.bits(),
            "bits_per_weight": q.bits() / (q.out_features * q.in_features),
            "rel_weight_error": relative_weight_error(layer, q),
            "rel_output_error": float("nan") if x is None else relative_output_error(layer, q, x),
            "seconds": float("nan") if seconds is None else seconds.get(name, float("nan")),
            "info": json.dumps(getattr(q, "info", {}), default=str),  # what the method decided (JSON)
        }
        if insample is not None:
            seen = _nonempty(insample, name)
            row["insample_output_error"] = float("nan") if seen is None else relative_output_error(layer, q, seen)
        rows.append(row)
    return pd.DataFrame(rows)


def _nonempty(inputs: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    x = None if inputs is None else inputs.get(name)
    return x if x is not None and x.shape[0] > 0 else None
