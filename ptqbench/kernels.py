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


def choose(x: torch.Tensor, backend: Backend | None, spec: KernelSpec | None, compiles: bool) -> Path:
    """The path that quantizes ``x`` under ``backend`` (``None``: the current backend), given the
    format's kernel (``spec``, ``None`` if it has none) and whether it compiles exactly."""
    chosen = current_backend() if backend is None else check_backend(backend)
    if chosen == "eager":
        return "eager"
    triton_allowed = chosen == "triton" or (chosen == "auto" and _env_on("PTQBENCH_KERNELS"))
    if triton_allowed and spec is not None and _launchable(x):
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
    def _fq_kernel(
        x_ptr, out_ptr, g_ptr, M, K,
        KIND: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, BLOCK_M: tl.constexpr, AWAY: tl.constexpr,
        IS_INT: tl.constexpr = False, EMIN: tl.constexpr = 0, MBITS: tl.constexpr = 0, MAXV: tl.constexpr = 1.0,
        EMAX: tl.constexpr = 0, INT_STEP: tl.constexpr = 1.0, RULE: tl.constexpr = 0,
        QMIN: tl.constexpr = -7, QMAX: tl.constexpr = 7, SCALE_BF16: tl.constexpr = False,
        SCALE_MAX: tl.constexpr = 65504.0, TWO_LEVEL: tl.constexpr = False,
    ):  # fmt: skip
        """Fake-quantize a [BLOCK_M rows, NB blocks of BLOCK columns] tile (KIND 0: MX, 1: INT, 2: NVFP4)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tl.program_id(1) * NB + tl.arange(0, NB))[None, :, None] * BLOCK + tl.arange(0, BLOCK)[None, None, :]
        mask = (rows[:, None, None] < M) & (cols < K)
        offs = rows[:, None, None].to(tl.int64) * K + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        amax = tl.max(tl.where(ax != ax, 0.0, ax), axis=2)
        if KIND == 0:
            q = _mx_tile(x, amax, IS_INT, EMIN, MBITS, MAXV, EMAX, INT_STEP, RULE, AWAY)
        elif KIND == 1:
            q = _int_tile(x, amax, QMIN, QMAX, SCALE_BF16, SCALE_MAX, AWAY)
        else:
            q = _nvfp4_tile(x, amax, tl.load(g_ptr), tl.load(g_ptr + 1), TWO_LEVEL, AWAY)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _absmax_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """NaN-ignoring abs-max of a flat tensor into out_ptr (int32 bits of a float32, start 0)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32))
        m = tl.max(tl.where(a != a, 0.0, a), axis=0)
        tl.atomic_max(out_ptr, m.to(tl.int32, bitcast=True))  # non-negative floats order as their bits


def tensor_absmax(x: torch.Tensor) -> torch.Tensor:
    """NaN-ignoring ``max |x|`` as a float32 0-d tensor, in one pass (no host sync)."""
    flat = x.reshape(-1)
    out = torch.zeros(1, dtype=torch.int32, device=x.device)
    block = 8192
    _absmax_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), BLOCK=block)
    return out.view(torch.float32)[0]


COLS_PER_STEP = 256  # columns of a tile (NB blocks of BLOCK); rows fill it to 4096 elements


def fake_quant(x: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """Fake-quantize ``x`` along its last dim with the fused kernel ``spec`` describes; call it
    only where :func:`choose` picked ``"triton"``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    out = torch.empty_like(x2)
    block, meta = spec.block, dict(spec.meta)
    nb = max(1, min(COLS_PER_STEP // block, triton.next_power_of_2(triton.cdiv(k, block))))
    block_m = max(1, min(64, 4096 // (nb * block)))
    if spec.tensor_scale == "absmax":
        absmax = tensor_absmax(x2)
        g = absmax / absmax.new_full((), spec.tensor_scale_div)  # IEEE division (a tensor divisor)
        g = torch.where(g == 0, torch.ones_like(g), g)
        gs = torch.stack([g, 1.0 / g])
    elif spec.tensor_scale == "unit":
        gs = torch.ones(2, device=x.device, dtype=torch.float32)
    else:
        gs = out  # not read
    grid = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, block), nb))
    _fq_kernel[grid](x2, out, gs, m, k, BLOCK=block, NB=nb, BLOCK_M=block_m, **meta)
    return out.reshape(x.shape)
