"""Where fake quantization runs, and the rule that chooses: fused Triton kernels on CUDA,
``torch.compile`` of the torch reference, or the eager reference.

The numerics live in :mod:`ptqbench.formats`; this module does not import it. A format
describes its kernel as a :class:`KernelSpec` (block size and constants) and hands itself to the
compiled path as a :class:`Quantizer`. The Triton arithmetic mirrors the torch reference
operation by operation (IEEE-rounded divisions, exact powers of two, round-half-even via
``rint``); the tests check bit equality against it on the GPU.

The backend is chosen explicitly: per call (``fmt.quantize(x, backend="eager")``), per scope
(:func:`use_backend`) or per process (:func:`set_backend`, for the runner). ``"auto"``, the
default, uses Triton on CUDA where a kernel exists and ``torch.compile`` for large CPU tensors of
formats that compile exactly; the environment narrows ``"auto"`` only (``PTQBENCH_KERNELS=0``: no
Triton, ``PTQBENCH_COMPILE=0``: no ``torch.compile``). ``"triton"``: Triton where a kernel exists,
else eager. ``"compiled"``: ``torch.compile`` on any device and size where it is exact, else eager.

:func:`fused_branch` fills a low-rank branch layer's input buffer (used by
:class:`~ptqbench.layers.QuantLinear` where :func:`fused_branch_allowed`): the fake-quant kernel,
reading x once, writes the fake-quantized activations (and the rank-r product's source where it is
neither), one GEMM the rank-r product beside them; the activations are the format's kernel's own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol, get_args

import torch

from ptqbench.errors import UserError

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs simply never launch a kernel.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

TensorFn = Callable[[torch.Tensor], torch.Tensor]
Backend = Literal["auto", "triton", "compiled", "eager"]
Path = Literal["triton", "compiled", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
COMPILE_MIN_NUMEL = 1 << 16  # below this, compiled and eager cost about the same on a CPU
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2
SQ_ROWS = 4  # rows per program of the squared-error kernel
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Quantizer(Protocol):
    """What the compiled path needs of a format (hashable, as frozen dataclasses are)."""

    def reference(self, x: torch.Tensor) -> torch.Tensor: ...

    def compile_target(self) -> TensorFn: ...

    def __hash__(self) -> int: ...


@dataclass(frozen=True)
class KernelSpec:
    """A fused kernel's launch description: the block (group) length along the last dim, the
    kernel's constexpr arguments, and the per-tensor scale the kernel reads: none, ``g = 1``
    (``"unit"``), or ``g = max|x| / tensor_scale_div`` (``"absmax"``, 1 for a zero tensor)."""

    block: int
    meta: tuple[tuple[str, Any], ...]
    tensor_scale: Literal["none", "unit", "absmax"] = "none"
    tensor_scale_div: float = 1.0


# ----------------------------------------------------------------------------- backend choice

_chosen: list[Backend | None] = [None]  # set_backend's value; None: "auto"


def check_backend(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise UserError(f"kernel backend {backend!r} is not valid (valid: {', '.join(BACKENDS)})")
    return backend  # type: ignore[return-value]


def set_backend(backend: Backend | None) -> None:
    """The process-wide backend (``None`` restores ``"auto"``)."""
    _chosen[0] = None if backend is None else check_backend(backend)


def current_backend() -> Backend:
    return _chosen[0] or "auto"


@contextmanager
def use_backend(backend: Backend) -> Iterator[None]:
    """Run a block with another backend (benchmarks compare the paths)."""
    previous = _chosen[0]
    set_backend(backend)
    try:
        yield
    finally:
        _chosen[0] = previous


def use_kernels(on: bool) -> AbstractContextManager[None]:
    """``use_backend("auto")`` or ``use_backend("eager")``."""
    return use_backend("auto" if on else "eager")


def fits_block(n: int | None) -> bool:
    """Whether the kernel tiles blocks (groups) of ``n``: powers of two from 2 to 256."""
    return n is not None and 2 <= n <= 256 and n & (n - 1) == 0


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


@cache
def _available() -> bool:
    return HAVE_TRITON and torch.cuda.is_available()


def _launchable(x: torch.Tensor) -> bool:
    return _available() and x.is_cuda and x.dtype in _INPUT_DTYPES and x.numel() > 0 and x.dim() >= 1


def _triton_allowed(chosen: Backend) -> bool:
    return chosen == "triton" or (chosen == "auto" and _env_on("PTQBENCH_KERNELS"))


def choose(x: torch.Tensor, backend: Backend | None, spec: KernelSpec | None, compiles: bool) -> Path:
    """The path that quantizes ``x`` under ``backend`` (``None``: the current backend), given the
    format's kernel (``spec``, ``None`` if it has none) and whether it compiles exactly."""
    chosen = current_backend() if backend is None else check_backend(backend)
    if chosen == "eager":
        return "eager"
    if _triton_allowed(chosen) and spec is not None and _launchable(x):
        return "triton"
    if not compiles or (x.requires_grad and torch.is_grad_enabled()):
        return "eager"
    if chosen == "compiled":
        return "compiled"
    if chosen == "auto" and not x.is_cuda and x.numel() >= COMPILE_MIN_NUMEL and _env_on("PTQBENCH_COMPILE"):
        return "compiled"
    return "eager"


# ----------------------------------------------------------------------------- torch.compile path

_COMPILED: dict[Quantizer, TensorFn | None] = {}
_CHECKED: dict[tuple[Quantizer, torch.dtype, int, str], bool] = {}


def compiled(fmt: Quantizer, x: torch.Tensor) -> TensorFn | None:
    """The ``torch.compile`` of ``fmt`` (dynamic shapes) for inputs like ``x``, or None when
    compiling failed or when it differed from the reference on a probe of every binade in ``x``'s
    dtype, row width and device type (checked once each; a failure warns and disables it)."""
    if fmt not in _COMPILED:
        _COMPILED[fmt] = _flat_compiled(fmt)
    fn = _COMPILED[fmt]
    key = (fmt, x.dtype, int(x.shape[-1]), x.device.type)
    if fn is not None and key not in _CHECKED:
        _CHECKED[key] = _probe_agrees(fmt, fn, x)
        if not _CHECKED[key]:
            _COMPILED[fmt] = fn = None
    return fn


def _flat_compiled(fmt: Quantizer) -> TensorFn:
    """The compiled target on 2-D views (one graph per dtype and raggedness, not per rank).

    Every format of a class shares one code object and so one dynamo cache, whose default limit
    (8 graphs) a suite with a dozen formats exceeds; the limit is raised for these calls only.
    """
    fn = torch.compile(fmt.compile_target(), dynamic=True)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=512, accumulated_recompile_limit=4096):
            return fn(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    return call


def _probe(width: int) -> torch.Tensor:
    """Rows of ``width``: values of every float32 binade (2 x 277 exponents x 64 mantissa draws)
    of both signs, heavy-tailed random rows with an outlier channel, groups of exact rounding
    ties, an all-zero row and a NaN. (A CPU whose compiled integer path differed only on
    heavy-tailed data was seen: the probe must hold what real tensors hold.)"""
    g = torch.Generator().manual_seed(0)
    exps = torch.arange(-149, 128, dtype=torch.float64).repeat(2 * 64)
    mant = 1 + torch.randint(0, 16, (exps.numel(),), generator=g) / 16
    sign = torch.where(torch.rand(exps.numel(), generator=g) < 0.5, -1.0, 1.0)
    binades = (mant * 2.0**exps * sign).float()
    heavy = torch.randn(64, width, generator=g) / torch.rand(64, width, generator=g).clamp_min(1e-3) ** 0.5
    heavy[:, width // 3] *= 300.0
    ties = torch.tensor([3.5] + [(0.25 + 0.5 * (i % 6)) * (-1) ** i for i in range(63)]).repeat(-(-width // 64))
    x = torch.cat([binades, binades.new_zeros(-binades.numel() % width + width), heavy.flatten()])
    x = torch.cat([x, ties[:width].expand(8, width).flatten(), torch.zeros(width)]).reshape(-1, width)
    x[1, min(7, width - 1)] = float("nan")
    return x


def _probe_agrees(fmt: Quantizer, fn: TensorFn, like: torch.Tensor) -> bool:
    """Whether ``fn`` equals ``fmt.reference`` on :func:`_probe`; any compiler failure (no C++
    compiler, say) warns and counts as a disagreement, so the eager path is used."""
    try:
        probe = _probe(int(like.shape[-1])).to(device=like.device, dtype=like.dtype)
        got, want = fn(probe), fmt.reference(probe)
    except Exception as exc:
        warnings.warn(f"torch.compile of {fmt} failed ({type(exc).__name__}); using eager torch", stacklevel=5)
        return False
    if bool(((got == want) | (torch.isnan(got) & torch.isnan(want))).all()):
        return True
    warnings.warn(f"compiled {fmt} differs from its reference here; using eager torch", stacklevel=5)
    return False


# ----------------------------------------------------------------------------- Triton kernels

if HAVE_TRITON:

    @triton.jit
    def _floor_log2(a):
        """Exact floor(log2(a)) of positive float32 (subnormals included); 0 gives <= -150."""
        sub = a < 1.1754943508222875e-38
        a2 = tl.where(sub, a * 18446744073709551616.0, a)  # * 2**64, exact
        bits = a2.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        e = tl.where(sub, e - 64, e)
        return tl.where(a == 0.0, -150, e)

    @triton.jit
    def _ceil_log2(a):
        sub = a < 1.1754943508222875e-38
        a2 = tl.where(sub, a * 18446744073709551616.0, a)
        bits = a2.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        e = tl.where(sub, e - 64, e)
        return tl.where(a == 0.0, -150, e)

    @triton.jit
    def _pow2(e):
        """Exact float32 2**e for integer e in [-149, 127]."""
        normal = ((tl.minimum(tl.maximum(e, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)
        sub = ((tl.minimum(tl.maximum(e, -149), -103) + 24 + 127) << 23).to(tl.float32, bitcast=True)
        return tl.where(e >= -126, normal, sub * 5.960464477539063e-08)  # 2**-24

    @triton.jit
    def _round(r, AWAY: tl.constexpr):
        """Round to integer: half to even (rint), or half away from zero."""
        if AWAY:
            return tl.where(r < 0, -tl.floor(-r + 0.5), tl.floor(r + 0.5))
        return libdevice.rint(r)

    @triton.jit
    def _minifloat(y, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr, AWAY: tl.constexpr):
        """Nearest ExMy value of float32 y (subnormals, saturation, NaN kept), as formats.Minifloat.round."""
        a = tl.abs(y)
        e = tl.maximum(_floor_log2(a), EMIN)
        q = _round(a * _pow2(MBITS - e), AWAY) * _pow2(e - MBITS)
        q = tl.minimum(q, MAXV)
        q = tl.where(y != y, y, q)
        return tl.where(y < 0, -q, q)

    @triton.jit
    def _mx_tile(x, amax, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, AWAY):
        """MX fake-quant of a [BLOCK_M, NB, BLOCK] tile given its block abs-maxima [BLOCK_M, NB]."""
        if RULE == 0:
            e = _floor_log2(amax) - EMAX
        elif RULE == 1:
            e = _ceil_log2(amax) - EMAX
        else:
            e = _ceil_log2(libdevice.div_rn(amax, MAXV))
        e = tl.minimum(tl.maximum(e, -127), 127)[:, :, None]
        y = x * _pow2(-e)
        if IS_INT:
            q = tl.minimum(tl.maximum(_round(y * INT_STEP, AWAY), -MAXV * INT_STEP), MAXV * INT_STEP) / INT_STEP
            q = tl.where(y != y, y, q)
        else:
            q = _minifloat(y, EMIN, MBITS, MAXV, AWAY)
        return q * _pow2(e)

    @triton.jit
    def _int_tile(x, amax, QMIN, QMAX, SCALE_BF16, SCALE_MAX, AWAY):
        """Integer-group fake-quant (fp16/bf16 scales, codes in [QMIN, QMAX]) of a tile."""
        quot = libdevice.div_rn(amax, QMAX * 1.0)
        if SCALE_BF16:
            s = quot.to(tl.bfloat16).to(tl.float32)
        else:
            s = quot.to(tl.float16).to(tl.float32)
        s = tl.minimum(s, SCALE_MAX)[:, :, None]
        safe = tl.where(s == 0.0, 1.0, s)
        q = tl.minimum(tl.maximum(_round(libdevice.div_rn(x, safe), AWAY), QMIN * 1.0), QMAX * 1.0)
        return tl.where(x != x, x, q) * s

    @triton.jit
    def _nvfp4_tile(x, amax, g, inv_g, TWO_LEVEL, AWAY):
        """NVFP4 fake-quant of a tile (block scale rounded to E4M3 exactly, RNE, clamped to [2**-6, 448])."""
        sb = libdevice.div_rn(libdevice.div_rn(amax, 6.0), g)
        sb = _minifloat(tl.minimum(tl.maximum(sb, 0.015625), 448.0), -6, 3, 448.0, False)[:, :, None]
        if TWO_LEVEL:
            q = _minifloat(x * libdevice.div_rn(inv_g, sb), 0, 1, 6.0, AWAY)
            return q * (g * sb)
        q = _minifloat(x * libdevice.div_rn(1.0, sb), 0, 1, 6.0, AWAY)
        return q * sb

    @triton.jit
    def _fq_tile(
        x, g_ptr, KIND, AWAY, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, QMIN, QMAX, SCALE_BF16, SCALE_MAX,
        TWO_LEVEL,
    ):  # fmt: skip
        """Fake-quantize a float32 [BLOCK_M, NB, BLOCK] tile (KIND 0: MX, 1: INT, 2: NVFP4 with its
        ``g, 1/g`` at ``g_ptr``); NaNs are left out of the block abs-maxima."""
        ax = tl.abs(x)
        amax = tl.max(tl.where(ax != ax, 0.0, ax), axis=2)
        if KIND == 0:
            q = _mx_tile(x, amax, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, AWAY)
        elif KIND == 1:
            q = _int_tile(x, amax, QMIN, QMAX, SCALE_BF16, SCALE_MAX, AWAY)
        else:
            q = _nvfp4_tile(x, amax, tl.load(g_ptr), tl.load(g_ptr + 1), TWO_LEVEL, AWAY)
        return q

    @triton.jit
    def _shift_smooth(x, cols, cmask, smooth_ptr, shift, HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr):
        """``(x + c) / s`` as float32 values of ``x``'s dtype, each step rounded to it as torch's
        16-bit ops round (float32 arithmetic, IEEE division); padding (``~cmask``) is 0 afterwards."""
        y = x.to(tl.float32)
        if HAS_SHIFT:
            y = (y + shift).to(x.dtype).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(smooth_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
            y = libdevice.div_rn(y, s).to(x.dtype).to(tl.float32)
        return tl.where(cmask, y, 0.0)

    @triton.jit
    def _absmax_kernel(
        x_ptr, out_ptr, N, K, smooth_ptr, shift,
        BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    ):  # fmt: skip
        """NaN-ignoring abs-max of a flat [.., K] tensor, optionally of ``(x + c) / s`` (see
        :func:`_shift_smooth`), into out_ptr (int32 bits of a float32, start 0)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < N
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        a = tl.abs(_shift_smooth(x, offs % K, inside, smooth_ptr, shift, HAS_SHIFT, HAS_SMOOTH))
        m = tl.max(tl.where(a != a, 0.0, a), axis=0)
        tl.atomic_max(out_ptr, m.to(tl.int32, bitcast=True))  # non-negative floats order as their bits

    @triton.jit
    def _fq_kernel(
        x_ptr, out_ptr, src_ptr, g_ptr, smooth_ptr, M, K, LDX, LDO, shift, XB, OB, SB, SMB,
        NB: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
        SRC: tl.constexpr,
        BLOCK: tl.constexpr, KIND: tl.constexpr, AWAY: tl.constexpr, IS_INT: tl.constexpr, EMIN: tl.constexpr,
        MBITS: tl.constexpr, MAXV: tl.constexpr, EMAX: tl.constexpr, INT_STEP: tl.constexpr, RULE: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_BF16: tl.constexpr, SCALE_MAX: tl.constexpr,
        TWO_LEVEL: tl.constexpr,
        S_BLOCK: tl.constexpr, S_KIND: tl.constexpr, S_AWAY: tl.constexpr, S_IS_INT: tl.constexpr,
        S_EMIN: tl.constexpr, S_MBITS: tl.constexpr, S_MAXV: tl.constexpr, S_EMAX: tl.constexpr,
        S_INT_STEP: tl.constexpr, S_RULE: tl.constexpr, S_QMIN: tl.constexpr, S_QMAX: tl.constexpr,
        S_SCALE_BF16: tl.constexpr, S_SCALE_MAX: tl.constexpr, S_TWO_LEVEL: tl.constexpr,
        ITEMS_FIRST: tl.constexpr = False,
    ):  # fmt: skip
        """A [BLOCK_M rows, NB blocks of BLOCK columns] tile of ``x [M, K]`` (row stride LDX): its
        fake-quant, of ``x' = (x + c) / s`` (:func:`_shift_smooth`), into ``out`` (row stride LDO;
        may be x itself); SRC 1: x' also into ``src [M, K]``, SRC 2: x' fake-quantized in the S_
        format into ``src`` (its per-tensor ``g, 1/g`` at ``g_ptr + 2``). x is read once. Grid
        axis 2 runs over a batch: item ``b`` reads ``x + b XB`` (XB 0: one x for all) and
        ``smooth + b SMB`` and writes ``out + b OB``, ``src + b SB``; with ITEMS_FIRST the batch
        runs on axis 0 instead (the fastest: the items of one tile run together, so a shared x
        comes from L2) and the row and column tiles on axes 1 and 2."""
        item = tl.program_id(0 if ITEMS_FIRST else 2).to(tl.int64)
        row_tile = tl.program_id(1 if ITEMS_FIRST else 0)
        col_tile = tl.program_id(2 if ITEMS_FIRST else 1)
        x_ptr += item * XB
        out_ptr += item * OB
        src_ptr += item * SB
        smooth_ptr += item * SMB
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        r3 = rows[:, None, None].to(tl.int64)
        cols = (col_tile * NB + tl.arange(0, NB))[None, :, None] * BLOCK + tl.arange(0, BLOCK)[None, None, :]
        cmask = cols < K
        mask = (r3 < M) & cmask
        x = tl.load(x_ptr + r3 * LDX + cols, mask=mask, other=0.0)
        xs = _shift_smooth(x, cols, cmask, smooth_ptr, shift, HAS_SHIFT, HAS_SMOOTH)
        q = _fq_tile(
            xs, g_ptr, KIND, AWAY, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, QMIN, QMAX, SCALE_BF16, SCALE_MAX,
            TWO_LEVEL,
        )  # fmt: skip
        tl.store(out_ptr + r3 * LDO + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        if SRC == 1:
            tl.store(src_ptr + r3 * K + cols, xs.to(src_ptr.dtype.element_ty), mask=mask)
        elif SRC == 2:
            q2 = _fq_tile(
                tl.reshape(xs, (BLOCK_M, NB * BLOCK // S_BLOCK, S_BLOCK)), g_ptr + 2, S_KIND, S_AWAY, S_IS_INT,
                S_EMIN, S_MBITS, S_MAXV, S_EMAX, S_INT_STEP, S_RULE, S_QMIN, S_QMAX, S_SCALE_BF16, S_SCALE_MAX,
                S_TWO_LEVEL,
            )  # fmt: skip
            q2 = tl.reshape(q2, (BLOCK_M, NB, BLOCK))
            tl.store(src_ptr + r3 * K + cols, q2.to(src_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sq_error_kernel(
        y_ptr, yq_ptr, extra_ptr, pos_ptr, out_ptr, C, M,
        HAS_EXTRA: tl.constexpr, ITEMS_FIRST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """Per row of item ``b``: ``sum((y[pos[b]] - (yq[b] + extra[b]))^2)`` over its M columns,
        each step in float32 (``y [U, C, M]``, ``yq``/``extra`` ``[B, C, M]``, contiguous), into
        ``out [B, C]``; items on grid axis 0 with ITEMS_FIRST, else axis 1."""
        item = tl.program_id(0 if ITEMS_FIRST else 1).to(tl.int64)
        rows = tl.program_id(1 if ITEMS_FIRST else 0) * BLOCK_R + tl.arange(0, BLOCK_R)
        unit = tl.load(pos_ptr + item).to(tl.int64)
        inside = rows < C
        y_ptr += unit * C * M
        yq_ptr += item * C * M
        extra_ptr += item * C * M
        acc = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
        for start in range(0, M, BLOCK_M):
            cols = start + tl.arange(0, BLOCK_M)
            mask = inside[:, None] & (cols < M)[None, :]
            off = rows[:, None].to(tl.int64) * M + cols[None, :]
            q = tl.load(yq_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_EXTRA:
                q += tl.load(extra_ptr + off, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32) - q
            acc += d * d
        tl.store(out_ptr + item * C + rows, tl.sum(acc, 1), mask=inside)


_META_DEFAULTS: dict[str, Any] = {
    "KIND": 0, "AWAY": False, "IS_INT": False, "EMIN": 0, "MBITS": 0, "MAXV": 1.0, "EMAX": 0, "INT_STEP": 1.0,
    "RULE": 0, "QMIN": -7, "QMAX": 7, "SCALE_BF16": False, "SCALE_MAX": 65504.0, "TWO_LEVEL": False,
}  # fmt: skip  # a spec's meta names those of its kind; the kernels take every name


def _kernel_meta(spec: KernelSpec | None, prefix: str = "") -> dict[str, Any]:
    """``spec``'s block and constexprs (defaults filled in) as a kernel's keyword arguments, names
    prefixed; ``None`` gives placeholders of a role the kernel does not use."""
    meta = {**_META_DEFAULTS, **(dict(spec.meta) if spec else {}), "BLOCK": spec.block if spec else 16}
    return {prefix + name: value for name, value in meta.items()}


def tensor_absmax(x: torch.Tensor, shift: float | None = None, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """NaN-ignoring ``max |x|`` (of ``(x + shift) / smooth`` rounded as torch rounds each step, when
    given) as a float32 0-d tensor, in one pass (no host sync)."""
    flat = x.reshape(-1)
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    block = 8192
    _absmax_kernel[(triton.cdiv(flat.numel(), block),)](
        flat, out, flat.numel(), x.shape[-1], flat if smooth is None else smooth, shift or 0.0,
        BLOCK=block, HAS_SHIFT=bool(shift), HAS_SMOOTH=smooth is not None,
    )  # fmt: skip
    return out.view(torch.float32)[0]


def _scale_pair(spec: KernelSpec, absmax: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[g, 1/g]`` float32 of a spec's per-tensor scale (ones when it has none)."""
    if spec.tensor_scale != "absmax":
        return torch.ones(2, device=device, dtype=torch.float32)
    a = absmax()
    g = a / a.new_full((), spec.tensor_scale_div)  # IEEE division (a tensor divisor)
    g = torch.where(g == 0, torch.ones_like(g), g)
    return torch.stack([g, 1.0 / g])


def tile_config(k: int, blocks: Sequence[int]) -> tuple[int, int]:
    """``(NB, BLOCK_M)`` of :func:`_fq_kernel` for width ``k`` and the tile's formats' ``blocks``
    (the first the tile's own; a second: the kernel writes two outputs): 128 columns for one
    output, 64 for two (at least each block, at most k rounded up to a power of two), 16 rows (up
    to 64 for narrow tiles). Swept on an H200 (8192 x 1152 / 4608 and 2048 x 2240 bf16, tiles of
    64-256 columns x 8-128 rows, 4 and 8 warps, 7 format pairs): within 4% of the best tile in 19
    of 21 cases (worst 1.25x), where the former 256 x 16 tile was up to 2.6x slower."""
    cols = min(64 if len(blocks) > 1 else 128, 1 << (k - 1).bit_length())
    cols = max(cols, *blocks)
    return cols // blocks[0], max(16, min(64, 1024 // cols))


def _launch(
    x: torch.Tensor,
    out: torch.Tensor,
    spec: KernelSpec,
    gs: torch.Tensor,
    src: torch.Tensor | None = None,
    source: KernelSpec | None = None,
    shift: float = 0.0,
    smooth: torch.Tensor | None = None,
    tile: tuple[int, int] | None = None,
) -> None:
    """:func:`_fq_kernel` over ``x [M, K]`` or a batch ``x [B, M, K]`` (a batch stride of 0: one x
    for every item) into ``out`` (both with unit column stride), and ``src`` (rows contiguous: x',
    or its ``source`` fake-quant); ``smooth`` ``[K]`` or, for a batch, ``[B, K]`` (one per item)."""
    x3, out3 = (x, out) if x.dim() == 3 else (x[None], out[None])
    src3 = None if src is None else (src if src.dim() == 3 else src[None])
    b, m, k = x3.shape
    mode = 0 if src is None else (1 if source is None else 2)
    nb, block_m = tile or tile_config(k, [spec.block] + ([] if src is None else [source.block if source else 1]))
    grid = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, spec.block), nb), b)
    first = b > 1 and x3.stride(0) == 0 and max(grid[:2]) <= MAX_GRID_Y  # items of one shared x together
    grid = (b, *grid[:2]) if first else grid
    per_item = smooth is not None and smooth.dim() == 2
    _fq_kernel[grid](
        x3, out3, out3 if src3 is None else src3, gs, x3 if smooth is None else smooth, m, k, x3.stride(1),
        out3.stride(1), shift or 0.0, x3.stride(0), out3.stride(0), 0 if src3 is None else src3.stride(0),
        smooth.stride(0) if per_item else 0, NB=nb, BLOCK_M=block_m, HAS_SHIFT=bool(shift),
        HAS_SMOOTH=smooth is not None, SRC=mode, ITEMS_FIRST=first, **_kernel_meta(spec),
        **_kernel_meta(source, "S_"),
    )  # fmt: skip


def _scales(specs: Sequence[KernelSpec], absmax: Callable[[], torch.Tensor], unread: torch.Tensor) -> torch.Tensor:
    """The ``[g, 1/g]`` pairs of ``specs`` in order (``absmax`` computed once, if one needs it), or
    ``unread`` (a placeholder pointer) when none has a per-tensor scale."""
    if all(s.tensor_scale == "none" for s in specs):
        return unread
    once = cache(absmax)
    return torch.cat([_scale_pair(s, once, unread.device) for s in specs])


def fake_quant(x: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """Fake-quantize ``x`` along its last dim with the fused kernel ``spec`` describes; call it
    only where :func:`choose` picked ``"triton"``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(x2)
    _launch(x2, out, spec, _scales([spec], lambda: tensor_absmax(x2), out))
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- the fused low-rank branch

_fused_on: list[bool] = [True]


@contextmanager
def use_fused_branch(on: bool) -> Iterator[None]:
    """Within the block, quantized layers with a low-rank branch use the fused branch path where
    it applies (``on``, the default) or the unfused path (benchmarks compare them)."""
    previous = _fused_on[0]
    _fused_on[0] = on
    try:
        yield
    finally:
        _fused_on[0] = previous


def fused_branch_allowed(x: torch.Tensor) -> bool:
    """Whether the fused branch path may run on ``x``: where Triton would (CUDA, backend ``auto``
    or ``triton``, ``PTQBENCH_KERNELS`` not 0), a 16-bit input, and not switched off
    (:func:`use_fused_branch`, or ``PTQBENCH_FUSED_BRANCH=0`` under ``auto``)."""
    chosen = current_backend()
    if not _fused_on[0] or x.dtype not in (torch.bfloat16, torch.float16) or not _triton_allowed(chosen):
        return False
    return (chosen == "triton" or _env_on("PTQBENCH_FUSED_BRANCH")) and _launchable(x)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def branch_width(k: int, rank: int) -> int:
    """Columns of the fused buffer ``[Qa(x) | h | 0]``: ``k + rank`` rounded up to a multiple of 16."""
    return _ceil_div(k + rank, 16) * 16


def fused_branch(
    x: torch.Tensor,
    down: torch.Tensor,
    main: KernelSpec,
    source: KernelSpec | None,
    mid: KernelSpec | None,
    width: int,
    shift: float = 0.0,
    smooth: torch.Tensor | None = None,
    tile: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, width]`` in ``x``'s dtype: ``[Qa(x') | Qmid(src @ down^T) | 0]`` for ``x [M, K]`` (contiguous)
    and ``down [width - K, K]`` (rows past the rank zero), ``x' = (x + shift) / smooth`` rounded as torch
    rounds each step, ``src`` x' (``source`` None), Qa(x') (``source == main``) or ``source``'s own
    fake-quant of x'; the product accumulated in float32 and rounded to x's dtype before ``mid``
    (None: none). One kernel reads x once and writes Qa(x') (and, where ``src`` is neither x nor
    Qa(x'), ``src``); the product is one GEMM writing its columns in place, ``mid`` one kernel in
    place. ``tile``: the kernel's ``(NB, BLOCK_M)``. Call only where :func:`fused_branch_allowed` holds.

    A batch: ``x [B, M, K]`` (rows contiguous; a batch stride of 0 reads one x for every item),
    ``down [B, width - K, K]``, ``smooth [B, K]`` (or one ``[K]``), ``out [B, M, width]``: each item
    as alone, for formats without a per-tensor scale (which would be one per call). ``out``: where
    to write (default: a new tensor)."""
    *lead, m, k = x.shape
    if down.shape[-2:] != (width - k, k) or down.dim() != x.dim():
        raise ValueError(f"fused_branch: down {tuple(down.shape)} for width {width} and x {tuple(x.shape)}")
    out = torch.empty(*lead, m, width, device=x.device, dtype=x.dtype) if out is None else out
    specs = [main] + ([source] if source is not None and source != main else [])
    if lead and any(s is not None and s.tensor_scale != "none" for s in [*specs, mid]):
        raise ValueError("fused_branch: a batch takes formats without a per-tensor scale")
    gs = _scales(specs, lambda: tensor_absmax(x, shift or None, smooth), out)
    prepared = bool(shift) or smooth is not None
    if source is None:
        src = torch.empty(x.shape, device=x.device, dtype=x.dtype) if prepared else None
        _launch(x, out, main, gs, src, None, shift, smooth, tile)
        src = x if src is None else src
    elif source == main:
        _launch(x, out, main, gs, None, None, shift, smooth, tile)
        src = out[..., :k]
    else:
        src = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        _launch(x, out, main, gs, src, source, shift, smooth, tile)
    h = out[..., k:]
    (torch.bmm if lead else torch.mm)(src, down.mT, out=h)
    if mid is not None:
        _launch(h, h, mid, _scales([mid], lambda: tensor_absmax(h.contiguous()), h))
    return out


# ----------------------------------------------------------------------------- scoring


def sq_error_allowed(y: torch.Tensor) -> bool:
    """Whether :func:`row_sq_error` may run on ``y``: where Triton would (CUDA, backend ``auto``
    or ``triton``, ``PTQBENCH_KERNELS`` not 0)."""
    return _triton_allowed(current_backend()) and _launchable(y)


def row_sq_error(
    y: torch.Tensor, yq: torch.Tensor, extra: torch.Tensor | None, pos: torch.Tensor
) -> torch.Tensor:
    """``[B, C]`` float32: per row, ``sum((y[pos] - (yq + extra))^2)`` over the last dim, every step
    in float32 (the sum in another order than torch's), for references ``y [U, C, M]``, outputs
    ``yq [B, C, M]`` and ``extra`` (or None) and each output's reference ``pos [B]``; ``y`` is read
    in place (no ``y[pos]`` copy). Call only where :func:`sq_error_allowed` holds."""
    b, c, m = yq.shape
    y, yq = y.contiguous(), yq.contiguous()
    extra = yq if extra is None else extra.contiguous()
    out = torch.empty(b, c, device=yq.device, dtype=torch.float32)
    tiles = triton.cdiv(c, SQ_ROWS)
    first = tiles <= MAX_GRID_Y  # items on grid axis 0 (the fastest): one row tile's reference from L2
    _sq_error_kernel[(b, tiles) if first else (tiles, b)](
        y, yq, extra, pos.to(yq.device, torch.int64).contiguous(), out, c, m, HAS_EXTRA=extra is not yq,
        ITEMS_FIRST=first, BLOCK_R=SQ_ROWS, BLOCK_M=min(512, triton.next_power_of_2(m)),
    )  # fmt: skip
    return out
