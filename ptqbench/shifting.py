"""Per-layer activation formats for shifted activations (deepcompressor's ``shift_activations``).

deepcompressor (``app/diffusion/nn/patch.py::shift_input_activations``) shifts the input of every
layer that reads an activation function's output with a negative lower bound ``m`` (the FFN
down-projection after a GELU, and ResNet convolutions): ``u = x + c`` with ``c = -m``, the ``-c``
folded into the bias, and with ``allow_unsigned`` the layer's input quantizer becomes unsigned
(``sint4`` -> ``uint4``). Layers whose bound is ``>= 0`` (ReLU), ``None`` (GLU variants) or that do
not follow an activation are left as they are. The decision is structural (which module precedes
the layer), made once per layer before calibration, never from the calibration data's sign.

This module makes that decision for ptqbench from a model adapter's rule ``floors``
(``{glob on the module name: lower bound}``) and computes lower bounds exactly.

A method with ``shift_activations`` (:class:`~ptqbench.method.Method`) runs through
:func:`shifted_formats` and :func:`quantize_shifted` (called by
:func:`~ptqbench.patching.quantize_model`): each shifted layer is quantized by the method with the
unsigned, unshifted format on the statistics of ``x + c`` (:meth:`LayerStats.shifted`), then
turned into the native shifted layer (:meth:`QuantLinear.shift_inputs`). The shift is
``-bound`` with ``shift_bounds="deepcompressor"`` (the default: its rounded bounds,
:data:`DEEPCOMPRESSOR_LOWER_BOUNDS`, 0.171875 for GELU, for parity) or ``"exact"`` (the exact
minimum the adapter gives, rounded up to the layer's dtype).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import CastFormat, Format, can_shift
from ptqbench.layers import QuantLinear, dense_weight
from ptqbench.method import SHIFT_BOUNDS

if TYPE_CHECKING:
    from ptqbench.method import Method
    from ptqbench.stats import LayerStats

ActivationFn = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, ActivationFn] = {
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
}

# deepcompressor's bounds (nn/struct/attn.py, FeedForwardConfigStruct.infer_lowerbound): multiples
# of 2**-7 (2**-8 for mish) below the true minimum for GELU and Mish; for SiLU the value is
# *above* the true minimum (-0.27846), so inputs in (-0.27846, -0.27344) still clamp at 0.
# The native SVDQuant shift for GELU (exact or tanh) inputs is 0.171875.
DEEPCOMPRESSOR_LOWER_BOUNDS: dict[str, float] = {
    "gelu": -0.171875,
    "gelu_tanh": -0.171875,
    "silu": -0.2734375,
    "mish": -0.31640625,
}


def _resolve(activation: str | ActivationFn) -> ActivationFn:
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise UserError(f"activation {activation!r} is unknown (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[activation]


def activation_minimum(activation: str | ActivationFn, lo: float = -20.0, hi: float = 0.0) -> tuple[float, float]:
    """``(x*, f(x*))``, the global minimum of ``f`` on ``[lo, hi]`` in float64: a grid of 20,001
    points brackets it, golden-section search narrows the bracket to float64 resolution. ``f(x*)``
    is exact to float64 rounding (the error in ``x*`` enters ``f`` only quadratically)."""
    f = _resolve(activation)

    def value(x: float) -> float:
        return float(f(torch.tensor(x, dtype=torch.float64)))

    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    i = int(torch.argmin(f(grid)))
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.numel() - 1)])
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = value(c), value(d)
    for _ in range(200):
        if b - a <= 4 * math.ulp(max(abs(a), abs(b))):
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = value(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = value(d)
    x = (a + b) / 2.0
    return x, value(x)


def lower_bound(activation: str | ActivationFn) -> float:
    """The exact (float64) minimum of an activation: GELU -0.1699712..., SiLU -0.2784645...
    (``-W(1/e)``), its tanh-approximate GELU and Mish likewise."""
    return activation_minimum(activation)[1]


def shift_for(bound: float, dtype: torch.dtype | None = None) -> float:
    """The shift ``c = -bound`` for a negative ``bound`` (0 otherwise); with ``dtype``, rounded up
    to the next value of that dtype so that ``x + c >= 0`` holds after rounding for every ``x >= bound``."""
    if bound >= 0:
        return 0.0
    if dtype is None:
        return -bound
    c = -bound
    rounded = float(torch.tensor(c, dtype=torch.float64).to(dtype))
    if rounded < c:  # one step up: the spacing of dtype's normals in rounded's binade
        rounded += math.ldexp(torch.finfo(dtype).eps, math.frexp(rounded)[1] - 1)
    return rounded


def layer_floor(name: str, floors: Mapping[str, float]) -> float | None:
    """The lower bound of ``name``'s input by the first-matching globs of ``floors`` (None: no match);
    two matching globs with different bounds are an error."""
    found = {bound for glob, bound in floors.items() if fnmatchcase(name, glob)}
    if len(found) > 1:
        raise UserError(f"layer {name}: activation floors disagree ({sorted(found)}); make the globs exclusive")
    return found.pop() if found else None


def layer_act_formats(
    act_format: Format,
    layer_names: Iterable[str],
    floors: Mapping[str, float],
    *,
    unsigned: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Format]:
    """The activation format of each layer under ``shift_activations``.

    A layer whose input follows an activation with a negative lower bound ``m`` (``floors``)
    gets ``act_format.with_shift(shift_for(m, dtype), unsigned)`` (unsigned: deepcompressor's
    ``allow_unsigned``); every other layer keeps ``act_format``. A cast format (bf16, fp16, fp32:
    nothing is quantized) stays as it is. Any other non-integer format with a shifted layer raises :class:`UserError`
    (deepcompressor ships shifting only with INT4; ptqbench has no unsigned minifloats): call
    :func:`can_shift` first when shifting is a default rather than a request.
    """
    out: dict[str, Format] = {}
    for name in layer_names:
        bound = layer_floor(name, floors)
        if bound is None or bound >= 0 or isinstance(act_format, CastFormat):
            out[name] = act_format
            continue
        if not can_shift(act_format):
            raise UserError(
                f"shift_activations needs an integer activation format, got {act_format} for layer {name} "
                "(deepcompressor shifts only with its INT4 config; ptqbench has no unsigned float formats)"
            )
        out[name] = act_format.with_shift(shift_for(bound, dtype), unsigned=unsigned)
    return out


# ---------------------------------------------------------------------- a method's shifted layers


@functools.cache
def _exact_minima() -> dict[str, float]:
    return {name: lower_bound(name) for name in DEEPCOMPRESSOR_LOWER_BOUNDS}


def deepcompressor_bound(bound: float) -> float | None:
    """deepcompressor's rounded bound for the activation whose exact minimum is ``bound``
    (GELU's or tanh-GELU's -0.1700... -> -0.171875), None when ``bound`` is no such minimum."""
    for name, exact in _exact_minima().items():
        if math.isclose(bound, exact, rel_tol=1e-9, abs_tol=1e-12) or bound == DEEPCOMPRESSOR_LOWER_BOUNDS[name]:
            return DEEPCOMPRESSOR_LOWER_BOUNDS[name]
    return None


def layer_shift(floor: float, rule: str, dtype: torch.dtype | None = None) -> tuple[float, str]:
    """``(c, source)``: the shift of a layer whose input is bounded below by ``floor`` (< 0) under
    ``rule`` (:data:`SHIFT_BOUNDS`), rounded up to ``dtype``, and which bound it negates
    (``deepcompressor`` or ``exact``; an activation deepcompressor does not know falls back to exact)."""
    if rule not in SHIFT_BOUNDS:
        raise UserError(f"shift_bounds {rule!r} is not valid (valid: {', '.join(SHIFT_BOUNDS)})")
    rounded = deepcompressor_bound(floor) if rule == "deepcompressor" else None
    if rounded is None:
        return shift_for(floor, dtype), "exact" if rule == "exact" else "exact (deepcompressor has no bound for it)"
    return shift_for(rounded, dtype), "deepcompressor"


def shifted_formats(
    method: Method, layers: Mapping[str, nn.Module], floors: Mapping[str, float]
) -> dict[str, tuple[Format, str]]:
    """Layer -> (its shifted unsigned activation format, the bound's source) for the ``layers``
    ``method`` shifts (:meth:`Method.shifts_input` of the layer's ``floors`` entry); others are absent."""
    out = {}
    for name, layer in layers.items():
        floor = floors.get(name)
        if method.shifts_input(floor):
            c, source = layer_shift(floor, method.shift_bounds, dense_weight(layer).dtype)
            out[name] = (method.act_format.with_shift(c, unsigned=True), source)
    return out


def quantize_shifted(
    method: Method,
    layers: Mapping[str, nn.Module],
    fmt: Format,
    stats: Mapping[str, LayerStats] | None = None,
    progress: Callable[[str], None] | None = None,
    sources: Mapping[str, str] | None = None,
) -> dict[str, QuantLinear]:
    """Quantize ``layers`` (all shifted by ``fmt.shift``) as deepcompressor does: ``method`` with the
    unsigned unshifted format on the statistics of ``x + c``, then :meth:`QuantLinear.shift_inputs`
    (``b - c W 1``, ``W`` the original weight). ``q.info`` records the shift, the format and ``sources``."""
    inner = dataclasses.replace(method, act_format=fmt.unshifted())
    moved = None if stats is None else {n: stats[n].shifted(fmt.shift) for n in layers if n in stats}
    out = inner.quantize_layers(layers, moved, progress)
    for name, q in out.items():
        q.shift_inputs(fmt, dense_weight(layers[name]).detach())
        q.info.update({
            "act_shift": fmt.shift,
            "act_shift_format": str(fmt.unshifted()),
            "act_shift_bound": (sources or {}).get(name, method.shift_bounds),
        })
    return out
