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

:func:`fused_branch` is the low-rank branch's kernel (used by :class:`~ptqbench.layers.QuantLinear`
where :func:`fused_branch_allowed`): from one read of x it writes the fake-quantized activations and
the rank-r product beside them, built from the same tile helpers as :func:`fake_quant`, so its
activations are bit-identical to the format's kernel.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
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
    def _fq_kernel(
        x_ptr, out_ptr, g_ptr, M, K,
        BLOCK: tl.constexpr, NB: tl.constexpr, BLOCK_M: tl.constexpr, KIND: tl.constexpr, AWAY: tl.constexpr,
        IS_INT: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, MAXV: tl.constexpr, EMAX: tl.constexpr,
        INT_STEP: tl.constexpr, RULE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
        SCALE_BF16: tl.constexpr, SCALE_MAX: tl.constexpr, TWO_LEVEL: tl.constexpr,
    ):  # fmt: skip
        """Fake-quantize a [BLOCK_M rows, NB blocks of BLOCK columns] tile."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tl.program_id(1) * NB + tl.arange(0, NB))[None, :, None] * BLOCK + tl.arange(0, BLOCK)[None, None, :]
        mask = (rows[:, None, None] < M) & (cols < K)
        offs = rows[:, None, None].to(tl.int64) * K + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = _fq_tile(
            x, g_ptr, KIND, AWAY, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, QMIN, QMAX, SCALE_BF16, SCALE_MAX,
            TWO_LEVEL,
        )  # fmt: skip
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)

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
    def _branch_epilogue(
        acc, out_ptr, g_ptr, rows, M, K, LDO,
        BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, HAS_MID: tl.constexpr,
        M_BLOCK, M_KIND, M_AWAY, M_IS_INT, M_EMIN, M_MBITS, M_MAXV, M_EMAX, M_INT_STEP, M_RULE, M_QMIN, M_QMAX,
        M_SCALE_BF16, M_SCALE_MAX, M_TWO_LEVEL,
    ):  # fmt: skip
        """Store the float32 product ``acc [BLOCK_M, R_PAD]`` into columns ``K:LDO`` of ``out``:
        rounded to out's dtype, then (HAS_MID) fake-quantized in the intermediate's format."""
        dt = out_ptr.dtype.element_ty
        ranks = tl.arange(0, R_PAD)[None, :]
        h = acc.to(dt)
        if HAS_MID:
            h = _fq_tile(
                tl.reshape(h.to(tl.float32), (BLOCK_M, R_PAD // M_BLOCK, M_BLOCK)), g_ptr + 4, M_KIND, M_AWAY,
                M_IS_INT, M_EMIN, M_MBITS, M_MAXV, M_EMAX, M_INT_STEP, M_RULE, M_QMIN, M_QMAX, M_SCALE_BF16,
                M_SCALE_MAX, M_TWO_LEVEL,
            )  # fmt: skip
            h = tl.reshape(h, (BLOCK_M, R_PAD)).to(dt)
        mask = (rows[:, None] < M) & (ranks < LDO - K)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * LDO + K + ranks, h, mask=mask)

    @triton.jit
    def _branch_kernel(
        x_ptr, down_ptr, out_ptr, ws_ptr, smooth_ptr, g_ptr, M, K, R, LDO, KC, shift,
        BLOCK_M: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
        HAS_SMOOTH: tl.constexpr, SOURCE: tl.constexpr, HAS_MID: tl.constexpr, DIRECT: tl.constexpr,
        BLOCK: tl.constexpr, KIND: tl.constexpr, AWAY: tl.constexpr, IS_INT: tl.constexpr, EMIN: tl.constexpr,
        MBITS: tl.constexpr, MAXV: tl.constexpr, EMAX: tl.constexpr, INT_STEP: tl.constexpr, RULE: tl.constexpr,
        QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_BF16: tl.constexpr, SCALE_MAX: tl.constexpr,
        TWO_LEVEL: tl.constexpr,
        S_BLOCK: tl.constexpr, S_KIND: tl.constexpr, S_AWAY: tl.constexpr, S_IS_INT: tl.constexpr,
        S_EMIN: tl.constexpr, S_MBITS: tl.constexpr, S_MAXV: tl.constexpr, S_EMAX: tl.constexpr,
        S_INT_STEP: tl.constexpr, S_RULE: tl.constexpr, S_QMIN: tl.constexpr, S_QMAX: tl.constexpr,
        S_SCALE_BF16: tl.constexpr, S_SCALE_MAX: tl.constexpr, S_TWO_LEVEL: tl.constexpr,
        M_BLOCK: tl.constexpr, M_KIND: tl.constexpr, M_AWAY: tl.constexpr, M_IS_INT: tl.constexpr,
        M_EMIN: tl.constexpr, M_MBITS: tl.constexpr, M_MAXV: tl.constexpr, M_EMAX: tl.constexpr,
        M_INT_STEP: tl.constexpr, M_RULE: tl.constexpr, M_QMIN: tl.constexpr, M_QMAX: tl.constexpr,
        M_SCALE_BF16: tl.constexpr, M_SCALE_MAX: tl.constexpr, M_TWO_LEVEL: tl.constexpr,
    ):  # fmt: skip
        """BLOCK_M rows and the KC columns of split ``program_id(1)`` of ``x [M, K]``: Qa(x') into
        ``out[:, :K]`` and the partial rank-r product ``src @ down^T`` (float32) into the workspace
        ``ws [splits, M, R_PAD]``, or (DIRECT, one split) through :func:`_branch_epilogue` into
        ``out[:, K:]``; ``x' = (x + c) / s``, ``src`` x' (SOURCE 0), Qa(x') (1) or the branch's own
        Qa2(x') (2, the S_ format). Each x tile is read once."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        r3 = rows[:, None, None]
        nb = tl.arange(0, BK // BLOCK)[None, :, None] * BLOCK + tl.arange(0, BLOCK)[None, None, :]
        ranks = tl.arange(0, R_PAD)[:, None]
        dt = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        k_lo = tl.program_id(1) * KC
        for k0 in range(k_lo, tl.minimum(k_lo + KC, K), BK):
            cols = k0 + nb
            cmask = cols < K
            mask = (r3 < M) & cmask
            x = tl.load(x_ptr + r3.to(tl.int64) * K + cols, mask=mask, other=0.0)
            xs = _shift_smooth(x, cols, cmask, smooth_ptr, shift, HAS_SHIFT, HAS_SMOOTH)
            q = _fq_tile(
                xs, g_ptr, KIND, AWAY, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, QMIN, QMAX, SCALE_BF16,
                SCALE_MAX, TWO_LEVEL,
            ).to(dt)  # fmt: skip
            tl.store(out_ptr + r3.to(tl.int64) * LDO + cols, q, mask=mask)
            if SOURCE == 0:
                src = tl.reshape(xs.to(dt), (BLOCK_M, BK))
            elif SOURCE == 1:
                src = tl.reshape(q, (BLOCK_M, BK))
            else:
                src = _fq_tile(
                    tl.reshape(xs, (BLOCK_M, BK // S_BLOCK, S_BLOCK)), g_ptr + 2, S_KIND, S_AWAY, S_IS_INT, S_EMIN,
                    S_MBITS, S_MAXV, S_EMAX, S_INT_STEP, S_RULE, S_QMIN, S_QMAX, S_SCALE_BF16, S_SCALE_MAX,
                    S_TWO_LEVEL,
                )  # fmt: skip
                src = tl.reshape(src.to(dt), (BLOCK_M, BK))
            kcol = k0 + tl.arange(0, BK)[None, :]
            d = tl.load(down_ptr + ranks.to(tl.int64) * K + kcol, mask=(kcol < K) & (ranks < R), other=0.0)
            acc = tl.dot(src, tl.trans(d), acc)
        if DIRECT:
            _branch_epilogue(
                acc, out_ptr, g_ptr, rows, M, K, LDO, BLOCK_M, R_PAD, HAS_MID, M_BLOCK, M_KIND, M_AWAY, M_IS_INT,
                M_EMIN, M_MBITS, M_MAXV, M_EMAX, M_INT_STEP, M_RULE, M_QMIN, M_QMAX, M_SCALE_BF16, M_SCALE_MAX,
                M_TWO_LEVEL,
            )  # fmt: skip
        else:
            offs = (tl.program_id(1) * M + rows[:, None]).to(tl.int64) * R_PAD + tl.arange(0, R_PAD)[None, :]
            tl.store(ws_ptr + offs, acc, mask=rows[:, None] < M)

    @triton.jit
    def _branch_sum_kernel(
        ws_ptr, out_ptr, g_ptr, M, K, LDO, SPLITS,
        BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, HAS_MID: tl.constexpr,
        M_BLOCK: tl.constexpr, M_KIND: tl.constexpr, M_AWAY: tl.constexpr, M_IS_INT: tl.constexpr,
        M_EMIN: tl.constexpr, M_MBITS: tl.constexpr, M_MAXV: tl.constexpr, M_EMAX: tl.constexpr,
        M_INT_STEP: tl.constexpr, M_RULE: tl.constexpr, M_QMIN: tl.constexpr, M_QMAX: tl.constexpr,
        M_SCALE_BF16: tl.constexpr, M_SCALE_MAX: tl.constexpr, M_TWO_LEVEL: tl.constexpr,
    ):  # fmt: skip
        """The splits' partial products summed in split order (deterministic), then the epilogue."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs = rows[:, None].to(tl.int64) * R_PAD + tl.arange(0, R_PAD)[None, :]
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        part = ws_ptr + offs
        for _ in range(0, SPLITS):
            acc += tl.load(part, mask=rows[:, None] < M, other=0.0)
            part += M * R_PAD
        _branch_epilogue(
            acc, out_ptr, g_ptr, rows, M, K, LDO, BLOCK_M, R_PAD, HAS_MID, M_BLOCK, M_KIND, M_AWAY, M_IS_INT,
            M_EMIN, M_MBITS, M_MAXV, M_EMAX, M_INT_STEP, M_RULE, M_QMIN, M_QMAX, M_SCALE_BF16, M_SCALE_MAX,
            M_TWO_LEVEL,
        )  # fmt: skip


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


COLS_PER_STEP = 256  # columns of a tile (NB blocks of BLOCK); rows fill it to 4096 elements


def fake_quant(x: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """Fake-quantize ``x`` along its last dim with the fused kernel ``spec`` describes; call it
    only where :func:`choose` picked ``"triton"``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    out = torch.empty_like(x2)
    block = spec.block
    nb = max(1, min(COLS_PER_STEP // block, triton.next_power_of_2(triton.cdiv(k, block))))
    block_m = max(1, min(64, 4096 // (nb * block)))
    gs = out if spec.tensor_scale == "none" else _scale_pair(spec, lambda: tensor_absmax(x2), x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, block), nb))
    _fq_kernel[grid](x2, out, gs, m, k, NB=nb, BLOCK_M=block_m, **_kernel_meta(spec))
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- the fused low-rank branch

TARGET_PROGRAMS = 1024  # programs of the fused branch kernel that fill an H100/H200 with memory traffic
MAX_PRODUCT_PAD = 256  # widest (padded) rank-r product the fused branch kernel accumulates in registers
_fused_on: list[bool] = [True]


@contextmanager
def use_fused_branch(on: bool) -> Iterator[None]:
    """Within the block, quantized layers with a low-rank branch use the fused branch kernel where
    it applies (``on``, the default) or the unfused path (benchmarks compare them)."""
    previous = _fused_on[0]
    _fused_on[0] = on
    try:
        yield
    finally:
        _fused_on[0] = previous


def fused_branch_allowed(x: torch.Tensor) -> bool:
    """Whether the fused branch kernel may run on ``x``: where Triton would (CUDA, backend ``auto``
    or ``triton``, ``PTQBENCH_KERNELS`` not 0), a 16-bit input, and not switched off
    (:func:`use_fused_branch`, or ``PTQBENCH_FUSED_BRANCH=0`` under ``auto``)."""
    chosen = current_backend()
    if not _fused_on[0] or x.dtype not in (torch.bfloat16, torch.float16) or not _triton_allowed(chosen):
        return False
    return (chosen == "triton" or _env_on("PTQBENCH_FUSED_BRANCH")) and _launchable(x)


def branch_width(k: int, rank: int) -> int:
    """Columns of the fused buffer ``[Qa(x) | h | 0]``: ``k + rank`` rounded up to a multiple of 16."""
    return -(-(k + rank) // 16) * 16


def product_pad(columns: int, mid: KernelSpec | None) -> int:
    """The kernel's width of the rank-r product for ``columns`` buffer columns: a power of two, at
    least 16 (the matrix units') and the intermediate format's block."""
    return max(16, 1 << max(0, columns - 1).bit_length(), mid.block if mid else 16)


def branch_config(m: int, k: int, r_pad: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BK, num_warps, KC)`` of the fused branch kernel for ``m x k`` inputs and a
    ``r_pad``-wide product: K is split into chunks of KC columns until about 1024 programs run
    (the partial products are summed by a second, small kernel)."""
    block_m, bk = 32, 128
    splits = max(1, min(_ceil_div(k, bk), round(TARGET_PROGRAMS / _ceil_div(m, block_m))))
    return block_m, bk, 4, _ceil_div(_ceil_div(k, splits), bk) * bk


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fused_branch(
    x: torch.Tensor,
    down: torch.Tensor,
    main: KernelSpec,
    source: KernelSpec | None,
    mid: KernelSpec | None,
    width: int,
    shift: float = 0.0,
    smooth: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``[M, width]`` in ``x``'s dtype: ``[Qa(x') | Qmid(src @ down^T) | 0]`` for ``x [M, K]`` (contiguous)
    and ``down [r, K]``, ``x' = (x + shift) / smooth`` rounded as torch rounds each step, ``src`` x'
    (``source`` None), Qa(x') (``source == main``) or ``source``'s own fake-quant of x'; the product
    accumulated in float32 and rounded to x's dtype before ``mid`` (None: none). Reads x once (plus
    one read for a per-tensor scale). Call only where :func:`fused_branch_allowed` holds."""
    m, k = x.shape
    rank = down.shape[0]
    blocks = [main.block] + ([source.block] if source is not None else []) + ([mid.block] if mid else [])
    r_pad = product_pad(width - k, mid)
    if width - k < rank or r_pad > MAX_PRODUCT_PAD or (mid is not None and mid.tensor_scale == "absmax"):
        raise ValueError(f"fused_branch: rank {rank}, {width - k} product columns, mid {mid}: not supported")
    block_m, bk, warps, kc = config or branch_config(m, k, r_pad)
    bk = max(bk, *blocks)
    kc = _ceil_div(kc, bk) * bk
    splits = _ceil_div(k, kc)
    out = torch.empty(m, width, device=x.device, dtype=x.dtype)
    shift_smooth = (shift or None, smooth)
    specs = (main, source or main, mid or main)
    if any(s.tensor_scale != "none" for s in specs):
        absmax = cache(lambda: tensor_absmax(x, *shift_smooth))
        gs = torch.cat([_scale_pair(s, absmax, x.device) for s in specs])
    else:
        gs = out  # not read
    ws = out if splits == 1 else torch.empty(splits, m, r_pad, device=x.device, dtype=torch.float32)
    mid_meta = _kernel_meta(mid, "M_")
    _branch_kernel[(triton.cdiv(m, block_m), splits)](
        x, down, out, ws, x if smooth is None else smooth, gs, m, k, rank, width, kc, shift or 0.0,
        BLOCK_M=block_m, BK=bk, R_PAD=r_pad, HAS_SHIFT=bool(shift), HAS_SMOOTH=smooth is not None,
        SOURCE=0 if source is None else (1 if source == main else 2), HAS_MID=mid is not None, DIRECT=splits == 1,
        num_warps=warps, **_kernel_meta(main), **_kernel_meta(source, "S_"), **mid_meta,
    )  # fmt: skip
    if splits > 1:
        _branch_sum_kernel[(triton.cdiv(m, 32),)](
            ws, out, gs, m, k, width, splits, BLOCK_M=32, R_PAD=r_pad, HAS_MID=mid is not None, **mid_meta
        )
    return out
