"""shift_activations wired end to end: shifted statistics, quantize_model's shifted layers, their bits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.layers import QuantLinear
from ptqbench.memory import model_bits
from ptqbench.method import get_method
from ptqbench.models.adapters import GELU_TANH_MIN
from ptqbench.patching import quantize_model, restore_model, select_layers
from ptqbench.shifting import deepcompressor_bound, layer_shift, shift_for
from ptqbench.stats import ALL_ROWS, LayerStats, StatsSpec, collect_stats

pytestmark = pytest.mark.usefixtures("one_thread")

GELU_SHIFT = 0.171875  # deepcompressor's -lowerbound for GELU inputs
D, H = 64, 128
FAST_SVDQ = {"rank": 4, "num_grids": 2, "num_iters": 2, "rows": "all"}


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager quantizers: torch.compile's first calls would cost more than these small tests."""
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")


# ------------------------------------------------------------------ a PixArt-shaped toy transformer


class AddShift(nn.Module):
    """Adds ``c`` (in the input's dtype): what a shifted layer reads, for collecting on ``x + c``."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


class GELUProj(nn.Module):  # diffusers' GELU(approximate="tanh"): net.0
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(GELUProj(), nn.Identity(), nn.Linear(H, D, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.ff = FeedForward(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h + self.ff(h)


class PixArtTransformer2DModel(nn.Module):
    """Named as diffusers' class, so :func:`adapter_for` gives it PixArt's adapter (floors on ``ff.net.2``)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(bias=True), Block(bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x


FLOORED = ("transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2")


def _model(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel()
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight[:, 3] *= 20.0  # an outlier input channel
    return model


def _inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, D, generator=g)
    x[..., 7] *= 25.0  # an outlier channel
    return x


def _stats(model: nn.Module, spec: StatsSpec, x: torch.Tensor) -> dict[str, LayerStats]:
    return collect_stats(select_layers(model).layers, spec, lambda: model(x))


# ------------------------------------------------------------------ LayerStats.shifted


def _collect(x: torch.Tensor, spec: StatsSpec) -> LayerStats:
    layer = nn.Linear(x.shape[-1], 2).to(x.dtype)
    return collect_stats({"l": layer}, spec, lambda: [layer(part) for part in x.split(7)])["l"]


@pytest.mark.parametrize("xtx", ["full", "diag"])
@pytest.mark.parametrize("rows", [ALL_ROWS, 5])
def test_shifted_stats_equal_collecting_on_shifted_inputs(xtx: str, rows: int) -> None:
    """On a dyadic grid every sum is exact in float32: the derivation equals the collection exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-16, 16, (29, 16), generator=g).double() / 8  # |x + c| < 6: sums of products < 2^24 / 64^2
    x[:, 2] += 3.0  # a channel that is positive everywhere: absmax comes from max + c
    x[:, 5] -= 3.0  # ... negative everywhere: from -(min + c)
    spec = StatsSpec(absmax=True, rows=rows, xtx=xtx)
    derived, direct = _collect(x, spec).shifted(GELU_SHIFT), _collect(x + GELU_SHIFT, spec)
    for name in LayerStats.TENSORS:
        a, b = getattr(derived, name), getattr(direct, name)
        assert (a is None and b is None and name == "heldout") or torch.equal(a, b), name
    assert derived.count == direct.count == 29
    # random floats (not exact in float32): the float64 derivation agrees to float32 rounding
    y = torch.randn(29, 16, generator=g, dtype=torch.float64) * 3
    derived, direct = _collect(y, spec).shifted(0.3), _collect(y + 0.3, spec)
    for name in LayerStats.TENSORS:
        if name != "heldout":
            torch.testing.assert_close(getattr(derived, name), getattr(direct, name), rtol=2e-6, atol=2e-5)


def test_shifted_stats_shift_held_out_rows_and_keep_min_max_without_them() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-16, 16, (40, 8), generator=g).double() / 8
    spec = StatsSpec(absmax=True, rows=6, heldout=5)
    derived, direct = _collect(x, spec).shifted(GELU_SHIFT), _collect(x + GELU_SHIFT, spec)
    assert derived.heldout.shape == (5, 8) and torch.equal(derived.heldout, direct.heldout)
    given = _collect(x, spec).without_heldout()  # what evaluate gives a method
    assert given.heldout is None and torch.equal(given.shifted(GELU_SHIFT).absmax, direct.absmax)


def test_shifted_stats_refuse_statistics_collected_without_min_max() -> None:
    x = torch.randn(10, 8)
    old = _collect(x, StatsSpec(absmax=True, rows=4, minmax=False))
    assert old.maximum is None and old.shifted(0.0) is old
    with pytest.raises(UserError, match="recalibrate"):
        old.shifted(GELU_SHIFT)
    rows_only = _collect(x, StatsSpec(rows=4, minmax=False)).shifted(GELU_SHIFT)  # rows alone shift exactly
    assert torch.equal(rows_only.rows, _collect(x, StatsSpec(rows=4, minmax=False)).rows + GELU_SHIFT)
    full = _collect(x, StatsSpec(absmax=True, xtx="full"))
    back = LayerStats.from_state(full.state())  # saved and loaded (the calibration cache) with min / max / sums
    assert all(torch.equal(getattr(back, k), getattr(full, k)) for k in ("maximum", "minimum", "colsum", "xtx"))
    assert StatsSpec(absmax=True) != StatsSpec(absmax=True, minmax=False)  # so cache keys differ
    assert StatsSpec(minmax=False) | StatsSpec() == StatsSpec() and StatsSpec().empty


# ------------------------------------------------------------------ the option


def test_defaults_and_bounds() -> None:
    assert get_method("svdquant").shift_activations is True  # deepcompressor's INT4 config
    assert get_method("rtn").shift_activations is False
    assert get_method("smoothquant").shift_activations is False
    assert get_method("loraq").shift_activations is False
    assert get_method("svdquant").params()["shift_activations"] is True
    assert deepcompressor_bound(GELU_TANH_MIN) == -GELU_SHIFT
    assert deepcompressor_bound(-0.2) is None
    assert layer_shift(GELU_TANH_MIN, "deepcompressor", torch.float16) == (GELU_SHIFT, "deepcompressor")
    c, source = layer_shift(GELU_TANH_MIN, "exact", torch.float16)
    assert source == "exact" and c == shift_for(GELU_TANH_MIN, torch.float16) and -GELU_TANH_MIN <= c < GELU_SHIFT
    assert layer_shift(-0.2, "deepcompressor")[0] == 0.2  # an activation deepcompressor does not know: exact
    rtn = get_method("rtn", shift_activations=True)
    assert rtn.shifts_input(-0.17) and not rtn.shifts_input(None) and not rtn.shifts_input(0.0)
    assert not get_method("rtn", shift_activations=True, weight_format="mxfp4", act_format="mxfp4").shifts_input(-0.17)
    with pytest.raises(UserError, match="already shifted"):
        get_method("rtn", shift_activations=True, act_format="uint4_g64:shift=0.5")
    with pytest.raises(UserError, match="shift_bounds"):
        get_method("rtn", shift_bounds="rounded")


# ------------------------------------------------------------------ quantize_model


def _reference_shifted_linear(layer: nn.Linear, x: torch.Tensor, c: float) -> torch.Tensor:
    """deepcompressor's ShiftedLinear + unsigned int4 g64 input + RTN int4 g64 weight, in float64:
    ``Q_u(x + c) Q(W)^T + (b - c W 1)`` (``x + c`` in the layer's dtype, as its buffer adds it)."""
    w = layer.weight.detach()
    wq = get_format("int4_g64").reference(w).double()
    u = get_format("uint4_g64").reference(x + torch.tensor(c, dtype=x.dtype)).double()
    b = -c * w.double().sum(1) + (0.0 if layer.bias is None else layer.bias.detach().double())
    return u @ wq.T + b


@torch.no_grad()
def test_rtn_shifted_cell_equals_deepcompressors_shifted_linear() -> None:
    model, x = _model(), _inputs()
    method = get_method("rtn", shift_activations=True)
    h = F.gelu(model.transformer_blocks[0].ff.net[0].proj(torch.randn(50, D)), approximate="tanh")
    originals = {n: model.get_submodule(n) for n in FLOORED}
    report = quantize_model(model, method)
    for name in FLOORED:
        q = report.quantized[name]
        assert str(q.act_format) == "uint4_g64:shift=0.171875" and q.bias is not None
        assert q.info == {"act_shift": GELU_SHIFT, "act_shift_format": "uint4_g64", "act_shift_bound": "deepcompressor"}
        want = _reference_shifted_linear(originals[name], h, GELU_SHIFT)
        torch.testing.assert_close(q(h).double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert str(report.quantized["transformer_blocks.0.lin"].act_format) == "int4_g64"
    restore_model(model, report)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("fmt, shifted", [("int4_g64", True), ("int8_g64", True), ("mxfp4", False), ("mxint4", False)])
def test_quantize_model_shifts_exactly_the_floored_layers_of_int_formats(fmt: str, shifted: bool) -> None:
    model = _model()
    shapes = select_layers(model).shapes()
    for method in (get_method("svdquant", weight_format=fmt, act_format=fmt, **FAST_SVDQ),
                   get_method("rtn", weight_format=fmt, act_format=fmt, shift_activations=True)):
        stats = _stats(model, method.stats_spec(), _inputs())
        report = quantize_model(model, method, stats)
        got = {n for n, q in report.quantized.items() if q.act_format.shift}
        assert got == (set(FLOORED) if shifted else set()), (fmt, method.name)
        assert all(getattr(q.act_format, "unsigned", False) == (n in got) for n, q in report.quantized.items())
        assert report.bits() == model_bits(method, shapes)  # bits accounted == deployed
        restore_model(model, report)
    plain = quantize_model(model, get_method("rtn", weight_format=fmt, act_format=fmt))  # RTN: off by default
    assert not any(q.act_format.shift for q in plain.quantized.values())
    restore_model(model, plain)


def test_shifted_bias_bits_are_accounted_and_deployed() -> None:
    model = _model()
    on, off = get_method("rtn", shift_activations=True), get_method("rtn")
    shapes = select_layers(model).shapes()
    assert [s.name for s in shapes if s.floor is not None] == list(FLOORED)
    assert {s.floor for s in shapes if s.floor is not None} == {GELU_TANH_MIN}
    report = quantize_model(model, on)
    assert report.bits() == model_bits(on, shapes)
    assert model_bits(on, shapes) - model_bits(off, shapes) == 16 * D  # block 1's net.2 had no bias: now it has
    restore_model(model, report)
    unshifted = quantize_model(model, off)
    assert report.bits() - unshifted.bits() == 16 * D
    restore_model(model, unshifted)


@torch.no_grad()
def test_svdquant_shifted_layer_equals_calibrating_on_shifted_inputs() -> None:
    """The shifted cell's statistics derived from the unshifted collection give the layer that
    SVDQuant builds with ``uint4`` from statistics collected on ``x + c`` directly (float32: the
    derived abs-max and rows are bit-identical), reading ``x`` instead of ``x + c``."""
    model, x = _model(), _inputs()
    method = get_method("svdquant", **FAST_SVDQ)
    name = FLOORED[0]
    layer = model.get_submodule(name)
    stats = _stats(model, method.stats_spec(), x)
    ff = model.transformer_blocks[0].ff.net
    ff.insert(2, AddShift(GELU_SHIFT))  # net.2 is now the shift, net.3 the layer
    direct_stats = collect_stats({name: layer}, method.stats_spec(), lambda: model(x))[name]
    del ff[2]
    for k in ("absmax", "rows"):
        assert torch.equal(getattr(stats[name].shifted(GELU_SHIFT), k), getattr(direct_stats, k)), k
    report = quantize_model(model, method, stats)
    q = report.quantized[name]
    unsigned = dataclasses.replace(method, act_format=get_format("uint4_g64"), shift_activations=False)
    direct = unsigned.quantize_layer(layer, direct_stats)
    assert isinstance(direct, QuantLinear) and direct.info["smooth_pair"] == q.info["smooth_pair"]
    assert torch.equal(q.weight, direct.weight) and torch.equal(q.smooth, direct.smooth)
    h = F.gelu(ff[0].proj(torch.randn(30, D)), approximate="tanh")
    want = direct(h + GELU_SHIFT).double() - GELU_SHIFT * layer.weight.detach().double().sum(1)
    torch.testing.assert_close(q(h).double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    restore_model(model, report)
