"""Smoothing machinery shared by SmoothQuant, SVDQuant and LoRaQ.

Smoothing divides a layer's input by ``s`` per channel and multiplies the weight by it:
``y = Qa(x / s) Q1(W * s)^T + b``. Here: the two-exponent scales ``s = max|X|^a / max|W|^b``
and deepcompressor's ``(a, b)`` grid, 16-bit rounding of ``s``, batched fake quantization of
stacks of independent tensors, and the layer-output error those searches are scored on,
streamed over calibration rows in chunks (:class:`Rows`) so that all rows fit in bounded memory.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import torch
from torch import nn

from ptqbench import kernels
from ptqbench.errors import UserError
from ptqbench.formats import CastFormat, Format, IntFormat, NVFP4Format
from ptqbench.layers import FusedPlan, QuantLinear, fused_input, fused_plan

T = TypeVar("T")
# Scales outside this range only appear for dead channels; both ends are exact-enough in fp16/bf16.
SMOOTH_RANGE = (1e-4, 1e4)
# Largest number of elements of one batched fp32 weight-like tensor a method materializes at once.
MAX_BATCH_ELEMENTS = 2**27
INVALID_SCALES = ("vector", "channel")
# Held while calling torch.compile'd functions: dynamo is not thread-safe, and batches of layers
# may be calibrated in threads (:func:`ptqbench.lowrank.map_batches`).
COMPILE_LOCK = threading.RLock()


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


def smooth_divisor(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` in the rows' ``dtype`` where that is exact (16-bit smoothing of 16-bit rows), else
    ``s``: ``x / smooth_divisor(s, x.dtype)`` then equals ``(x / s).to(x.dtype)`` bit for bit
    (torch divides 16-bit tensors in float32 and rounds once, as the cast does) in one pass
    without a float32 intermediate."""
    if dtype not in (torch.float16, torch.bfloat16):
        return s
    low = s.to(dtype)
    return low if torch.equal(low.to(s.dtype), s) else s


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


# ----------------------------------------------------------------------------- profiling


@dataclass
class Profile:
    """Seconds and calls per stage of the row scoring (``transfer``, ``outputs``, ``quantize``,
    ``products``, ``error``) and of the branch fits (``svd``, ``weight quant``), when ``enabled`` (it then
    synchronizes the GPU at every stage boundary, so leave it off outside benchmarks)."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.calls[name] = self.calls.get(name, 0) + 1

    def timed(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator: every call of the function is the stage ``name``."""

        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> T:
                with self.stage(name):
                    return fn(*args, **kwargs)

            return call

        return wrap

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


PROFILE = Profile()


# ----------------------------------------------------------------------------- output error

SCORE_DTYPES = ("model", "float32")
# Rows per chunk below which the scoring loop takes fewer candidates at a time instead of fewer rows.
MIN_CHUNK_ROWS = 4096
# Fraction of the free device memory that resident rows and cached outputs may take (all the
# batches calibrating at once together: :func:`sharing_memory`).
DEVICE_MEMORY_SHARE = 0.5
# Batches calibrated at once on a GPU, each scoring in its own thread (ptqbench.lowrank.map_batches).
GPU_WORKERS = 4
# Bytes of cached reference outputs kept on the CPU (beyond that they are recomputed per chunk).
CPU_CACHE_BYTES = 2**30


def resolve_score_dtype(kind: str, layer_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the row products of the output-error scores. ``model``: the layer's own 16-bit
    dtype (deepcompressor's: its quantizers return dequantized tensors in the input's dtype and the
    candidates run as the fp16/bf16 module; ``quantizer/impl/base.py``), float32 for a float32
    layer; ``float32``: every product in float32."""
    if kind not in SCORE_DTYPES:
        raise UserError(f"score_dtype {kind!r} is not valid (valid: {', '.join(SCORE_DTYPES)})")
    if kind == "model" and layer_dtype in (torch.float16, torch.bfloat16):
        return layer_dtype
    return torch.float32


def _sq_error(y: torch.Tensor, yq: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``||y - (yq + extra)||^2`` per leading index, every step in float32."""
    return _row_sq_error(y, yq, extra, (-2, -1))


def _row_sq_error(
    y: torch.Tensor, yq: torch.Tensor, extra: torch.Tensor | None, dims: tuple[int, ...] = (-1,)
) -> torch.Tensor:
    """``(y - (yq + extra))^2`` in float32, summed over ``dims`` (default: per row)."""
    yq = yq.float() if extra is None else yq.float() + extra.float()
    return (y.float() - yq).pow(2).sum(dims)


@cache
def _sq_error_fn(cuda: bool) -> Callable[..., torch.Tensor]:
    """:func:`_sq_error`; on a GPU the ``torch.compile`` of its per-row sums (one fused pass over
    the 16-bit outputs instead of six float32 ones, parallel over rows: the compiled whole-matrix
    sum ran at about a tenth of the memory bandwidth on an H200), then their sum: the same
    float32 squares, summed in another order."""
    if not cuda:
        return _sq_error
    rows = torch.compile(_row_sq_error, dynamic=True)

    def call(y: torch.Tensor, yq: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        # dynamo is not thread-safe (batches may be calibrated in threads); past its default 8 graphs
        # (dtypes x with or without a branch x ...) it would fall back to eager, summing in another order
        with COMPILE_LOCK, torch._dynamo.config.patch(recompile_limit=512, accumulated_recompile_limit=4096):
            per_row = rows(y, yq, extra)
        return per_row.sum(-1)

    return call


def _chunk_sq_error(y: torch.Tensor, yq: torch.Tensor, extra: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    """``||y[pos] - (yq + extra)||^2`` per candidate (float32, :func:`_sq_error`'s squares): per row
    by :func:`~ptqbench.kernels.row_sq_error` where it runs (the references read in place), else
    :func:`_sq_error_fn`; then summed over the rows."""
    if kernels.sq_error_allowed(yq):
        return kernels.row_sq_error(y, yq, extra, pos).sum(-1)
    return _sq_error_fn(y.is_cuda)(_spread(y, pos), yq, extra)


@dataclass(eq=False)
class Rows:
    """Calibration input rows of ``B`` same-width layers: one ``[N, n]`` tensor per layer.

    On first use they move once to ``device`` (and stay there) when they fit in their
    :func:`memory_budget`, stored in ``compact`` (the model's 16-bit dtype) when
    every row is exactly representable in it (calibration inputs of a 16-bit model are), else
    float32; otherwise they stay where they are and stream to ``device`` chunk by chunk, in that
    same dtype (so where they are kept changes no product, nor the scoring path).
    :meth:`outputs` caches the reference outputs ``x W^T`` per chunk while memory allows.

    Scoring on all rows is a sum over chunks: exact up to float summation order for row-wise
    activation formats (a per-tensor activation format takes its scale per chunk).
    """

    parts: Sequence[torch.Tensor]
    device: torch.device
    compact: torch.dtype | None = None

    def __post_init__(self) -> None:
        self._resident: torch.Tensor | None = None
        self._whole: torch.Tensor | None = None
        self._placed = False
        self._stored = torch.float32  # the dtype chunks come in, resident or streamed (set by _place)
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._weight: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.parts[0].shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype :meth:`chunk` returns rows in with ``dtype=None`` (placing them first)."""
        self._place()
        return self._stored

    @property
    def resident(self) -> bool:
        """Whether all rows sit on ``device`` (decided, and done, on first use)."""
        self._place()
        return self._resident is not None

    def _place(self) -> None:
        if self._placed:
            return
        self._placed = True
        width = int(self.parts[0].shape[1])
        exact = self.compact is not None and self._exact_in(self.compact)
        self._stored = self.compact if exact else torch.float32
        need = len(self.parts) * self.count * width * torch.empty((), dtype=self._stored).element_size()
        if memory_budget(self.device) < need:
            return
        with PROFILE.stage("transfer"):
            self._resident = torch.stack([p.to(self.device, self._stored) for p in self.parts])

    def _exact_in(self, dtype: torch.dtype) -> bool:
        for part in self.parts:
            for lo, hi in chunks(self.count, MAX_BATCH_ELEMENTS // max(1, int(part.shape[1]))):
                piece = part[lo:hi]
                if not torch.equal(piece.to(dtype).to(piece.dtype), piece):
                    return False
        return True

    def chunk(
        self, lo: int, hi: int, select: Sequence[int] | None = None, dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """Rows ``lo:hi`` of the layers ``select`` (default: all) as ``[len, hi - lo, n]`` in ``dtype``
        (None: as stored, every value exact in it)."""
        self._place()
        select = list(range(len(self.parts))) if select is None else list(select)
        if self._resident is not None:
            part = self._resident[:, lo:hi]
            part = part if select == list(range(len(self.parts))) else part[select]
            return part if dtype is None else part.to(dtype)
        with PROFILE.stage("transfer"):
            return torch.stack([self.parts[i][lo:hi].to(self.device, dtype or self._stored) for i in select])

    def stacked(self) -> torch.Tensor:
        """All rows as one float32 ``[B, N, n]`` device tensor (for small samples; kept)."""
        if self._whole is None:
            self._whole = self.chunk(0, self.count)
        return self._whole

    def iter_chunks(self, size: int, select: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        for lo, hi in chunks(self.count, size):
            yield self.chunk(lo, hi, select)

    def outputs(
        self, lo: int, hi: int, select: Sequence[int], weight: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Reference outputs ``x W^T`` of rows ``lo:hi`` for the layers ``select`` (``weight[B, m, n]``
        of all layers; products in ``dtype``, float32 accumulation), cached while memory allows."""
        if self._weight is not weight:
            self._outputs.clear()
            self._weight = weight
        key = (lo, hi, tuple(select), dtype)
        if key in self._outputs:
            return self._outputs[key]
        x = self.chunk(lo, hi, select, dtype)
        with PROFILE.stage("outputs"):
            y = x @ weight[list(select)].to(dtype).mT
        budget = memory_budget(self.device) if self.device.type == "cuda" else CPU_CACHE_BYTES
        used = sum(t.numel() * t.element_size() for t in self._outputs.values())
        if used + y.numel() * y.element_size() <= budget:
            self._outputs[key] = y
        return y


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: what the driver reports plus what torch's caching allocator
    holds unused, which it hands out first; CPU: unbounded for rows that are already there)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    return 2**62


_SHARERS = [1]  # batches that split DEVICE_MEMORY_SHARE now (a stack: :func:`sharing_memory`)


@contextmanager
def sharing_memory(batches: int) -> Iterator[None]:
    """While inside, :func:`memory_budget` is split between ``batches`` batches calibrating at once
    (:func:`ptqbench.lowrank.map_batches`): each one checks the free memory for itself, so without
    the split they would together commit ``batches`` times DEVICE_MEMORY_SHARE of it."""
    _SHARERS.append(_SHARERS[-1] * max(1, batches))
    try:
        yield
    finally:
        _SHARERS.pop()


def memory_budget(device: torch.device) -> int:
    """Bytes one batch's resident rows and cached outputs may take on ``device``: its share of
    DEVICE_MEMORY_SHARE of the free memory. It decides only where rows and outputs are kept."""
    return int(free_bytes(device) * DEVICE_MEMORY_SHARE / _SHARERS[-1])


def chunk_rows(items: int, width: int, budget: int = MAX_BATCH_ELEMENTS) -> int:
    """Rows per chunk so that ``items`` copies of rows of ``width`` floats stay within ``budget``."""
    return max(1, budget // max(1, items * width))


def score_budget(device: torch.device) -> int:
    """Elements of one batched scoring intermediate: MAX_BATCH_ELEMENTS on the CPU; on a GPU a
    share of its total memory (up to 2**31), so that each chunk is a large product, not a launch.
    It depends on the device alone, not on the memory free at the time nor on how many batches
    score at once (it leaves room for four): chunk sizes set the product shapes and so their
    rounding, and a run's scores must not depend on what else runs."""
    if device.type != "cuda":
        return MAX_BATCH_ELEMENTS
    total = torch.cuda.get_device_properties(device).total_memory
    return int(min(2**31, max(MAX_BATCH_ELEMENTS, total // 160)))


@dataclass(frozen=True, eq=False)
class CandidateBranch:
    """The low-rank branch of each scored candidate: ``up[items, m, r]`` and ``down[items, r, n]``
    (quantized), reading ``act_format`` with intermediate ``mid_format``:
    ``Qmid(Qa2(x_hat) down^T) up^T``, as :class:`~ptqbench.layers.LowRankBranch` computes it."""

    up: torch.Tensor
    down: torch.Tensor
    act_format: Format
    mid_format: Format | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[-1])

    def output(self, x_hat: torch.Tensor, items: slice, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The branch output of candidates ``items`` on their rows ``x_hat[len, c, n]``, the two
        products in ``dtype`` (float32 accumulation)."""
        h = _quantize_to(self.act_format, x_hat, dtype) @ self.down[items].to(dtype).mT
        if self.mid_format is not None:
            h = quantize_stack(self.mid_format, h.float()).to(dtype)
        return h @ self.up[items].to(dtype).mT


def _quantize_to(fmt: Format, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``quantize_stack(fmt, x).to(dtype)``; one cast when ``fmt`` is the cast to ``dtype`` itself."""
    if isinstance(fmt, CastFormat) and fmt.torch_dtype == dtype:
        return x.to(dtype)
    return quantize_stack(fmt, x).to(dtype)


def fused_scoring_plan(
    act_format: Format, branch_act: Format | None, mid_format: Format | None, rows_dtype: torch.dtype,
    dtype: torch.dtype, device: torch.device,
) -> FusedPlan | None:
    """The fused branch path's plan (:func:`~ptqbench.layers.fused_plan`) where candidates with a
    branch (reading ``branch_act``, intermediate ``mid_format``; None: no branch) are scored as
    the deployed layer computes them there: 16-bit rows scored in their own dtype, on a GPU where
    the layer's fused path runs (:func:`~ptqbench.kernels.fused_branch_allowed`, formats it
    fuses); else None (the unfused products)."""
    if branch_act is None or rows_dtype != dtype or device.type != "cuda":
        return None
    if not kernels.fused_branch_allowed(torch.empty(1, dtype=dtype, device=device)):
        return None
    return fused_plan(act_format, branch_act, mid_format, dtype)


def streamed_sq_error(
    rows: Rows,
    index: torch.Tensor,
    weight: torch.Tensor,
    s: torch.Tensor,
    main_q: torch.Tensor,
    act_format: Format,
    branch: CandidateBranch | None = None,
    chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
    fused: bool = True,
) -> torch.Tensor:
    """Squared output error of ``items`` quantized candidates over every row, in chunks (float64).

    ``index[items]`` picks each candidate's layer in ``rows`` and ``weight[B, m, n]`` (its 16-bit
    reference ``y = x W^T``, without bias: it cancels); ``s[items, n]`` its smoothing,
    ``main_q[items, m, n]`` its quantized main weight, ``branch`` its low-rank branch (or None).
    The candidate's output is ``Qa(x / s) Q1^T`` plus the branch, ``x / s`` rounded to the rows'
    dtype (the model's) as the deployed layer and deepcompressor's smoother compute it: with
    ``fused`` where :func:`fused_scoring_plan` gives a plan, as the deployed layer's fused path
    computes it (``[Qa(x') | h] [Q1 | up]^T``, one GEMM, one rounding of the output); else the two
    outputs in ``dtype``, each rounded, summed in float32. ``chunk``: rows per chunk (default: as
    many as :func:`score_budget` allows, with candidates taken in groups small enough for
    MIN_CHUNK_ROWS rows). ``dtype``: of the row products (float32 accumulation); each chunk's
    squares sum in float32, the chunks in float64.
    """
    items, m, n = main_q.shape
    width = 2 * (n + m)
    budget = score_budget(main_q.device)
    group = max(1, budget // (min(MIN_CHUNK_ROWS, rows.count) * width) - 1)
    plan = None
    if fused and branch is not None:
        plan = fused_scoring_plan(act_format, branch.act_format, branch.mid_format, rows.dtype, dtype, main_q.device)
    total = torch.zeros(items, dtype=torch.float64, device=main_q.device)
    for glo, ghi in chunks(items, group):
        units, pos = torch.unique(index[glo:ghi], return_inverse=True)
        select = units.tolist()
        size = chunk or chunk_rows(ghi - glo + len(select), width, budget)
        part = slice(glo, ghi)
        if plan is None:
            outputs = _unfused_outputs(s[part], main_q[part], act_format, branch, part, pos, rows.dtype, dtype)
        else:
            outputs = _fused_outputs(s[part], main_q[part], branch, part, pos, plan, dtype)
        for lo, hi in chunks(rows.count, size):
            y = rows.outputs(lo, hi, select, weight, dtype)
            yq, extra = outputs(rows.chunk(lo, hi, select, dtype=None))
            with PROFILE.stage("error"):
                total[part] += _chunk_sq_error(y, yq, extra, pos).double()
    return total


Outputs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def _unfused_outputs(
    s: torch.Tensor, main_q: torch.Tensor, act_format: Format, branch: CandidateBranch | None, items: slice,
    pos: torch.Tensor, rows_dtype: torch.dtype, dtype: torch.dtype,
) -> Outputs:
    """``x -> (Qa(x') Q1^T, the branch output)`` of one group of candidates (``pos``: each one's
    unit) on a chunk of rows ``x[units, c, n]`` in ``rows_dtype``, the products in ``dtype``."""
    divisor = smooth_divisor(s, rows_dtype)[:, None, :]
    main = main_q.to(dtype)

    def outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with PROFILE.stage("quantize"):
            x_hat = (_spread(x, pos) / divisor).to(x.dtype)
            xq = quantize_stack(act_format, x_hat).to(dtype)
        with PROFILE.stage("products"):
            return xq @ main.mT, None if branch is None else branch.output(x_hat, items, dtype)

    return outputs


def _fused_outputs(
    s: torch.Tensor, main_q: torch.Tensor, branch: CandidateBranch, items: slice, pos: torch.Tensor,
    plan: FusedPlan, dtype: torch.dtype,
) -> Outputs:
    """``x -> (y, None)``: the fused path's output of one group of candidates (``pos``: each one's
    unit) on a chunk of rows ``x[units, c, n]``: :func:`~ptqbench.layers.fused_input` per run of
    candidates of one unit (the unit's rows read by all), one batched GEMM against ``[Q1 | up | 0]``."""
    count, m, n = main_q.shape
    r = branch.rank
    wide = kernels.branch_width(n, r)
    cat = main_q.new_zeros(count, m, wide, dtype=dtype)
    cat[..., :n], cat[..., n : n + r] = main_q, branch.up[items]
    down = main_q.new_zeros(count, wide - n, n, dtype=dtype)
    down[:, :r] = branch.down[items]
    smooth = s.contiguous()
    at = pos.tolist()  # candidates of one unit in a row share one launch (and one read of its rows)
    starts = [i for i in range(count) if i == 0 or at[i] != at[i - 1]] + [count]
    runs = [(a, b, at[a]) for a, b in itertools.pairwise(starts)]

    def outputs(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        with PROFILE.stage("quantize"):
            buf = x.new_empty(count, x.shape[1], wide)
            for a, b, unit in runs:
                fused_input(x[unit].expand(b - a, -1, -1), down[a:b], plan, wide, r, 0.0, smooth[a:b], buf[a:b])
        with PROFILE.stage("products"):
            return torch.bmm(buf, cat.mT), None

    return outputs


def _spread(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``t[pos]``; a broadcast view when ``t`` holds one layer (no copy per candidate)."""
    return t.expand(len(pos), -1, -1) if t.shape[0] == 1 else t[pos]


def set_info(q: QuantLinear, **info: Any) -> QuantLinear:
    """Attach what the method decided for this layer (``q.info``: chosen smoothing, rotation
    used, SVD, fallbacks) so that reports can show it."""
    q.info.update(info)
    return q
