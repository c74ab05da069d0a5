"""RTN: round to nearest. ``y = Qa(x) Q1(W)^T + b``; no calibration, the floor to beat."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqbench.layers import QuantLinear
from ptqbench.method import Method, register_method
from ptqbench.stats import LayerStats


@register_method("rtn")
@dataclass(frozen=True)
class RTN(Method):
    """Round to nearest: weights quantized once, activations per token; no calibration."""

    def quantize_layer(self, layer: nn.Module, stats: LayerStats | None = None) -> QuantLinear:
        return QuantLinear.from_layer(layer, self.weight_format, self.act_format)
