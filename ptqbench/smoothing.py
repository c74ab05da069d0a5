"""Smoothing machinery shared by SmoothQuant, SVDQuant and LoRaQ.

Smoothing divides a layer's input by ``s`` per channel and multiplies the weight by it:
``y = Qa(x / s) Q1(W * s)^T + b``. Here: the two-exponent scales ``s = max|X|^a / max|W|^b``
and deepcompressor's ``(a, b)`` grid, 16-bit rounding of ``s``, batched fake quantization of
stacks of independent tensors, and the layer-output error those searches are scored on,
streamed over calibration rows in chunks (:class:`Rows`) so that all rows fit in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptqbench.formats import Format, IntFormat, NVFP4Format
from ptqbench.layers import QuantLinear

# Scales outside this range only appear for dead channels; both ends are exact-enough in fp16/bf16.
SMOOTH_RANGE = (1e-4, 1e4)
# Largest number of elements of one batched fp32 weight-like tensor a method materializes at once.
MAX_BATCH_ELEMENTS = 2**27
INVALID_SCALES = ("vector", "channel")


# ----------------------------------------------------------------------------- smoothing scales


def smooth_dtype(layer: nn.Module) -> torch.dtype:
    """The 16-bit dtype a layer's smoothing vector is stored in: its own if 16-bit, else bf16."""
    dtype = layer.weight.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def smooth_scale(
    x_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    invalid: str = "channel",
) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^beta`` (float32; broadcasts over candidate dims, channels last).

    SmoothQuant is ``beta = 1 - alpha``; ``(0, 0)`` is the identity. Zero scales become 1. A NaN
    or infinite scale (a dead weight column with ``beta > 0``) resets, with ``invalid="vector"``,
    the whole vector to 1 (deepcompressor ``calib/smooth.py``, ``get_smooth_scale``), or with
    ``"channel"`` only that channel. The result is clamped to SMOOTH_RANGE (our guard for 16-bit
    storage; deepcompressor has none: it only acts on scales beyond 1e4 or below 1e-4).
    """
    s = x_absmax.float().pow(alpha) / w_absmax.float().pow(beta)
    s = torch.where(s == 0, torch.ones_like(s), s)
    bad = ~torch.isfinite(s)
    if invalid == "vector":
        bad = bad.any(-1, keepdim=True).expand_as(s)
    return torch.where(bad, torch.ones_like(s), s).clamp(*SMOOTH_RANGE)


def round_smooth(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` rounded to the 16-bit dtype the layer stores it in (returned as float32)."""
    return s.to(dtype).float()


def smoothing_grid(num_grids: int) -> list[tuple[float, float]]:
    """deepcompressor's candidates for ``beta = -2`` (``calib/config/smooth.py``,
    ``get_alpha_beta_pairs``): (0, 0), (a, 0) and (a, 1 - a) for a = k / num_grids."""
    choices = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1.0 - a) for a in choices]


def pair_label(pair: tuple[float, float]) -> str:
    return f"a={pair[0]:g},b={pair[1]:g}"


def pick_best(errors: torch.Tensor, rule: str = "<=") -> torch.Tensor:
    """Index of the lowest error along the last dim. ``"<="``: the last of equal minima wins, as
    deepcompressor's ``error <= best`` keeps the later candidate; ``"<"``: the first."""
    if rule == "<":
        return errors.argmin(-1)
    return errors.shape[-1] - 1 - errors.flip(-1).argmin(-1)


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


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` covering ``range(total)``."""
    size = max(1, size)
    return [(i, min(i + size, total)) for i in range(0, total, size)]


# ----------------------------------------------------------------------------- output error


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


@dataclass(eq=False)
class Rows:
    """Calibration input rows of ``B`` same-width layers: one ``[N, n]`` tensor per layer, kept
    where they are (CPU for all rows) and streamed to ``device`` as float32 ``[B, c, n]`` chunks.

    Scoring on all rows is a sum over chunks: exact up to float summation order for row-wise
    activation formats (a per-tensor activation format takes its scale per chunk).
    """

    parts: Sequence[torch.Tensor]
    device: torch.device

    def __post_init__(self) -> None:
        self._whole: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.parts[0].shape[0])

    def chunk(self, lo: int, hi: int, select: Sequence[int] | None = None) -> torch.Tensor:
        """Rows ``lo:hi`` of the layers ``select`` (default: all) as ``[len, hi - lo, n]`` float32."""
        select = range(len(self.parts)) if select is None else select
        if lo == 0 and hi >= self.count and len(select) == len(self.parts):
            if self._whole is None:
                self._whole = self._stack(0, self.count, select)
            return self._whole
        return self._stack(lo, hi, select)

    def _stack(self, lo: int, hi: int, select: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.parts[i][lo:hi].to(self.device, torch.float32) for i in select])

    def stacked(self) -> torch.Tensor:
        """All rows as one ``[B, N, n]`` device tensor (for small samples)."""
        return self.chunk(0, self.count)

    def iter_chunks(self, size: int, select: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        for lo, hi in chunks(self.count, size):
            yield self.chunk(lo, hi, select)


def chunk_rows(items: int, width: int) -> int:
    """Rows per chunk so that ``items`` copies of rows of ``width`` floats stay within MAX_BATCH_ELEMENTS."""
    return max(1, MAX_BATCH_ELEMENTS // max(1, items * width))


def streamed_sq_error(
    rows: Rows,
    index: torch.Tensor,
    weight: torch.Tensor,
    s: torch.Tensor,
    main_q: torch.Tensor,
    act_format: Format,
    branch: Any = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Squared output error of ``items`` quantized candidates over every row, in chunks (float64).

    ``index[items]`` picks each candidate's layer in ``rows`` and ``weight[B, m, n]`` (its 16-bit
    reference ``y = x W^T``); ``s[items, n]`` its smoothing, ``main_q[items, m, n]`` its quantized
    main weight, ``branch(x_hat) -> [items, c, m]`` its branch output (or None). ``chunk``: rows
    per chunk (default: as many as MAX_BATCH_ELEMENTS allows).
    """
    items, m, n = main_q.shape
    units, pos = torch.unique(index, return_inverse=True)
    select = units.tolist()
    w = weight[units]
    total = torch.zeros(items, dtype=torch.float64, device=main_q.device)
    size = chunk or chunk_rows(items + len(select), 2 * (n + m))
    for x in rows.iter_chunks(size, select):
        y = x @ w.mT
        x_hat = x[pos] / s[:, None, :]
        extra = None if branch is None else branch(x_hat)
        total += output_sq_error(x_hat, y[pos], main_q, act_format, extra).double()
    return total


def set_info(q: QuantLinear, **info: Any) -> QuantLinear:
    """Attach what the method decided for this layer (``q.info``: chosen smoothing, rotation
    used, SVD, fallbacks) so that reports can show it."""
    q.info.update(info)
    return q
