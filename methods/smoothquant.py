"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then round.

Per input channel ``j``: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; the layer computes
``Qa(x / s) Q1(W * s)^T + b`` and keeps ``s`` explicitly at 16 bits (no preceding op to fold it
into, as in nunchaku's ``smooth_factor``). ``alpha`` is fixed or searched per layer on a grid,
scored by the layer-output MSE on calibration rows (a sample, or all of them streamed in chunks)
with activation quantization in place (identity smoothing is always a candidate, so the search
never loses to RTN on those rows). The smoothing machinery lives in :mod:`ptqbench.smoothing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.layers import QuantLinear, dense_weight
from ptqbench.method import Method, register_method
from ptqbench.smoothing import (
    MAX_BATCH_ELEMENTS,
    Rows,
    chunks,
    quantize_stack,
    round_smooth,
    set_info,
    smooth_dtype,
    smooth_scale,
    streamed_sq_error,
)
from ptqbench.stats import ALL_ROWS, LayerStats, StatsSpec

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(i / 20 for i in range(1, 20))


# ----------------------------------------------------------------------------- the method


@register_method("smoothquant")
@dataclass(frozen=True)
class SmoothQuant(Method):
    """SmoothQuant: per-channel smoothing max|X|^a / max|W|^(1-a) (fixed a or searched), then RTN.

    ``alpha_search`` scores identity and every alpha of ``grid`` by the output MSE on ``rows``
    sampled inputs (``all`` or -1: every row; activation quantization in place); otherwise
    ``alpha`` is used.
    """

    alpha: float = 0.5
    alpha_search: bool = False
    grid: tuple[float, ...] = DEFAULT_ALPHAS
    rows: int | str = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise UserError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")
        grid = tuple(float(a) for a in self.grid)
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise UserError(f"smoothquant: grid must be a non-empty list of alphas in [0, 1], got {self.grid}")
        if self.rows == "all":
            object.__setattr__(self, "rows", ALL_ROWS)
        if not isinstance(self.rows, int) or (self.rows < 1 and self.rows != ALL_ROWS):
            raise UserError(f"smoothquant: rows must be >= 1, or 'all' / -1 (every row), got {self.rows!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "grid", grid)

    @property
    def smooths(self) -> bool:
        return True

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(absmax=True, rows=self.rows if self.alpha_search else 0)

    def label(self) -> str:
        alpha = "search" if self.alpha_search else f"{self.alpha:g}"
        return f"{super().label()} alpha={alpha}"

    @torch.no_grad()
    def quantize_layer(self, layer: nn.Module, stats: LayerStats | None = None) -> QuantLinear:
        if stats is None or stats.absmax is None:
            q = QuantLinear.from_layer(layer, self.weight_format, self.act_format)
            return set_info(q, alpha=None, smoothing="none: no activation statistics")
        w = dense_weight(layer).detach().float()
        x_absmax = stats.absmax.to(w.device).float()
        w_absmax = w.abs().amax(0)
        dtype = smooth_dtype(layer)
        if self.alpha_search and stats.rows is not None and stats.rows.shape[0] > 0:
            alpha, how = self._search(w, Rows([stats.rows], w.device), x_absmax, w_absmax, dtype)
        else:
            alpha = self.alpha
            how = "fixed alpha" if not self.alpha_search else "fixed alpha: no sampled rows to search on"
            if self.alpha_search:
                log.warning("smoothquant: no sampled input rows; using the fixed alpha %g", alpha)
        if alpha is None:
            s = torch.ones_like(x_absmax)
        else:
            s = round_smooth(smooth_scale(x_absmax, w_absmax, alpha, 1.0 - alpha), dtype)
        q = QuantLinear.from_layer(layer, self.weight_format, self.act_format, weight=w * s, smooth=s)
        return set_info(q, alpha=alpha, smoothing=how)

    def _search(
        self, w: torch.Tensor, rows: Rows, x_absmax: torch.Tensor, w_absmax: torch.Tensor, dtype: torch.dtype
    ) -> tuple[float | None, str]:
        """The alpha (None = identity) with the lowest output MSE on ``rows``."""
        alphas = torch.tensor(self.grid, dtype=torch.float32, device=w.device)[:, None]
        s = round_smooth(smooth_scale(x_absmax, w_absmax, alphas, 1.0 - alphas), dtype)
        s = torch.cat([torch.ones_like(s[:1]), s])  # candidate 0: no smoothing
        errors = []
        for lo, hi in chunks(s.shape[0], MAX_BATCH_ELEMENTS // max(1, w.numel())):
            sc = s[lo:hi]
            main_q = quantize_stack(self.weight_format, w * sc[:, None, :])
            index = torch.zeros(hi - lo, dtype=torch.long, device=w.device)
            errors.append(streamed_sq_error(rows, index, w[None], sc, main_q, self.act_format))
        best = int(torch.argmin(torch.cat(errors)))
        return (None if best == 0 else self.grid[best - 1]), "alpha searched on output MSE"
