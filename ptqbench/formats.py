"""Number formats, emulated bit-exactly (quantize, then dequantize).

Every format is a frozen dataclass whose result-changing fields are explicit. ``quantize(x)``
returns a tensor of ``x``'s shape and dtype holding the values the real format represents;
``bits(shape)`` is the exact storage cost of a tensor of that shape, scales included.
Blocks and groups run along the last dimension (the reduction dimension of activations and of
``W[out, in]``); a ragged last block is zero-padded for the scale computation only.

Conventions (spec/formats.md): round to nearest with ties to even (or half away from zero),
saturation to +/- the largest normal, NaN stays NaN (it is ignored by the block's abs-max), an
all-zero block gives zeros. Arithmetic runs in float32 where that is exact and in float64 where
float32 could round (float32 inputs of integer formats, fp32 scales).

This module holds the numerics only; where they run (Triton, ``torch.compile``, eager) is
:mod:`ptqbench.kernels`' choice, steered by ``quantize(x, backend=...)`` or ``kernels.use_backend``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

import ptqbench.kernels as kernels
from ptqbench.errors import UserError
from ptqbench.kernels import Backend, KernelSpec, TensorFn
from ptqbench.registry import Registry

Rounding = Literal["even", "away"]
ScaleRule = Literal["floor", "ceil", "rceil"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- bit helpers


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for integer tensors ``e`` in [-149, 127], built from bits."""
    e = e.to(torch.int32)
    normal = ((e.clamp(-126, 127) + 127) << 23).view(torch.float32)
    # Subnormal powers: 2**e = 2**(e + 24) * 2**-24, both factors exact, product exact.
    sub = ((e.clamp(-149, -103) + 24 + 127) << 23).view(torch.float32) * 2.0**-24
    return torch.where(e >= -126, normal, sub)


def _exponent_bits(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased exponent and mantissa bits of non-negative float32 ``a`` (subnormals normalized)."""
    a = a.float()
    sub = a < 2.0**-126
    bits = torch.where(sub, a * 2.0**64, a).view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 - torch.where(sub, 64, 0)
    return exp.to(torch.int32), bits & 0x7FFFFF


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(a))`` for non-negative finite float tensors (int32); 0 maps to -150."""
    exp, _ = _exponent_bits(a)
    return torch.where(a == 0, -150, exp).to(torch.int32)


def ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(a))`` for non-negative finite float tensors (int32); 0 maps to -150."""
    exp, mant = _exponent_bits(a)
    return torch.where(a == 0, -150, exp + (mant != 0).to(torch.int32)).to(torch.int32)


def true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """IEEE ``a / b`` on every device (PyTorch's CUDA kernels multiply by ``1/b`` for Python scalars)."""
    return a / a.new_full((), b)  # a device tensor made by a fill kernel: no host copy, graph-capturable


def round_int(y: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """Round to an integer: ties to even, or half away from zero."""
    if rounding == "even":
        return torch.round(y)
    return torch.sign(y) * torch.floor(y.abs() + 0.5)


def nan_to_zero_abs(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` with NaN as 0 (Inf kept)."""
    return torch.nan_to_num(x.abs(), nan=0.0, posinf=float("inf"))


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """View ``x[..., n]`` as ``[..., ceil(n / block), block]``, zero-padding the last block."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], (n + pad) // block, block)


def from_blocks(xb: torch.Tensor, n: int) -> torch.Tensor:
    return xb.reshape(*xb.shape[:-2], -1)[..., :n]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _rows(shape: Sequence[int]) -> int:
    return _numel(shape[:-1]) if len(shape) > 1 else 1


# ----------------------------------------------------------------------------- elements


@dataclass(frozen=True)
class Minifloat:
    """An ExMy element with subnormals, saturating at ``max_normal`` (no Inf)."""

    ebits: int
    mbits: int
    bias: int
    max_normal: float

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share it)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal's binade."""
        return math.floor(math.log2(self.max_normal))

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    def round(self, y: torch.Tensor, rounding: Rounding = "even") -> torch.Tensor:
        """Nearest representable value of float32 ``y`` (saturating, NaN kept).

        Normal range: the float32 significand is rounded to ``mbits`` bits on its bit pattern (a
        carry moves into the exponent by itself). Below the smallest normal the quantum is fixed,
        ``2**(emin - mbits)``: adding and subtracting ``2**(emin - mbits + 23)`` rounds to it
        (float32 addition rounds to nearest even; ``away`` divides by the exact quantum instead).
        """
        a = y.abs()
        shift = 23 - self.mbits
        bits = a.view(torch.int32)
        if rounding == "even":
            bits = bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)
        else:
            bits = bits + (1 << (shift - 1))
        normal = (bits & ~((1 << shift) - 1)).view(torch.float32)
        quantum = 2.0 ** (self.emin - self.mbits)
        if rounding == "even":
            magic = quantum * 2.0**23
            sub = (a + magic) - magic
        else:
            sub = torch.floor(a / quantum + 0.5) * quantum
        q = torch.where(a < 2.0**self.emin, sub, normal).clamp(max=self.max_normal)
        q = torch.where(torch.isnan(y), y, q)
        return torch.copysign(q, y)

    def values(self) -> torch.Tensor:
        """Every non-negative representable value, ascending (for tests and docs)."""
        frac = [m / 2**self.mbits for m in range(2**self.mbits)]
        vals = {f * 2.0**self.emin for f in frac}
        vals |= {(1 + f) * 2.0**e for e in range(self.emin, self.emax + 1) for f in frac}
        return torch.tensor(sorted(v for v in vals if v <= self.max_normal), dtype=torch.float64)


E4M3 = Minifloat(4, 3, 7, 448.0)
E5M2 = Minifloat(5, 2, 15, 57344.0)
E3M2 = Minifloat(3, 2, 3, 28.0)
E2M3 = Minifloat(2, 3, 1, 7.5)
E2M1 = Minifloat(2, 1, 1, 6.0)
ELEMENTS = {"e4m3": E4M3, "e5m2": E5M2, "e3m2": E3M2, "e2m3": E2M3, "e2m1": E2M1}


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """Base class: a number format that fake-quantizes along the last dimension."""

    kind: ClassVar[str] = "format"

    @property
    def name(self) -> str:
        raise NotImplementedError

    def quantize(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        """Fake-quantize along the last dim on the path :func:`ptqbench.kernels.choose` picks for
        ``backend`` (``None``: the current one; by default a fused Triton kernel on CUDA where one
        exists, ``torch.compile`` of the reference for large CPU tensors of formats that compile
        exactly, else the torch reference). All paths give the same values (tested)."""
        path = self.backend_for(x, backend)
        if path == "triton":
            return kernels.fake_quant(x, _kernel_spec(self, x.dtype))
        if path == "compiled":
            compiled = kernels.compiled(self, x)
            if compiled is not None:
                return compiled(x)
        return self.reference(x)

    def backend_for(self, x: torch.Tensor, backend: Backend | None = None) -> kernels.Path:
        """The path ``quantize(x, backend)`` takes: ``"triton"``, ``"compiled"`` or ``"eager"``."""
        return kernels.choose(x, backend, _kernel_spec(self, x.dtype), self.compiles_exactly)

    def kernel_spec(self, dtype: torch.dtype) -> KernelSpec | None:
        """The fused kernel that computes this format bit-identically for inputs of ``dtype``, if any."""
        return None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch implementation (the definition the kernels are tested against)."""
        raise NotImplementedError

    @property
    def compiles_exactly(self) -> bool:
        """Whether ``torch.compile`` of :meth:`compile_target` keeps every value (inductor's CPU
        code may divide by a reciprocal, so only formats written for it qualify)."""
        return False

    def compile_target(self) -> TensorFn:
        """The function the CPU path compiles (the reference, or an equal variant that vectorizes)."""
        return self.reference

    def bits(self, shape: Sequence[int]) -> int:
        raise NotImplementedError

    @property
    def shift(self) -> float:
        """The constant ``c`` added before quantizing and subtracted after (0: none)."""
        return 0.0

    def unshifted(self) -> Format:
        """This format without its shift (itself when it has none)."""
        return self

    def with_shift(self, shift: float, unsigned: bool = True) -> Format:
        """The shifted variant ``Q(x + c) - c`` (``c = shift``), unsigned by default: only
        integer formats have one (deepcompressor shifts integer activations)."""
        raise UserError(f"format {self}: only integer formats can be shifted (got a {type(self).__name__})")

    def shift_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x + c`` in ``x``'s dtype (``c`` rounded to it first), what the shifted grid quantizes."""
        return x if self.shift == 0 else x + x.new_full((), self.shift)

    @property
    def is_16bit(self) -> bool:
        """True for the cast formats that leave 16-bit values as they are."""
        return False

    def bits_per_element(self, n: int = 4096) -> float:
        """Average bits per element along a row of ``n`` (scales included)."""
        return self.bits((1, n)) / n

    def to_dict(self) -> dict[str, Any]:
        """Every field, for logging; ``get_format(**d)`` rebuilds the format."""
        return {"name": self.name, "type": type(self).__name__, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        return spec_string(self)


@dataclass(frozen=True)
class CastFormat(Format):
    """A cast round-trip (fp16, bf16, fp32): the 'not quantized' format."""

    dtype: Literal["fp16", "bf16", "fp32"] = "bf16"

    @property
    def name(self) -> str:
        return self.dtype

    @property
    def is_16bit(self) -> bool:
        return self.dtype != "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def quantize(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        target = _DTYPES[self.dtype]
        return x if x.dtype == target else x.to(target).to(x.dtype)

    def bits(self, shape: Sequence[int]) -> int:
        return torch.finfo(_DTYPES[self.dtype]).bits * _numel(shape)


@dataclass(frozen=True)
class IntFormat(Format):
    """b-bit integers with one scale per group, row (channel/token) or tensor, no zero point.

    Signed (symmetric): codes in ``[-qmax, qmax]``, ``qmax = 2**(b-1) - 1``. Unsigned: codes in
    ``[0, qmax]``, ``qmax = 2**b - 1`` (deepcompressor's ``uint``: the same abs-max scale, negative
    values clamp to 0). ``s = scale_dtype(amax / qmax)`` with ``amax = max |x|`` and the quotient
    computed in float32 (as deployed code does), ``q = clamp(round(x / s), qmin, qmax)``, value
    ``q * s``. A scale that overflows its dtype saturates at the dtype's max; a zero scale gives
    zeros. ``shift = c`` quantizes ``x + c`` and subtracts ``c`` again, each step in ``x``'s dtype
    (``c`` rounded to it): deepcompressor's shifted activations (the ``-c`` is its folded bias).
    """

    bits_: int = 4
    group: int | None = 64
    per_tensor: bool = False
    scale_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    rounding: Rounding = "even"
    unsigned: bool = False
    shift: float = 0.0  # type: ignore[assignment]  # a field here, a property on Format

    def __post_init__(self) -> None:
        if not 2 <= self.bits_ <= 16:
            raise UserError(f"integer format: bits must be in 2..16, got {self.bits_}")
        if self.group is not None and self.group < 1:
            raise UserError(f"integer format: group must be >= 1, got {self.group}")
        if self.per_tensor and self.group is not None:
            raise UserError("integer format: per_tensor excludes group")
        _check_choice("scale_dtype", self.scale_dtype, _DTYPES)
        _check_choice("rounding", self.rounding, ("even", "away"))
        _check_choice("unsigned", self.unsigned, (False, True))
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not math.isfinite(self.shift):
            raise UserError(f"integer format: shift must be a finite number, got {self.shift!r}")
        object.__setattr__(self, "shift", float(self.shift))

    @property
    def qmax(self) -> int:
        return 2**self.bits_ - 1 if self.unsigned else 2 ** (self.bits_ - 1) - 1

    @property
    def qmin(self) -> int:
        return 0 if self.unsigned else -self.qmax

    @property
    def name(self) -> str:
        base = f"{'u' if self.unsigned else ''}int{self.bits_}"
        if self.per_tensor:
            return f"{base}_pt"
        return f"{base}_pc" if self.group is None else f"{base}_g{self.group}"

    def unshifted(self) -> IntFormat:
        return dataclasses.replace(self, shift=0.0) if self.shift else self

    def with_shift(self, shift: float, unsigned: bool = True) -> IntFormat:
        return dataclasses.replace(self, shift=shift, unsigned=unsigned)

    def _unshift(self, y: torch.Tensor) -> torch.Tensor:
        return y - y.new_full((), self.shift)

    def quantize(self, x: torch.Tensor, backend: Backend | None = None) -> torch.Tensor:
        if self.shift:
            return self._unshift(self.unshifted().quantize(self.shift_input(x), backend))
        return super().quantize(x, backend)

    def backend_for(self, x: torch.Tensor, backend: Backend | None = None) -> kernels.Path:
        return super().backend_for(x, backend) if not self.shift else self.unshifted().backend_for(x, backend)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift:
            return self._unshift(self.unshifted().reference(self.shift_input(x)))
        n = x.shape[-1]
        exact = torch.float64 if (x.dtype == torch.float32 or self.scale_dtype == "fp32") else torch.float32
        if self.per_tensor:
            xb = x.reshape(1, 1, -1)
        elif self.group is None:
            xb = x.unsqueeze(-2)
        else:
            xb = to_blocks(x, self.group)
        amax = nan_to_zero_abs(xb).amax(-1, keepdim=True).float()
        sdt = _DTYPES[self.scale_dtype]
        # float64 then float32 equals float32 IEEE division here (amax has 24 bits), however the
        # float64 quotient is computed (compiled code may multiply by a reciprocal)
        scale = (amax.double() / self.qmax).float().to(sdt).clamp(max=torch.finfo(sdt).max).to(exact)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        xe = xb.to(exact)
        y = xe / safe
        # Only an exact tie (x = (k + 1/2) s) sits close enough to a rounding boundary for a
        # division by a reciprocal to move it; detect it exactly (the product is exact) and round it.
        half = torch.round(y * 2) * 0.5
        y = torch.where((half * safe == xe) & (half != torch.round(half)), half, y)
        q = round_int(y, self.rounding).clamp(self.qmin, self.qmax)
        out = (q * scale).to(x.dtype)
        if self.per_tensor:
            return out.reshape(x.shape)
        return out.squeeze(-2) if self.group is None else from_blocks(out, n)

    @property
    def compiles_exactly(self) -> bool:
        return True  # divisions are exact or tie-corrected (see reference)

    def kernel_spec(self, dtype: torch.dtype) -> KernelSpec | None:
        # float32 inputs need a float64 quotient (see reference); the kernel covers 16-bit inputs.
        if dtype == torch.float32 or self.scale_dtype == "fp32" or self.per_tensor or self.shift:
            return None
        if not kernels.fits_block(self.group):
            return None
        sdt = _DTYPES[self.scale_dtype]
        meta = {
            "KIND": 1, "AWAY": self.rounding == "away", "QMIN": self.qmin, "QMAX": self.qmax,
            "SCALE_BF16": self.scale_dtype == "bf16", "SCALE_MAX": float(torch.finfo(sdt).max),
        }  # fmt: skip
        return KernelSpec(int(self.group), tuple(meta.items()))  # type: ignore[arg-type]

    def n_scales(self, shape: Sequence[int]) -> int:
        if self.per_tensor:
            return 1
        groups = 1 if self.group is None else math.ceil(int(shape[-1]) / self.group)
        return _rows(shape) * groups

    def bits(self, shape: Sequence[int]) -> int:
        """Codes and scales; the shift is a constant of the activation function, not stored per tensor."""
        scale_bits = torch.finfo(_DTYPES[self.scale_dtype]).bits
        return self.bits_ * _numel(shape) + scale_bits * self.n_scales(shape)


@dataclass(frozen=True)
class MXFormat(Format):
    """OCP microscaling: blocks of ``block`` elements sharing one E8M0 scale ``2**e``.

    ``e = floor(log2(amax)) - emax_elem`` (rule ``floor``, the OCP spec), or
    ``ceil(log2(amax)) - emax_elem`` (``ceil``), or ``ceil(log2(amax / max_elem))``
    (``rceil``: amax never saturates), clamped to [-127, 127]. Elements are ``x / 2**e`` rounded
    to the element (a minifloat, or for MXINT ``k / 2**(b-2)`` with ``|k| <= 2**(b-1)-1``).
    """

    element: str = "e2m1"
    block: int = 32
    scale_rule: ScaleRule = "floor"
    rounding: Rounding = "even"

    def __post_init__(self) -> None:
        if not (self.element in ELEMENTS or re.fullmatch(r"int[2-8]", self.element)):
            raise UserError(
                f"mx format: unknown element {self.element!r} (valid: {', '.join(ELEMENTS)}, int2..int8)"
            )
        if self.block < 1:
            raise UserError(f"mx format: block must be >= 1, got {self.block}")
        _check_choice("scale_rule", self.scale_rule, ("floor", "ceil", "rceil"))
        _check_choice("rounding", self.rounding, ("even", "away"))

    @property
    def is_int(self) -> bool:
        return self.element.startswith("int")

    @property
    def compiles_exactly(self) -> bool:
        return self.scale_rule != "rceil"  # rceil divides amax by the element's max

    @property
    def element_bits(self) -> int:
        return int(self.element[3:]) if self.is_int else ELEMENTS[self.element].bits

    @property
    def emax_elem(self) -> int:
        return 0 if self.is_int else ELEMENTS[self.element].emax

    @property
    def max_elem(self) -> float:
        if self.is_int:
            b = self.element_bits
            return (2 ** (b - 1) - 1) / 2 ** (b - 2)
        return ELEMENTS[self.element].max_normal

    @property
    def name(self) -> str:
        base = {
            "e2m1": "mxfp4",
            "e2m3": "mxfp6_e2m3",
            "e3m2": "mxfp6_e3m2",
            "e4m3": "mxfp8_e4m3",
            "e5m2": "mxfp8_e5m2",
        }.get(self.element, f"mx{self.element}")
        return base if self.block == 32 else f"{base}_b{self.block}"

    def shared_exponent(self, amax: torch.Tensor) -> torch.Tensor:
        """The block exponent ``e`` (int32) for float32 block abs-maxima."""
        if self.scale_rule == "floor":
            e = floor_log2(amax) - self.emax_elem
        elif self.scale_rule == "ceil":
            e = ceil_log2(amax) - self.emax_elem
        else:
            e = ceil_log2(true_div(amax, self.max_elem))
        return e.clamp(-127, 127)

    def round_element(self, y: torch.Tensor) -> torch.Tensor:
        if self.is_int:
            step = 2.0 ** (self.element_bits - 2)
            return round_int(y * step, self.rounding).clamp(-self.max_elem * step, self.max_elem * step) / step
        return ELEMENTS[self.element].round(y, self.rounding)

    def reference(self, x: torch.Tensor, exp2: TensorFn = pow2) -> torch.Tensor:
        xb = to_blocks(x, self.block).float()
        amax = nan_to_zero_abs(xb).amax(-1, keepdim=True)
        scale = exp2(self.shared_exponent(amax))
        out = self.round_element(xb / scale) * scale
        return from_blocks(out, x.shape[-1]).to(x.dtype)

    def compile_target(self) -> TensorFn:
        # torch.exp2 vectorizes where the bit-built pow2 does not (about 6x); exact for integer
        # exponents, which the compiled path checks once before it is used
        return functools.partial(self.reference, exp2=lambda e: torch.exp2(e.float()))

    def kernel_spec(self, dtype: torch.dtype) -> KernelSpec | None:
        if not kernels.fits_block(self.block):
            return None
        el = None if self.is_int else ELEMENTS[self.element]
        meta = {
            "KIND": 0, "AWAY": self.rounding == "away", "IS_INT": self.is_int, "EMIN": el.emin if el else 0,
            "MBITS": el.mbits if el else 0, "MAXV": self.max_elem, "EMAX": self.emax_elem,
            "INT_STEP": 2.0 ** (self.element_bits - 2) if self.is_int else 1.0,
            "RULE": ("floor", "ceil", "rceil").index(self.scale_rule),
        }  # fmt: skip
        return KernelSpec(self.block, tuple(meta.items()))

    def bits(self, shape: Sequence[int]) -> int:
        return self.element_bits * _numel(shape) + 8 * _rows(shape) * math.ceil(int(shape[-1]) / self.block)


@dataclass(frozen=True)
class NVFP4Format(Format):
    """NVFP4: E2M1 elements, blocks of 16 with an E4M3 scale, and (two-level) an fp32
    per-tensor scale ``g = amax_tensor / (6 * 448)``.

    Numerics follow torchao's ``nvfp4_quantize`` (ModelOpt's and NeMo's layout):
    ``s_b = e4m3(clamp(amax_block / 6 / g, 2**-6, 448))`` (block scales below E4M3's smallest
    normal are raised to it, not flushed), elements ``e2m1(x * ((1 / g) / s_b))``, value
    ``q * (g * s_b)`` in float32. Single-level: ``g = 1``. A zero tensor gives zeros.
    """

    block: int = 16
    two_level: bool = True
    rounding: Rounding = "even"

    def __post_init__(self) -> None:
        if self.block < 1:
            raise UserError(f"nvfp4 format: block must be >= 1, got {self.block}")
        _check_choice("rounding", self.rounding, ("even", "away"))

    @property
    def name(self) -> str:
        base = "nvfp4" if self.two_level else "nvfp4_1l"
        return base if self.block == 16 else f"{base}_b{self.block}"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xb = to_blocks(x, self.block).float()
        absb = nan_to_zero_abs(xb)
        block_amax = absb.amax(-1, keepdim=True)
        if self.two_level:
            g = true_div(absb.amax(), 448.0 * 6.0)
            g = torch.where(g == 0, torch.ones_like(g), g)  # a zero tensor: any g gives zeros
        else:
            g = torch.ones((), dtype=torch.float32, device=x.device)
        s_b = (true_div(block_amax, 6.0) / g).clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn).float()
        if self.two_level:
            y = xb * ((1.0 / g) / s_b)
        else:
            y = xb * (1.0 / s_b)
        q = E2M1.round(y, self.rounding)
        out = q * (g * s_b) if self.two_level else q * s_b
        return from_blocks(out, x.shape[-1]).to(x.dtype)

    def kernel_spec(self, dtype: torch.dtype) -> KernelSpec | None:
        if not kernels.fits_block(self.block):
            return None
        meta = {"KIND": 2, "AWAY": self.rounding == "away", "TWO_LEVEL": self.two_level}
        if self.two_level:
            return KernelSpec(self.block, tuple(meta.items()), "absmax", 448.0 * 6.0)
        return KernelSpec(self.block, tuple(meta.items()), "unit")

    def bits(self, shape: Sequence[int]) -> int:
        n_scales = _rows(shape) * math.ceil(int(shape[-1]) / self.block)
        return 4 * _numel(shape) + 8 * n_scales + (32 if self.two_level else 0)


@functools.cache
def _kernel_spec(fmt: Format, dtype: torch.dtype) -> KernelSpec | None:
    return fmt.kernel_spec(dtype)


def _check_choice(field: str, value: Any, valid: Any) -> None:
    if value not in valid:
        raise UserError(f"format field {field}: {value!r} is not valid (valid: {', '.join(map(str, valid))})")


# ----------------------------------------------------------------------------- names

FORMATS: Registry[Format] = Registry("format")
for _fmt in (
    CastFormat("fp16"),
    CastFormat("bf16"),
    CastFormat("fp32"),
    IntFormat(4, 64),
    IntFormat(4, 128),
    IntFormat(8, 64),
    IntFormat(4, None),
    IntFormat(8, None),
    IntFormat(8, None, per_tensor=True),
    IntFormat(4, 64, unsigned=True),
    IntFormat(8, None, unsigned=True),
    MXFormat("e2m1"),
    MXFormat("e2m3"),
    MXFormat("e3m2"),
    MXFormat("e4m3"),
    MXFormat("e5m2"),
    MXFormat("int8"),
    MXFormat("int4"),
    NVFP4Format(),
    NVFP4Format(two_level=False),
):
    FORMATS.register(_fmt.name, _fmt)

_PATTERNS: list[tuple[str, Any]] = [
    (r"(u?)int(\d+)_g(\d+)", lambda m: IntFormat(int(m[2]), int(m[3]), unsigned=bool(m[1]))),
    (r"(u?)int(\d+)_pc", lambda m: IntFormat(int(m[2]), None, unsigned=bool(m[1]))),
    (r"(u?)int(\d+)_pt", lambda m: IntFormat(int(m[2]), None, per_tensor=True, unsigned=bool(m[1]))),
    (r"mxint([2-8])(?:_b(\d+))?", lambda m: MXFormat(f"int{m[1]}", int(m[2] or 32))),
    (
        r"(mxfp4|mxfp6_e2m3|mxfp6_e3m2|mxfp8_e4m3|mxfp8_e5m2)_b(\d+)",
        lambda m: dataclasses.replace(FORMATS.get(m[1]), block=int(m[2])),
    ),
    (r"(nvfp4|nvfp4_1l)_b(\d+)", lambda m: dataclasses.replace(FORMATS.get(m[1]), block=int(m[2]))),
]
PATTERN_HELP = "[u]int{b}_g{g}, [u]int{b}_pc, [u]int{b}_pt, mxint{b}, <mx or nvfp4 name>_b{block}"
_FIELD_ALIASES = {"bits": "bits_"}


def _from_name(name: str) -> Format:
    if name in FORMATS:
        return FORMATS.get(name)
    for pattern, build in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            return build(m)
    raise UserError(str(FORMATS.unknown(name)) + f"; patterns: {PATTERN_HELP}")


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def get_format(spec: str | Format | dict[str, Any], **overrides: Any) -> Format:
    """A format from a name (``"mxfp4"``, ``"int4_g64"``), a spec string with field
    overrides (``"int4_g64:scale_dtype=bf16,rounding=away"``), a dict from ``to_dict()``
    or YAML (``{name: mxfp4, scale_rule: rceil}``), or a Format; keyword overrides apply last.
    """
    if isinstance(spec, Format):
        fmt = spec
    elif isinstance(spec, dict):
        fields = dict(spec)
        fields.pop("type", None)
        name = fields.pop("name", None)
        if name is None:
            raise UserError(f"format {spec!r}: missing field 'name'")
        return get_format(str(name), **{**fields, **overrides})
    else:
        name, _, rest = str(spec).partition(":")
        fmt = _from_name(name.strip())
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"format {spec!r}: expected key=value, got {item!r}")
            overrides = {key.strip(): _coerce(value.strip()), **overrides}
    if overrides:
        valid = {f.name for f in dataclasses.fields(fmt)}
        fields = {_FIELD_ALIASES.get(k, k): v for k, v in overrides.items()}
        bad = sorted(set(fields) - valid)
        if bad:
            shown = sorted(k for k in valid) if valid else ["(none)"]
            raise UserError(f"format {fmt.name}: unknown field(s) {', '.join(bad)} (valid: {', '.join(shown)})")
        fmt = dataclasses.replace(fmt, **fields)
    return fmt


def spec_string(fmt: Format) -> str:
    """A string that ``get_format`` turns back into ``fmt``: its name plus non-default fields."""
    base = _from_name(fmt.name)
    diffs = [
        f"{f.name.rstrip('_')}={getattr(fmt, f.name)}"
        for f in dataclasses.fields(fmt)
        if type(base) is type(fmt) and getattr(fmt, f.name) != getattr(base, f.name)
    ]
    return fmt.name + (":" + ",".join(diffs) if diffs else "")


def list_formats() -> list[tuple[str, str]]:
    """(name, description) for every named format, then the name patterns."""
    rows = []
    for name, fmt in FORMATS.items():
        rows.append((name, f"{type(fmt).__name__} {fmt.bits_per_element(4096):.4g} bits/element at n=4096"))
    rows.append(("int{b}_g{g}", "any integer width 2..16 with groups of g (e.g. int6_g32)"))
    rows.append(("uint{b}_g{g}", "unsigned integers [0, 2^b - 1], same names (add :shift=c to shift)"))
    rows.append(("mxint{b}", "MX integer elements of b bits, 2..8"))
    return rows


def can_shift(fmt: Format) -> bool:
    """Whether shifting changes ``fmt``'s quantization: integer formats (16-bit casts quantize nothing)."""
    return isinstance(fmt, IntFormat)
