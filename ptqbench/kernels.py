"""Fused Triton kernels for activation fake-quantization on CUDA.

One pass over the activation: each program loads a tile of ``BLOCK_M`` rows x one block (or
group) along the last dim, computes the block's scale and writes the fake-quantized values.
The arithmetic mirrors the torch reference in :mod:`ptqbench.formats` operation by operation
(IEEE-rounded divisions, exact powers of two, round-half-even via ``rint``), and the tests check
bit equality against it on the GPU. Formats or dtypes a kernel does not cover fall back to the
torch reference. ``PTQBENCH_KERNELS=0`` disables the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from ptqbench.formats import ELEMENTS, Format, IntFormat, MXFormat, NVFP4Format, true_div

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs simply never use this module.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


_switch = {"on": os.environ.get("PTQBENCH_KERNELS", "1") != "0"}


@cache
def _available() -> bool:
    return HAVE_TRITON and torch.cuda.is_available()


def enabled() -> bool:
    return _switch["on"] and _available()


@contextmanager
def use_kernels(on: bool) -> Iterator[None]:
    """Temporarily turn the fused kernels on or off (benchmarks compare both paths)."""
    previous, _switch["on"] = _switch["on"], on
    try:
        yield
    finally:
        _switch["on"] = previous


def _pow2_block(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0 and n <= 256


def supports(fmt: Format, x: torch.Tensor) -> bool:
    """Whether a fused kernel computes ``fmt.quantize(x)`` (bit-identically to the reference)."""
    if not (enabled() and x.is_cuda and x.dtype in _INPUT_DTYPES and x.numel() > 0 and x.dim() >= 1):
        return False
    if isinstance(fmt, MXFormat):
        return _pow2_block(fmt.block)
    if isinstance(fmt, NVFP4Format):
        return _pow2_block(fmt.block)
    if isinstance(fmt, IntFormat):
        # float32 inputs need a float64 quotient (see IntFormat); the kernel covers 16-bit inputs.
        return (
            x.dtype != torch.float32
            and fmt.scale_dtype != "fp32"
            and not fmt.per_tensor
            and fmt.group is not None
            and _pow2_block(fmt.group)
        )
    return False


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
    def _int_tile(x, amax, QMAX, SCALE_BF16, SCALE_MAX, AWAY):
        """Integer-group fake-quant (fp16/bf16 scales) of a tile."""
        quot = libdevice.div_rn(amax, QMAX * 1.0)
        if SCALE_BF16:
            s = quot.to(tl.bfloat16).to(tl.float32)
        else:
            s = quot.to(tl.float16).to(tl.float32)
        s = tl.minimum(s, SCALE_MAX)[:, :, None]
        safe = tl.where(s == 0.0, 1.0, s)
        q = tl.minimum(tl.maximum(_round(libdevice.div_rn(x, safe), AWAY), -QMAX * 1.0), QMAX * 1.0)
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
        QMAX: tl.constexpr = 7, SCALE_BF16: tl.constexpr = False, SCALE_MAX: tl.constexpr = 65504.0,
        TWO_LEVEL: tl.constexpr = False,
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
            q = _int_tile(x, amax, QMAX, SCALE_BF16, SCALE_MAX, AWAY)
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


def _format_args(fmt: Format) -> tuple[int, dict[str, object]]:
    """Block size and the kernel's constexpr arguments for ``fmt``."""
    away = fmt.rounding == "away"
    if isinstance(fmt, MXFormat):
        el = None if fmt.is_int else ELEMENTS[fmt.element]
        return fmt.block, {
            "KIND": 0, "AWAY": away, "IS_INT": fmt.is_int, "EMIN": el.emin if el else 0,
            "MBITS": el.mbits if el else 0, "MAXV": fmt.max_elem, "EMAX": fmt.emax_elem,
            "INT_STEP": 2.0 ** (fmt.element_bits - 2) if fmt.is_int else 1.0,
            "RULE": ("floor", "ceil", "rceil").index(fmt.scale_rule),
        }  # fmt: skip
    if isinstance(fmt, IntFormat):
        sdt = torch.bfloat16 if fmt.scale_dtype == "bf16" else torch.float16
        return fmt.group, {
            "KIND": 1, "AWAY": away, "QMAX": fmt.qmax, "SCALE_BF16": fmt.scale_dtype == "bf16",
            "SCALE_MAX": float(torch.finfo(sdt).max),
        }  # fmt: skip
    if isinstance(fmt, NVFP4Format):
        return fmt.block, {"KIND": 2, "AWAY": away, "TWO_LEVEL": fmt.two_level}
    raise TypeError(f"no kernel for {fmt}")


def fake_quant(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """``fmt.quantize(x)`` with a fused kernel; call only when :func:`supports` is true."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    out = torch.empty_like(x2)
    block, meta = _format_args(fmt)
    nb = max(1, min(COLS_PER_STEP // block, triton.next_power_of_2(triton.cdiv(k, block))))
    block_m = max(1, min(64, 4096 // (nb * block)))
    if isinstance(fmt, NVFP4Format) and fmt.two_level:
        g = true_div(tensor_absmax(x2), 448.0 * 6.0)
        g = torch.where(g == 0, torch.ones_like(g), g)
        gs = torch.stack([g, 1.0 / g])
    elif isinstance(fmt, NVFP4Format):
        gs = torch.ones(2, device=x.device, dtype=torch.float32)  # single level: g = 1
    else:
        gs = out  # not read
    grid = (triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, block), nb))
    _fq_kernel[grid](x2, out, gs, m, k, BLOCK=block, NB=nb, BLOCK_M=block_m, **meta)
    return out.reshape(x.shape)
