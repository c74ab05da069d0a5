"""Formats against hand-computed values, torchao (MXFP, NVFP4) and float64 re-derivations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ptqbench.errors import UserError
from ptqbench.formats import (
    E2M1,
    E4M3,
    ELEMENTS,
    FORMATS,
    CastFormat,
    IntFormat,
    MXFormat,
    NVFP4Format,
    get_format,
    spec_string,
)

warnings.filterwarnings("ignore")
DTYPES = (torch.float32, torch.bfloat16)
MX_NAMES = ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2")


def sample_tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    """Normal, heavy-tailed, outlier-channel and wide-dynamic-range tensors [64, 256]."""
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 256, generator=g)
    heavy = torch.randn(64, 256, generator=g) / torch.rand(64, 256, generator=g).clamp_min(1e-3) ** 0.7
    outlier = torch.randn(64, 256, generator=g)
    outlier[:, torch.randperm(256, generator=g)[:6]] *= 250.0
    wide = torch.randn(64, 256, generator=g) * torch.logspace(-9, 9, 256)
    return {k: v.to(device) for k, v in {"normal": normal, "heavy": heavy, "outlier": outlier, "wide": wide}.items()}


# ------------------------------------------------------------------ hand-computed values


def test_every_e2m1_magnitude_is_representable() -> None:
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M1.values().tolist() == mags
    x = torch.tensor(mags + [-m for m in mags])
    assert torch.equal(E2M1.round(x), x)


@pytest.mark.parametrize(
    ("value", "even", "away"),
    [
        (0.25, 0.0, 0.5),  # tie between 0 and 0.5 (subnormal)
        (0.75, 1.0, 1.0),  # tie between 0.5 and 1.0: 1.0 has the even code
        (1.25, 1.0, 1.5),
        (1.75, 2.0, 2.0),
        (2.5, 2.0, 3.0),
        (3.5, 4.0, 4.0),
        (5.0, 4.0, 6.0),  # tie between 4 and 6
        (5.1, 6.0, 6.0),
        (7.0, 6.0, 6.0),  # saturates, no Inf
        (1e30, 6.0, 6.0),
        (0.1, 0.0, 0.0),
    ],
)
def test_e2m1_ties_and_saturation(value: float, even: float, away: float) -> None:
    for sign in (1.0, -1.0):
        x = torch.tensor([sign * value])
        assert E2M1.round(x, "even").item() == sign * even
        assert E2M1.round(x, "away").item() == sign * away


def test_e4m3_subnormals_and_max() -> None:
    tiny = 2.0**-9  # smallest E4M3 subnormal
    x = torch.tensor([tiny, tiny / 2, 3 * tiny / 2, 5 * tiny / 2, 448.0, 464.0, 470.0, 1e9])
    expected = torch.tensor([tiny, 0.0, 2 * tiny, 2 * tiny, 448.0, 448.0, 448.0, 448.0])
    assert torch.equal(E4M3.round(x), expected)
    # agrees with torch's own float8 cast wherever that cast does not overflow
    y = torch.randn(10000) * 50
    assert torch.equal(E4M3.round(y), y.to(torch.float8_e4m3fn).float())


def test_element_value_tables() -> None:
    expected_counts = {"e4m3": 127, "e5m2": 124, "e3m2": 32, "e2m3": 32, "e2m1": 8}
    for name, el in ELEMENTS.items():
        vals = el.values()
        assert len(vals) == expected_counts[name], name
        assert vals[-1].item() == el.max_normal


def test_mx_block_with_unit_scale() -> None:
    # amax 6 -> shared exponent floor(log2 6) - 2 = 0: elements are rounded as E2M1 directly.
    x = torch.tensor([[6.0, 0.25, 0.75, 2.5, 5.0, -3.5, 1.25, 0.1] + [0.0] * 24])
    y = get_format("mxfp4").quantize(x)
    assert y[0, :8].tolist() == [6.0, 0.0, 1.0, 2.0, 4.0, -4.0, 1.0, 0.0]
    # amax 7 -> same exponent, 7 saturates to 6
    x[0, 0] = 7.0
    assert get_format("mxfp4").quantize(x)[0, 0].item() == 6.0
    # rceil picks the exponent so amax never saturates: 7 -> scale 2, 7/2 = 3.5 -> 4 -> 8
    assert get_format("mxfp4", scale_rule="rceil").quantize(x)[0, 0].item() == 8.0


def test_all_zero_blocks_nan_and_ragged_blocks() -> None:
    for fmt in [get_format(n) for n in (*MX_NAMES, "mxint8", "mxint4", "nvfp4", "nvfp4_1l", "int4_g64", "int8_pc")]:
        z = torch.zeros(3, 70)
        assert torch.equal(fmt.quantize(z), z), fmt.name
        x = torch.randn(3, 70)
        x[1, 5] = float("nan")
        y = fmt.quantize(x)
        assert torch.isnan(y[1, 5]) and torch.isnan(y).sum() == 1, fmt.name
        clean = x.clone()
        clean[1, 5] = 0.0
        keep = ~torch.isnan(x)
        assert torch.equal(y[keep], fmt.quantize(clean)[keep]), fmt.name
    # ragged: 40 = 32 + 8; the short block gets its own scale from its own 8 elements
    x = torch.cat([torch.full((1, 32), 1000.0), torch.full((1, 8), 0.3)], dim=1)
    y = get_format("mxfp4").quantize(x)
    assert y.shape == x.shape
    assert y[0, 35].item() == pytest.approx(0.3, rel=0.25)


def test_int_hand_values() -> None:
    fmt = IntFormat(4, 4)  # groups of 4, qmax 7, fp16 scales
    x = torch.tensor([[7.0, 3.5, -1.5, 0.49, 14.0, 1.0, 3.0, 0.0]])
    y = fmt.quantize(x)
    # group 1: s = 1 -> 7, 4 (3.5 ties to even), -2 (-1.5 ties to even), 0
    # group 2: s = 2 -> 14, 0 (0.5 ties to 0), 4 (1.5 -> 2), 0
    assert y.tolist() == [[7.0, 4.0, -2.0, 0.0, 14.0, 0.0, 4.0, 0.0]]
    assert fmt.bits((1, 8)) == 4 * 8 + 16 * 2
    away = IntFormat(4, 4, rounding="away").quantize(x)
    assert away.tolist() == [[7.0, 4.0, -2.0, 0.0, 14.0, 2.0, 4.0, 0.0]]


def test_unsigned_int_hand_values() -> None:
    """uint4, groups of 4: s = fp16(max|x| / 15), codes clamp(round(x / s), 0, 15) (deepcompressor's uint4)."""
    fmt = get_format("uint4_g4")
    assert fmt == IntFormat(4, 4, unsigned=True) and (fmt.qmin, fmt.qmax) == (0, 15)
    x = torch.tensor(
        [
            [15.0, 0.5, 1.5, 2.5],  # s = 1: ties to even 0, 2, 2
            [7.5, 0.25, 0.75, 3.75],  # s = 0.5: y = 15, 0.5, 1.5, 7.5 -> 15, 0, 2, 8
            [0.0, 0.0, 0.0, 0.0],  # all zero: zeros, no NaN
            [-3.0, -1.0, 0.0, 0.0],  # only negatives: everything clamps to 0
            [-10.0, 1.0, 2.0, 0.0],  # the outlier is negative: s = fp16(10 / 15) = 0.66650390625
        ]
    ).reshape(1, 20)
    s = 0.66650390625
    want = [15, 0, 2, 2, 7.5, 0, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2 * s, 3 * s, 0]
    assert fmt.quantize(x).tolist() == [want]
    away = get_format("uint4_g4:rounding=away").quantize(x)
    assert away[0, :8].tolist() == [15, 1, 2, 3, 7.5, 0.5, 1, 4]
    assert fmt.bits((1, 20)) == 4 * 20 + 16 * 5
    assert get_format("uint8_pc").bits((7, 9)) == 8 * 63 + 16 * 7


def test_shifted_int_hand_values() -> None:
    """Q_u(x + c) - c with c = 0.171875 (deepcompressor's GELU shift), float32 steps exact here."""
    fmt = get_format("uint4_g4:shift=0.171875")
    x = torch.tensor([[-0.171875, -0.1, 0.828125, 2.828125]])  # x + c = 0, 0.071875, 1, 3
    s = 0.199951171875  # fp16(3 / 15)
    want = [0.0 - 0.171875, 0.0 - 0.171875, 5 * s - 0.171875, 15 * s - 0.171875]
    assert fmt.quantize(x).tolist() == [want]
    assert fmt.unshifted() == get_format("uint4_g4") and fmt.shift == 0.171875
    assert torch.equal(fmt.quantize(x), fmt.reference(x))


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float16), ids=str)
@pytest.mark.parametrize("spec", ["uint4_g64:shift=0.171875", "int4_g64:shift=0.2734375", "uint8_pc:shift=0.3125"])
def test_shifted_formats_are_the_shifted_grid(spec: str, dtype: torch.dtype) -> None:
    """``Q(x + c) - c``, each step in x's dtype, against the float64 re-derivation of the grid."""
    fmt = get_format(spec)
    c = torch.tensor(fmt.shift, dtype=dtype)
    for tname, x in sample_tensors().items():
        x = torch.nn.functional.gelu(x.clamp(-6e4, 6e4)).to(dtype)  # post-GELU: x >= -0.17
        want = ref_int(x + c, fmt.unshifted()) - c
        mismatches = int((fmt.quantize(x) != want).sum())
        assert mismatches == 0, f"{fmt} {dtype} {tname}: {mismatches} mismatches"
        if fmt.unsigned:
            assert bool((fmt.quantize(x) >= -c).all())


def test_shift_names_and_errors() -> None:
    a = get_format("uint4_g64:shift=0.171875")
    assert a == get_format("int4_g64:unsigned=true,shift=0.171875") == get_format("int4_g64").with_shift(0.171875)
    assert get_format("int4_g64").with_shift(0.5, unsigned=False) == IntFormat(4, 64, shift=0.5)
    assert str(a) == "uint4_g64:shift=0.171875" and a.name == "uint4_g64"
    assert a.bits((1152, 4608)) == get_format("int4_g64").bits((1152, 4608)) == 4 * 1152 * 4608 + 16 * 1152 * 72
    with pytest.raises(UserError, match="only integer formats"):
        get_format("mxfp4").with_shift(0.17)
    with pytest.raises(UserError, match="shift must be"):
        get_format("uint4_g64:shift=abc")
    with pytest.raises(UserError, match="shift must be"):
        get_format("uint4_g64", shift=float("nan"))
    assert get_format("mxfp4").shift == 0.0 and get_format("mxfp4").unshifted() == get_format("mxfp4")


# ------------------------------------------------------------------ torchao oracles


def _torchao():
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2

    elems = {
        "mxfp4": torch.float4_e2m1fn_x2,
        "mxfp6_e2m3": DTYPE_FP6_E2M3,
        "mxfp6_e3m2": DTYPE_FP6_E3M2,
        "mxfp8_e4m3": torch.float8_e4m3fn,
        "mxfp8_e5m2": torch.float8_e5m2,
    }
    modes = {"floor": "FLOOR", "ceil": "CEIL", "rceil": "RCEIL"}
    modes = {rule: getattr(ScaleCalculationMode, mode) for rule, mode in modes.items()}
    return mx, elems, modes


# torchao is run on the CPU: on CUDA, PyTorch computes ``tensor / python_float`` as a multiplication
# by the reciprocal, so torchao's own CUDA results can differ from its CPU ones by one rounding in
# rare cases; ptqbench uses IEEE division on every device and is compared with the CPU semantics.


def check_mx_against_torchao(device: str) -> None:
    mx, elems, modes = _torchao()
    for dtype in DTYPES:
        for tname, x in sample_tensors(device).items():
            x = x.to(dtype).contiguous()
            for name in MX_NAMES:
                for rule, mode in modes.items():
                    scale, data = mx.to_mx(x.cpu(), elems[name], 32, mode)
                    ref = mx.to_dtype(data, scale, elems[name], 32, dtype).to(device)
                    ours = get_format(name, scale_rule=rule).quantize(x)
                    mismatches = int((ref != ours).sum())
                    assert mismatches == 0, f"{name} {rule} {dtype} {tname}: {mismatches} mismatches"


def check_nvfp4_against_torchao(device: str) -> None:
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4

    for dtype in DTYPES:
        for tname, x in sample_tensors(device).items():
            x = x.to(dtype).contiguous()
            for two_level in (True, False):
                xc = x.cpu()
                g = nv.per_tensor_amax_to_scale(xc.abs().amax().float()) if two_level else None
                scales, data = nv.nvfp4_quantize(xc, 16, g)
                q = f4_unpacked_to_f32(unpack_uint4(data)).reshape(64, -1, 16)
                total = scales.float() if g is None else g * scales.float()
                ref = (q * total.unsqueeze(-1)).reshape(x.shape).to(dtype).to(device)
                ours = NVFP4Format(two_level=two_level).quantize(x)
                mismatches = int((ref != ours).sum())
                assert mismatches == 0, f"nvfp4 two_level={two_level} {dtype} {tname}: {mismatches} mismatches"


def test_mx_bit_exact_vs_torchao() -> None:
    check_mx_against_torchao("cpu")


def test_nvfp4_bit_exact_vs_torchao() -> None:
    check_nvfp4_against_torchao("cpu")


def test_mx_and_nvfp4_bit_exact_vs_torchao_cuda(cuda: torch.device) -> None:
    check_mx_against_torchao("cuda")
    check_nvfp4_against_torchao("cuda")


def test_nvfp4_tiny_block_scale_is_raised_not_flushed() -> None:
    # tensor amax 1e4, second block 0.05: 0.05 / 6 / g is below E4M3's smallest normal 2**-6, so the
    # block scale is raised to 2**-6 (torchao's rule); 0.05 / (g * 2**-6) = 0.86 rounds to 1.
    x = torch.full((1, 32), 0.05)
    x[0, 0] = 1e4
    y = get_format("nvfp4").quantize(x)
    g = torch.tensor(1e4, dtype=torch.float32) / (6 * 448)
    assert y[0, 16].item() == (g * 2.0**-6).item()
    # a plain cast would have flushed the scale to an E4M3 subnormal and given a different value
    flushed = (0.05 / 6 / g).to(torch.float8_e4m3fn).float()
    assert y[0, 16].item() != pytest.approx(float(E2M1.round(0.05 / (g * flushed)) * g * flushed), rel=1e-6)


# ------------------------------------------------------------------ float64 re-derivations


def ref_int(x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """numpy float64 re-derivation of the integer format (documented scale rule)."""
    a = x.double().cpu().numpy()
    n = a.shape[-1]
    qmax = 2**fmt.bits_ - 1 if fmt.unsigned else 2 ** (fmt.bits_ - 1) - 1
    qmin = 0 if fmt.unsigned else -qmax
    if fmt.per_tensor:
        blocks = a.reshape(1, 1, -1)
    elif fmt.group is None:
        blocks = a[..., None, :]
    else:
        pad = (-n) % fmt.group
        blocks = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]).reshape(*a.shape[:-1], -1, fmt.group)
    amax = np.nanmax(np.abs(blocks), axis=-1, keepdims=True)
    sdt = {"fp16": np.float16, "fp32": np.float32}.get(fmt.scale_dtype)
    quot = (amax / qmax).astype(np.float32)
    if sdt is None:  # bf16 via torch
        s = torch.from_numpy(quot).to(torch.bfloat16).double().numpy()
    else:
        with np.errstate(over="ignore"):
            s = np.minimum(quot.astype(sdt), np.finfo(sdt).max).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(s == 0, 0.0, blocks / np.where(s == 0, 1.0, s))
    q = np.round(y) if fmt.rounding == "even" else np.sign(y) * np.floor(np.abs(y) + 0.5)
    out = np.clip(q, qmin, qmax) * s
    if fmt.per_tensor:
        out = out.reshape(a.shape)
    elif fmt.group is None:
        out = out[..., 0, :]
    else:
        out = out.reshape(*a.shape[:-1], -1)[..., :n]
    return torch.from_numpy(out).to(x.dtype)


def grid_round(y: np.ndarray, grid: np.ndarray, rounding: str) -> np.ndarray:
    """Nearest value of a non-negative ascending grid of consecutive codes (ties: even code or away)."""
    a = np.abs(y)
    idx = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    pick_hi = a - lo > hi - a
    tie = a - lo == hi - a
    if rounding == "even":
        pick_hi = pick_hi | (tie & (idx % 2 == 0))
    else:
        pick_hi = pick_hi | tie
    q = np.where(pick_hi, hi, lo)
    q = np.where(a >= grid[-1], grid[-1], q)
    return np.sign(y) * q


def ref_mx(x: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """numpy float64 re-derivation of MX formats by nearest-grid-value search."""
    a = x.double().cpu().numpy()
    n = a.shape[-1]
    pad = (-n) % fmt.block
    blocks = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]).reshape(*a.shape[:-1], -1, fmt.block)
    amax = np.nanmax(np.abs(blocks), axis=-1, keepdims=True)
    if fmt.is_int:
        b = fmt.element_bits
        grid = np.arange(0, 2 ** (b - 1)) / 2.0 ** (b - 2)
        emax = 0
    else:
        grid = ELEMENTS[fmt.element].values().numpy()
        emax = ELEMENTS[fmt.element].emax
    with np.errstate(divide="ignore"):
        if fmt.scale_rule == "floor":
            e = np.floor(np.log2(amax)) - emax
        elif fmt.scale_rule == "ceil":
            e = np.ceil(np.log2(amax)) - emax
        else:
            e = np.ceil(np.log2((amax / grid[-1]).astype(np.float32).astype(np.float64)))
    e = np.clip(np.nan_to_num(e, neginf=-127), -127, 127)
    out = grid_round(blocks / 2.0**e, grid, fmt.rounding) * 2.0**e
    return torch.from_numpy(out.reshape(*a.shape[:-1], -1)[..., :n]).to(x.dtype)


INT_FORMATS = [
    IntFormat(4, 64),
    IntFormat(8, None),
    IntFormat(8, None, per_tensor=True),
    IntFormat(3, 32),
    IntFormat(6, 16, rounding="away"),
    IntFormat(4, 64, scale_dtype="bf16"),
    IntFormat(4, 64, scale_dtype="fp32"),
    IntFormat(4, 48),  # ragged groups on 256 columns
    IntFormat(4, 64, unsigned=True),
    IntFormat(8, None, unsigned=True),
    IntFormat(3, 48, unsigned=True, rounding="away"),
    IntFormat(8, None, per_tensor=True, unsigned=True),
]
MX_REF_FORMATS = [
    *(get_format(n, scale_rule=r) for n in MX_NAMES for r in ("floor", "ceil", "rceil")),
    get_format("mxint8"),
    get_format("mxint4"),
    get_format("mxint4", rounding="away"),
    get_format("mxfp4", rounding="away"),
    get_format("mxint6_b16"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_int_formats_match_float64_reference(fmt: IntFormat, dtype: torch.dtype) -> None:
    for tname, x in sample_tensors().items():
        x = x.to(dtype)
        mismatches = int((fmt.quantize(x) != ref_int(x, fmt)).sum())
        assert mismatches == 0, f"{fmt} {dtype} {tname}: {mismatches} mismatches"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", MX_REF_FORMATS, ids=str)
def test_mx_formats_match_float64_grid_reference(fmt: MXFormat, dtype: torch.dtype) -> None:
    for tname, x in sample_tensors().items():
        x = x.to(dtype)
        mismatches = int((fmt.quantize(x) != ref_mx(x, fmt)).sum())
        assert mismatches == 0, f"{fmt} {dtype} {tname}: {mismatches} mismatches"


def test_quantize_is_idempotent_and_keeps_shape_dtype() -> None:
    x = sample_tensors()["heavy"].reshape(4, 16, 256)
    for name in FORMATS.names():
        fmt = get_format(name)
        for dtype in DTYPES:
            unsigned = isinstance(fmt, IntFormat) and fmt.unsigned  # the abs-max of a negative input sets s once
            xd = (x.abs() if unsigned else x).to(dtype)
            y = fmt.quantize(xd)
            assert y.shape == xd.shape and y.dtype == dtype, name
            rounded_output = isinstance(fmt, IntFormat) and dtype == torch.bfloat16  # q * s rounded to bf16
            if not isinstance(fmt, (CastFormat, NVFP4Format)) and not rounded_output:
                assert torch.equal(fmt.quantize(y), y), f"{name} {dtype} not idempotent"


# ------------------------------------------------------------------ bits


def test_bits_exact_counts() -> None:
    n = 1152 * 1152
    assert get_format("int4_g64").bits((1152, 1152)) == 4 * n + 16 * 1152 * 18
    assert get_format("mxfp4").bits((1152, 1152)) == 4 * n + 8 * 1152 * 36
    assert get_format("mxfp6_e2m3").bits((1152, 1152)) == 6 * n + 8 * 1152 * 36
    assert get_format("mxfp8_e4m3").bits((1152, 4608)) == 8 * 1152 * 4608 + 8 * 1152 * 144
    assert get_format("mxint4").bits((3, 33)) == 4 * 99 + 8 * 3 * 2  # ragged last block
    assert get_format("nvfp4").bits((10, 40)) == 4 * 400 + 8 * 10 * 3 + 32
    assert get_format("nvfp4_1l").bits((10, 40)) == 4 * 400 + 8 * 10 * 3
    assert get_format("int8_pc").bits((7, 9)) == 8 * 63 + 16 * 7
    assert get_format("int8_pt").bits((7, 9)) == 8 * 63 + 16
    assert get_format("bf16").bits((5, 6)) == 16 * 30
    assert get_format("int4_g64:scale_dtype=fp32").bits((2, 64)) == 4 * 128 + 32 * 2
    assert get_format("mxfp4").bits_per_element(4096) == 4.25


# ------------------------------------------------------------------ names


def test_all_spec_names_resolve() -> None:
    names = [
        "int4_g64", "int8_pc", "mxint4", "mxint8", "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2",
        "mxfp8_e4m3", "mxfp8_e5m2", "nvfp4", "fp16", "bf16", "int6_g32", "int3_g128", "int2_pc",
        "uint4_g64", "uint8_pc", "uint8_pt", "uint6_g32",
    ]
    for name in names:
        assert get_format(name).name == name


def test_spec_strings_round_trip() -> None:
    variants = [get_format(n) for n in FORMATS.names()] + [
        get_format("int4_g64", scale_dtype="bf16", rounding="away"),
        get_format("mxfp4", scale_rule="rceil"),
        get_format("mxfp8_e4m3_b16"),
        get_format("nvfp4", two_level=False, block=32),
        get_format("uint4_g64:shift=0.171875"),
        get_format("int8_pc", shift=0.16997120747990363),
        get_format("uint3_pt"),
    ]
    for fmt in variants:
        assert get_format(spec_string(fmt)) == fmt
        assert get_format(fmt.to_dict()) == fmt


def test_bad_format_names_and_fields() -> None:
    with pytest.raises(UserError, match="did you mean mxfp4"):
        get_format("mxpf4")
    with pytest.raises(UserError, match="unknown field"):
        get_format("mxfp4", blok=16)
    with pytest.raises(UserError, match="scale_rule"):
        get_format("mxfp4:scale_rule=round")
    with pytest.raises(UserError, match="bits must be"):
        get_format("int17_g64")
    with pytest.raises(UserError, match="key=value"):
        get_format("mxfp4:rceil")


def test_cast_formats() -> None:
    x = torch.tensor([1.0 + 2.0**-12, 3.0])
    assert get_format("fp16").quantize(x).tolist() == [1.0, 3.0]
    assert get_format("bf16").quantize(x).tolist() == [1.0, 3.0]
    xb = x.to(torch.bfloat16)
    assert get_format("bf16").quantize(xb) is xb
    assert get_format("fp16").is_16bit and not get_format("mxfp8_e4m3").is_16bit
    assert math.isclose(get_format("fp32").bits_per_element(), 32)


@pytest.mark.parametrize(
    "name", ["mxfp4", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "mxint4:rounding=away", "int4_g64", "int8_pc",
             "int6_g32:rounding=away", "int4_g64:scale_dtype=fp32", "uint4_g64:shift=0.171875"],
)
def test_compiled_cpu_path_equals_reference(name: str) -> None:
    """Large CPU tensors of MX and INT formats go through torch.compile of the reference: same values."""
    from ptqbench.kernels import COMPILE_MIN_NUMEL

    fmt = get_format(name)
    assert fmt.compiles_exactly and not get_format("nvfp4").compiles_exactly
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 1024, generator=g) / torch.rand(256, 1024, generator=g).clamp_min(1e-3) ** 0.5
    x[:, 17] *= 300.0
    # a group of exact ties: amax 3.5 gives s = 0.5 for 4-bit, the others are (k + 1/2) * s
    ties = torch.tensor([3.5] + [(0.25 + 0.5 * (i % 6)) * (-1) ** i for i in range(63)])
    x[:, 64:128] = ties
    assert x.numel() >= COMPILE_MIN_NUMEL
    for dtype in DTYPES:
        xd = x.to(dtype)
        assert fmt.backend_for(xd) == "compiled"
        got, want = fmt.quantize(xd), fmt.reference(xd)
        assert int((got != want).sum()) == 0, f"{name} {dtype}"


# ------------------------------------------------------------------ backend choice


def test_backend_is_chosen_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    from ptqbench import kernels

    fmt, big, small = get_format("int4_g64"), torch.zeros(256, 1024), torch.zeros(2, 64)
    assert fmt.backend_for(big) == "compiled" and fmt.backend_for(small) == "eager"
    assert fmt.backend_for(big, "eager") == "eager" and fmt.backend_for(small, "compiled") == "compiled"
    assert fmt.backend_for(big.requires_grad_()) == "eager"  # autograd keeps the eager reference
    assert get_format("nvfp4").backend_for(big.detach(), "compiled") == "eager"  # not exact when compiled
    with kernels.use_backend("eager"):
        assert kernels.current_backend() == "eager" and fmt.backend_for(big.detach()) == "eager"
        assert fmt.backend_for(big.detach(), "auto") == "compiled"  # the argument wins
    assert kernels.current_backend() == "auto"
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # the environment narrows "auto" only
    assert fmt.backend_for(big.detach()) == "eager" and fmt.backend_for(big.detach(), "compiled") == "compiled"
    with pytest.raises(UserError, match="kernel backend"):
        fmt.quantize(small, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="kernel backend"):
        kernels.set_backend("fast")  # type: ignore[arg-type]


def test_no_import_cycles() -> None:
    """No ptqbench module imports one that imports it back (imports inside functions included)."""
    import ast
    import pathlib

    import ptqbench

    root = pathlib.Path(ptqbench.__file__).parent
    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}  # fmt: skip
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {m for m in found if m in mods and m != mod}
    mine = {"ptqbench.formats", "ptqbench.kernels", "ptqbench.layers", "ptqbench.shifting"}
    pairs = sorted((a, b) for a in graph for b in graph[a] if a in graph[b] and a < b and {a, b} & mine)
    assert pairs == [], f"import cycles: {pairs}"
