"""Shifted activations: exact lower bounds, the per-layer choice, and deepcompressor's ShiftedLinear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import IntFormat, can_shift, get_format
from ptqbench.layers import QuantLinear
from ptqbench.shifting import (
    DEEPCOMPRESSOR_LOWER_BOUNDS,
    activation_minimum,
    layer_act_formats,
    layer_floor,
    lower_bound,
    shift_for,
)

GELU_SHIFT = 0.171875  # deepcompressor's -lowerbound for GELU inputs


# ------------------------------------------------------------------ lower bounds, derived by hand


def _lambert_w(z: float) -> float:
    w = 0.5
    for _ in range(50):  # Newton on w e^w = z
        w -= (w * math.exp(w) - z) / (math.exp(w) * (1 + w))
    return w


def test_silu_minimum_is_minus_lambert_w_of_one_over_e() -> None:
    # SiLU' = 0 <=> 1 + x + e^x = 0 <=> x = -1 - W(1/e), and there f = x + 1 = -W(1/e)
    w = _lambert_w(math.exp(-1))
    x, f = activation_minimum("silu")
    assert f == pytest.approx(-w, abs=1e-15) and f == pytest.approx(-0.27846454276107, abs=1e-13)
    assert x == pytest.approx(-1 - w, abs=1e-7)  # x enters f only quadratically
    assert lower_bound("silu") == f


def test_gelu_minimum_satisfies_its_stationarity_equation() -> None:
    # GELU = x Phi(x); GELU' = Phi(x) + x phi(x) = 0, so at the minimum f = -x^2 phi(x)
    def phi(x: float) -> float:
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cdf(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    lo, hi = -1.0, -0.5  # bisection on GELU' (negative left of the minimum)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) + mid * phi(mid) < 0 else (lo, mid)
    x, f = activation_minimum("gelu")
    assert x == pytest.approx(lo, abs=1e-7) and x == pytest.approx(-0.7518, abs=1e-4)
    assert f == pytest.approx(-lo * lo * phi(lo), abs=1e-15) and f == pytest.approx(-0.16997, abs=1e-5)


def test_tanh_gelu_and_mish_minima() -> None:
    def tanh_gelu(x: float) -> float:
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x, f = activation_minimum("gelu_tanh")
    assert f == pytest.approx(tanh_gelu(x), abs=1e-16)
    k, u = math.sqrt(2 / math.pi), math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    slope = 0.5 * (1 + math.tanh(u)) + 0.5 * x * (1 - math.tanh(u) ** 2) * k * (1 + 3 * 0.044715 * x * x)
    assert abs(slope) < 1e-7  # stationary (x is found to ~1e-8)
    assert tanh_gelu(x) <= min(tanh_gelu(x + 1e-4), tanh_gelu(x - 1e-4))
    assert -0.171875 < f < lower_bound("gelu")  # the approximation dips a little deeper; 0.171875 covers it
    mx, mf = activation_minimum("mish")
    assert mf == pytest.approx(mx * math.tanh(math.log1p(math.exp(mx))), abs=1e-16)
    assert mf == pytest.approx(-0.30884, abs=1e-5)
    # deepcompressor's SiLU bound is above the true minimum: shifted SiLU outputs can clamp at 0
    assert DEEPCOMPRESSOR_LOWER_BOUNDS["silu"] > lower_bound("silu")
    assert DEEPCOMPRESSOR_LOWER_BOUNDS["gelu"] < lower_bound("gelu_tanh") < 0


def test_shift_for_rounds_up_to_the_dtype() -> None:
    m = lower_bound("gelu")
    assert shift_for(m) == -m and shift_for(0.0) == 0.0 and shift_for(0.3) == 0.0
    assert shift_for(m, torch.bfloat16) == 0.1708984375  # bf16 rounds -m down to 0.169921875
    assert shift_for(m, torch.float16) == 0.1700439453125
    assert shift_for(-GELU_SHIFT, torch.bfloat16) == GELU_SHIFT  # representable: kept
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        c = shift_for(m, dtype)
        x = torch.linspace(m, 0.5, 4001, dtype=torch.float64).to(dtype)
        x = x[x.double() >= m]
        assert bool(((x + torch.tensor(c, dtype=dtype)) >= 0).all()), dtype


# ------------------------------------------------------------------ per-layer choice

NAMES = [
    "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.ff.net.2",
]
FLOORS = {"*.ff.net.2": -GELU_SHIFT}


def test_layer_act_formats_shift_only_the_layers_after_the_activation() -> None:
    chosen = layer_act_formats(get_format("int4_g64"), NAMES, FLOORS)
    shifted = get_format(f"uint4_g64:shift={GELU_SHIFT}")
    assert chosen == {
        NAMES[0]: get_format("int4_g64"),
        NAMES[1]: get_format("int4_g64"),
        NAMES[2]: shifted,
        NAMES[3]: shifted,
    }
    signed = layer_act_formats(get_format("int8_pc"), NAMES, FLOORS, unsigned=False)
    assert signed[NAMES[2]] == IntFormat(8, None, shift=GELU_SHIFT) and signed[NAMES[0]] == get_format("int8_pc")
    exact = layer_act_formats(get_format("int4_g64"), NAMES, {"*.ff.net.2": lower_bound("gelu")}, dtype=torch.bfloat16)
    assert exact[NAMES[2]].shift == 0.1708984375


def test_layer_act_formats_leave_what_deepcompressor_leaves() -> None:
    for fmt in ("bf16", "fp16", "fp32"):  # nothing quantized: nothing to shift
        assert set(layer_act_formats(get_format(fmt), NAMES, FLOORS).values()) == {get_format(fmt)}
    relu = layer_act_formats(get_format("int4_g64"), NAMES, {"*.ff.net.2": 0.0})  # bound >= 0: no shift
    assert set(relu.values()) == {get_format("int4_g64")}
    assert set(layer_act_formats(get_format("mxfp4"), NAMES[:2], FLOORS).values()) == {get_format("mxfp4")}
    with pytest.raises(UserError, match="needs an integer activation format"):
        layer_act_formats(get_format("mxfp4"), NAMES, FLOORS)
    assert can_shift(get_format("int4_g64")) and not can_shift(get_format("nvfp4"))
    with pytest.raises(UserError, match="disagree"):
        layer_floor(NAMES[2], {"*.ff.net.2": -0.17, "transformer_blocks.0.*": -0.27})
    assert layer_floor(NAMES[2], {"*.ff.net.2": -0.17, "*.net.2": -0.17}) == -0.17


# ------------------------------------------------------------------ deepcompressor's ShiftedLinear


def shifted_linear_reference(layer: nn.Linear, shift: float, act: IntFormat, weight_q: torch.Tensor) -> nn.Module:
    """deepcompressor's ``ShiftedLinear.from_linear`` re-derived (nn/patch/linear.py): a buffer
    ``shift`` in the weight's dtype, bias ``b - (W 1) c`` in float64 cast back, forward
    ``linear(x + shift)`` with the input quantizer on the inner linear's (shifted) input."""
    dtype = layer.weight.dtype
    c = torch.tensor(shift, dtype=dtype)
    bias = (layer.bias.double() - layer.weight.double().sum(dim=1) * c.double()).to(dtype)

    class Shifted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(act.reference(x + c), weight_q, bias)

    return Shifted()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantized", [False, True], ids=["w16", "w_int4"])
def test_quant_linear_runs_deepcompressors_shifted_linear(dtype: torch.dtype, quantized: bool) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 48).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 256, generator=g) * 0.05)
        layer.bias.copy_(torch.randn(48, generator=g))
    x = F.gelu(torch.randn(64, 256, generator=g) * 3).to(dtype)
    x[:, 5] *= 40.0  # an outlier channel
    act = get_format(f"uint4_g64:shift={GELU_SHIFT}")
    weight_format = "int4_g64" if quantized else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    q = QuantLinear.from_layer(layer, weight_format, act)
    ref = shifted_linear_reference(layer, GELU_SHIFT, act.unshifted(), q.weight)
    assert torch.equal(q(x), ref(x))  # bit-identical: the same operations
    # The format's own value, Q_u(x + c) - c, through the same (quantized) weight: equal up to the
    # float rounding of the two orders, plus c (W - Q(W)) 1 (deepcompressor compensates with W).
    a, w, b = act.quantize(x).double(), q.weight.double(), layer.bias.detach().double()
    emulated = F.linear(a, w, b)
    drift = GELU_SHIFT * (layer.weight.detach().double() - w).sum(dim=1)
    # rounding of the products, sums and stored values: a few ulps of dtype on the magnitudes involved
    ulps = 8 * torch.finfo(dtype).eps * (a.abs() @ w.abs().T + b.abs() + GELU_SHIFT * w.abs().sum(1))
    assert bool(((q(x).double() - (emulated - drift)).abs() <= ulps).all())
    if not quantized:
        assert float(drift.abs().max()) == 0.0  # an unquantized weight: the two computations agree
    elif dtype == torch.float32:
        assert float(drift.abs().max()) > float(ulps.max())  # ... a quantized one: only up to c (W - Q(W)) 1


def test_shift_comes_before_smoothing_and_adds_a_bias() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g) * 0.1
    layer = nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    s = torch.rand(128, generator=g) + 0.5
    act = get_format(f"uint4_g64:shift={GELU_SHIFT}")
    q = QuantLinear.from_layer(layer, "int4_g64", act, weight=w * s, smooth=s)
    x = F.gelu(torch.randn(32, 128, generator=g) * 2)
    u = (x + GELU_SHIFT) / s  # deepcompressor: ActivationSmoother on the inner (shifted) linear
    want = F.linear(act.unshifted().quantize(u), q.weight) - GELU_SHIFT * w.double().sum(1).float()
    torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5)
    unshifted = QuantLinear.from_layer(layer, "int4_g64", "uint4_g64", weight=w * s, smooth=s)
    assert q.bits() == unshifted.bits() + 16 * 16  # the folded compensation is a stored bias
    assert "acts=uint4_g64:shift=0.171875" in repr(q)


def test_shift_inputs_turns_a_layer_calibrated_on_shifted_inputs_into_the_native_one() -> None:
    """A method run on ``x + c`` with the unsigned format, then ``shift_inputs``: the same layer as
    building it with the shifted format (methods need not know about the shift)."""
    g = torch.Generator().manual_seed(2)
    layer = nn.Linear(128, 16)
    s = torch.rand(128, generator=g) + 0.5
    w = layer.weight.detach()
    act = get_format(f"uint4_g64:shift={GELU_SHIFT}")
    direct = QuantLinear.from_layer(layer, "int4_g64", act, weight=w * s, smooth=s)
    calibrated = QuantLinear.from_layer(layer, "int4_g64", act.unshifted(), weight=w * s, smooth=s)
    assert calibrated.shift_inputs(act, w) is calibrated
    x = F.gelu(torch.randn(8, 128, generator=g))
    assert torch.equal(calibrated(x), direct(x)) and torch.equal(calibrated.bias, direct.bias)
    with pytest.raises(UserError, match="not a shifted variant"):
        calibrated.shift_inputs(get_format("int4_g64:shift=0.5"), w)
