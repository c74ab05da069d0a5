"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then round.

Per input channel ``j``: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; the layer computes
``Qa(x / s) Q1(W * s)^T + b`` and keeps ``s`` explicitly at 16 bits (no preceding op to fold it
into, as in nunchaku's ``smooth_factor``). ``alpha`` is fixed or searched per layer on a grid,
scored by the layer-output MSE on sampled calibration rows with activation quantization in
place (identity smoothing is always a candidate, so the search never loses to RTN on those rows).

The smoothing helpers here (two-exponent scales, 16-bit rounding, batched fake quantization,
output scoring) are shared by SVDQuant and LoRaQ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import Format, IntFormat, NVFP4Format
from ptqbench.layers import QuantLinear, dense_weight
from ptqbench.method import Method, register_method
from ptqbench.stats import LayerStats, StatsSpec

log = logging.getLogger(__name__)

# Scales outside this range only appear for dead channels; both ends are exact-enough in fp16/bf16.
SMOOTH_RANGE = (1e-4, 1e4)
DEFAULT_ALPHAS = tuple(i / 20 for i in range(1, 20))
# Largest number of elements of one batched fp32 weight-like tensor a method materializes at once.
MAX_BATCH_ELEMENTS = 2**27


# ----------------------------------------------------------------------------- smoothing scales


def smooth_dtype(layer: nn.Module) -> torch.dtype:
    """The 16-bit dtype a layer's smoothing vector is stored in: its own if 16-bit, else bf16."""
    dtype = layer.weight.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def smooth_scale(
    x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float | torch.Tensor, beta: float | torch.Tensor
) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^beta`` (float32; broadcasts over candidate dims).

    SmoothQuant is ``beta = 1 - alpha``; ``(0, 0)`` is the identity. Channels whose scale is
    zero, infinite or NaN (dead inputs or weights) get 1; the rest is clamped to SMOOTH_RANGE.
    """
    s = x_absmax.float().pow(alpha) / w_absmax.float().pow(beta)
    bad = ~torch.isfinite(s) | (s == 0)
    return torch.where(bad, torch.ones_like(s), s).clamp(*SMOOTH_RANGE)


def round_smooth(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` rounded to the 16-bit dtype the layer stores it in (returned as float32)."""
    return s.to(dtype).float()


# ----------------------------------------------------------------------------- batched fake quant


def tensorwise(fmt: Format) -> bool:
    """Whether ``fmt`` has state over the whole tensor (per-tensor scales): it then cannot
    quantize a stack of independent tensors in one call."""
    return (isinstance(fmt, IntFormat) and fmt.per_tensor) or (isinstance(fmt, NVFP4Format) and fmt.two_level)


def quantize_stack(fmt: Format, x: torch.Tensor, segments: list[int] | None = None) -> torch.Tensor:
    """Fake-quantize a stack ``x[..., rows, cols]`` of independent 2-D tensors (weights or
    activation rows), optionally split into row ``segments`` that are separate tensors.

    Row-wise formats quantize the whole stack in one call; per-tensor ones tensor by tensor.
    """
    if not tensorwise(fmt):
        return fmt.quantize(x)
    flat = x.reshape(-1, *x.shape[-2:])
    parts = []
    for t in flat:
        pieces = t.split(segments, dim=0) if segments else (t,)
        parts.append(torch.cat([fmt.quantize(p) for p in pieces], 0))
    return torch.stack(parts).reshape(x.shape)


def output_sq_error(
    x_hat: torch.Tensor,
    y: torch.Tensor,
    main_q: torch.Tensor,
    act_format: Format,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared layer-output error ``||y - (Qa(x_hat) main_q^T + extra)||^2`` per leading index.

    ``x_hat[..., N, n]`` are (smoothed) input rows, ``y[..., N, m]`` the 16-bit outputs without
    bias (it cancels), ``main_q[..., m, n]`` the quantized main weight, ``extra`` a branch output.
    """
    yq = quantize_stack(act_format, x_hat) @ main_q.mT
    if extra is not None:
        yq = yq + extra
    return (y - yq).pow(2).sum((-2, -1))


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` covering ``range(total)``."""
    size = max(1, size)
    return [(i, min(i + size, total)) for i in range(0, total, size)]


def set_info(q: QuantLinear, **info: Any) -> QuantLinear:
    """Attach what the method decided for this layer (``q.info``: chosen smoothing, rotation
    used, fallbacks) so that reports can show it."""
    q.info.update(info)
    return q


# ----------------------------------------------------------------------------- the method


@register_method("smoothquant")
@dataclass(frozen=True)
class SmoothQuant(Method):
    """SmoothQuant: per-channel smoothing max|X|^a / max|W|^(1-a) (fixed a or searched), then RTN.

    ``alpha_search`` scores identity and every alpha of ``grid`` by the output MSE on ``rows``
    sampled inputs (activation quantization in place); otherwise ``alpha`` is used.
    """

    alpha: float = 0.5
    alpha_search: bool = False
    grid: tuple[float, ...] = DEFAULT_ALPHAS
    rows: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise UserError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")
        grid = tuple(float(a) for a in self.grid)
        if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
            raise UserError(f"smoothquant: grid must be a non-empty list of alphas in [0, 1], got {self.grid}")
        if self.rows < 1:
            raise UserError(f"smoothquant: rows must be >= 1, got {self.rows}")
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
            alpha, how = self._search(w, stats.rows.to(w.device).float(), x_absmax, w_absmax, dtype)
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
        self, w: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor, w_absmax: torch.Tensor, dtype: torch.dtype
    ) -> tuple[float | None, str]:
        """The alpha (None = identity) with the lowest output MSE on the rows ``x``."""
        alphas = torch.tensor(self.grid, dtype=torch.float32, device=w.device)[:, None]
        s = round_smooth(smooth_scale(x_absmax, w_absmax, alphas, 1.0 - alphas), dtype)
        s = torch.cat([torch.ones_like(s[:1]), s])  # candidate 0: no smoothing
        y = x @ w.T
        errors = []
        per_chunk = MAX_BATCH_ELEMENTS // max(1, w.numel() + x.numel())
        for lo, hi in chunks(s.shape[0], per_chunk):
            sc = s[lo:hi, None, :]
            main_q = quantize_stack(self.weight_format, w * sc)
            errors.append(output_sq_error(x / sc, y, main_q, self.act_format))
        best = int(torch.argmin(torch.cat(errors)))
        return (None if best == 0 else self.grid[best - 1]), "alpha searched on output MSE"
