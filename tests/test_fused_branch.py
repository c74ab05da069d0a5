"""The fused low-rank branch path (one kernel writes ``[Qa(x') | h]``, one GEMM against
``[Q1(W) | up]``): bit-identical Qa(x'), h against a float64 re-derivation, layer outputs against
the unfused path (GPU); the plan's fallbacks, the concatenated weight's views and the unchanged
CPU path (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptqbench import kernels
from ptqbench import layers as layers_module
from ptqbench.formats import get_format
from ptqbench.layers import LowRankBranch, QuantLinear, fused_plan

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = torch.bfloat16
SHIFT = 0.171875  # deepcompressor's GELU shift


def _x(m: int, k: int, kind: str, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Random rows, or outlier-heavy ones (a few channels x250 and heavy tails)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "outlier":
        x = x / torch.rand(m, k, generator=g).clamp_min(1e-2) ** 0.5
        x[:, torch.randperm(k, generator=g)[:5]] *= 250.0
    return x.to(device, BF16)


def _smooth(k: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (2.0 ** (torch.rand(k, generator=g) * 6 - 3)).to(device, BF16)


def _layer(
    k: int, n: int, rank: int, act: str, branch_w: str, branch_a: str, mid: str | None, smooth: bool,
    device: str = "cpu", conv: bool = False,
) -> QuantLinear:  # fmt: skip
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, BF16)
    down = (torch.randn(rank, k, generator=g) / k**0.5).to(device, BF16)
    up = (torch.randn(n, rank, generator=g) / rank**0.5).to(device, BF16)
    bias = torch.randn(n, generator=g).to(device, BF16)
    branch = LowRankBranch(down, up, branch_w, branch_a, mid)
    fmt = get_format(act)
    return QuantLinear(
        w, bias, act.split(":")[0].removeprefix("u"), fmt, _smooth(k, device) if smooth else None, branch, conv=conv
    )


# ----------------------------------------------------------------------------- CPU: plan and path choice


def test_plan_sources_and_fallbacks() -> None:
    mx, nv = get_format("mxfp4"), get_format("nvfp4")
    plan = fused_plan(mx, get_format("bf16"), None, BF16)
    assert plan.source is None and plan.main == mx.kernel_spec(BF16) and plan.mid is None
    assert fused_plan(mx, get_format("fp32"), None, BF16).source is None  # fp32 cast: identity too
    assert fused_plan(mx, mx, None, BF16).source == plan.main  # LoRaQ reading Qa(x) itself
    w4a8 = fused_plan(mx, get_format("mxfp8_e4m3"), get_format("mxfp8_e4m3"), BF16)
    assert w4a8.source == get_format("mxfp8_e4m3").kernel_spec(BF16) and w4a8.mid == w4a8.source
    assert fused_plan(mx, mx, nv, BF16).mid_after == nv  # a per-tensor scale: torch after the kernel
    # NVFP4 activations (a per-tensor scale, one more pass): measured slower fused, so unfused
    assert fused_plan(nv, get_format("bf16"), None, BF16) is None
    assert fused_plan(mx, nv, None, BF16) is None
    assert fused_plan(get_format("nvfp4_1l"), get_format("bf16"), None, BF16) is not None
    assert fused_plan(mx, mx, get_format("bf16"), BF16).mid_after is None  # identity mid: none
    uint4 = get_format("uint4_g64")
    assert fused_plan(uint4, get_format("int8_g64"), None, BF16) is not None
    # the unfused path: no kernel for the main or the branch format, a shifted branch format, fp16 cast of
    # bf16 (rounds), float32 inputs
    assert fused_plan(get_format("bf16"), get_format("bf16"), None, BF16) is None
    assert fused_plan(mx, get_format("int4_pc"), None, BF16) is None  # per-channel: no kernel
    assert fused_plan(mx, get_format("uint4_g64:shift=0.171875"), None, BF16) is None
    assert fused_plan(mx, get_format("fp16"), None, BF16) is None
    assert fused_plan(mx, get_format("bf16"), None, torch.float32) is None
    assert fused_plan(mx, get_format("bf16"), None, BF16) is not None  # no width or rank: any rank fuses (GEMM)


def test_widths() -> None:
    assert kernels.branch_width(1152, 32) == 1184 and kernels.branch_width(1152, 73) == 1232
    assert kernels.branch_width(1000, 1) == 1008
    # tiles: 128 columns (64 with a second output), at least every format's block, 16+ rows
    assert kernels.tile_config(1152, [32]) == (4, 16) and kernels.tile_config(200, [32]) == (4, 16)
    assert kernels.tile_config(40, [16]) == (4, 16) and kernels.tile_config(8, [2]) == (4, 64)
    assert kernels.tile_config(1152, [16, 64]) == (4, 16) and kernels.tile_config(1152, [32, 1]) == (2, 16)
    assert kernels.tile_config(64, [16, 128]) == (8, 16) and kernels.tile_config(4608, [256]) == (1, 16)


def test_cpu_path_is_unchanged() -> None:
    """On the CPU no fused plan is made, no concatenated weight is built, and the output is the
    unfused composition step by step (shift, smoothing, Qa, main GEMM, branch, addmm)."""
    q = _layer(128, 48, 24, "uint4_g64:shift=0.171875", "int8_g64", "int8_g64", "int8_g64", smooth=True)
    x = _x(10, 128, "outlier")
    assert not kernels.fused_branch_allowed(x) and q._fused_plan(x) is None
    y = q(x)
    assert q.weight.untyped_storage().nbytes() == q.weight.numel() * 2  # no concatenated buffer
    xs = (x + x.new_full((), SHIFT)) / q.smooth
    b = q.branch
    h = b.mid_format.quantize(F.linear(b.act_format.quantize(xs), b.down))
    want = F.linear(get_format("uint4_g64").quantize(xs), q.weight, q.bias)
    want.addmm_(h, b.up.t())
    assert torch.equal(y, want)


def test_concat_weight_views_and_rebuild() -> None:
    q = _layer(64, 40, 19, "mxfp4", "bf16", "bf16", None, smooth=False)
    plain = _layer(64, 40, 19, "mxfp4", "bf16", "bf16", None, smooth=False)  # never concatenated
    w, up = q.weight.clone(), q.branch.up.clone()
    cat = q.concat_weight()
    assert cat.shape == (40, kernels.branch_width(64, 19)) and cat.is_contiguous()
    assert torch.equal(q.weight, w) and torch.equal(q.branch.up, up) and not bool(cat[:, 83:].any())
    assert q.weight.data_ptr() == cat.data_ptr() and q.branch.up._base is cat
    assert q.concat_weight() is cat  # unchanged: reused, no second copy
    q.weight = w * 2  # reassigned: rebuilt from the new weight
    again = q.concat_weight()
    assert again is not cat and torch.equal(again[:, :64], w * 2) and torch.equal(again[:, 64:83], up)
    q.branch.up = up + 1
    assert torch.equal(q.concat_weight()[:, 64:83], up + 1)
    plain.weight, plain.branch.up = w * 2, up + 1
    x = _x(5, 64, "normal")  # the unfused path reads the strided views as it reads plain tensors
    assert torch.equal(q(x), plain(x))


def test_layers_reading_one_tensor_compute_its_fake_quant_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v without smoothing read one tensor: its fake-quant is computed once and reused
    while the tensor is unchanged; another format, an in-place change or autograd recompute."""
    mx = get_format("mxfp4")
    calls: list[str] = []
    real = type(mx).quantize

    def counted(self, x, backend=None):
        calls.append(str(self))
        return real(self, x, backend)

    monkeypatch.setattr(type(mx), "quantize", counted)
    g = torch.Generator().manual_seed(0)
    q, k, v = (QuantLinear(torch.randn(24, 64, generator=g).to(BF16), None, "mxfp4", "mxfp4") for _ in range(3))
    other = QuantLinear(torch.randn(24, 64, generator=g).to(BF16), None, "mxfp4", "mxfp6_e2m3")
    x = _x(10, 64, "outlier")
    with torch.no_grad():
        calls.clear()
        ys = [layer(x) for layer in (q, k, v)]
        assert calls == ["mxfp4"]
        assert all(torch.equal(y, F.linear(mx.quantize(x), m.weight)) for y, m in zip(ys, (q, k, v), strict=True))
        calls.clear()
        other(x), q(x)
        assert calls == ["mxfp6_e2m3", "mxfp4"]
        x.mul_(2.0)  # changed in place: recomputed
        calls.clear()
        assert torch.equal(k(x), F.linear(real(mx, x), k.weight)) and calls == ["mxfp4"]
        assert layers_module._LAST.value is not None
        del x, ys
        assert layers_module._LAST.value is None  # released with its input
    calls.clear()
    x = _x(10, 64, "normal")
    q(x), k(x)
    assert calls == ["mxfp4", "mxfp4"]  # autograd on: no reuse


def test_switch_and_cpu() -> None:
    x = torch.zeros(2, 32, dtype=BF16)
    assert not kernels.fused_branch_allowed(x)
    with kernels.use_fused_branch(False):
        assert not kernels._fused_on[0]
    assert kernels._fused_on[0]


# ----------------------------------------------------------------------------- GPU: the kernel


def _torch_prepare(x: torch.Tensor, shift: float, smooth: torch.Tensor | None) -> torch.Tensor:
    if shift:
        x = x + x.new_full((), shift)
    return x if smooth is None else x / smooth


KERNEL_CASES = [  # (main act format, the product's source (None: the main format), mid, rank, k, smoothed)
    ("mxfp4", "bf16", None, 32, 1152, False),
    ("mxfp4", "bf16", None, 73, 200, True),  # ragged blocks
    ("nvfp4", "bf16", None, 108, 1152, True),
    ("int4_g64", "bf16", None, 32, 200, True),
    ("uint4_g64:shift=0.171875", "bf16", None, 73, 1152, True),
    ("mxfp4", None, "mxfp4", 108, 1152, False),
    ("mxfp4", "mxfp8_e4m3", "mxfp8_e4m3", 108, 200, True),
    ("int4_g64", "int8_g64", "int8_g64", 73, 1152, True),
    ("uint4_g64:shift=0.171875", "int8_g64", "int8_g64", 108, 1152, True),
    ("nvfp4", None, None, 32, 1152, True),
    ("mxfp4", "nvfp4", None, 73, 1152, True),  # a second format with its own per-tensor scale
    ("int4_g64", None, "int8_g64", 32, 1152, False),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_parts(cuda: torch.device, case: tuple) -> None:
    """Qa(x') bit-identical to the format's quantize (and torch reference) of torch's ``(x + c) / s``;
    h within the float32 accumulation bound (plus half a bf16 ulp) of a float64 re-derivation; padding
    zero; the mid format inside the kernel bit-identical to the torch format on the kernel's own h."""
    main, source, mid, rank, k, smooth = case
    fmt = get_format(main)
    act = fmt.unshifted()
    src_fmt = act if source is None else get_format(source)
    spec = act.kernel_spec(BF16)
    src_spec = None if source == "bf16" else src_fmt.kernel_spec(BF16)
    s = _smooth(k, "cuda") if smooth else None
    width = kernels.branch_width(k, rank)
    padded = torch.zeros(width - k, k, device="cuda", dtype=BF16)
    padded[:rank] = (torch.randn(rank, k, device="cuda") / k**0.5).to(BF16)
    down = padded[:rank]
    # the heuristic's tile, and a narrow one (one block of 64 columns, 8 rows)
    for kind, tile in [("normal", None), ("outlier", None), ("outlier", (max(1, 64 // spec.block), 8))]:
        x = _x(300, k, kind, "cuda")
        buf = kernels.fused_branch(x, padded, spec, src_spec, None, width, fmt.shift, s, tile)
        xs = _torch_prepare(x, fmt.shift, s)
        for want_q in (act.quantize(xs), act.reference(xs)):  # the fake-quant kernel and the torch definition
            same = (buf[:, :k] == want_q) | (buf[:, :k].isnan() & want_q.isnan())
            assert bool(same.all()), f"{case} {kind}: {int((~same).sum())} Qa mismatches"
        src = src_fmt.quantize(xs)
        h64 = src.double() @ down.double().T
        bound = (src.double().abs() @ down.double().abs().T) * k * 2.0**-24
        ulp = torch.finfo(BF16).eps * h64.abs().clamp_min(torch.finfo(BF16).tiny)
        err = (buf[:, k : k + rank].double() - h64).abs()
        assert bool((err <= bound + ulp).all()), f"{case} {kind}: h off by {float((err - bound - ulp).max())}"
        assert not bool(buf[:, k + rank :].any())
        if mid is not None:
            mfmt = get_format(mid)
            with_mid = kernels.fused_branch(
                x, padded, spec, src_spec, mfmt.kernel_spec(BF16), width, fmt.shift, s, tile
            )
            assert torch.equal(with_mid[:, :k], buf[:, :k])
            assert torch.equal(with_mid[:, k : k + rank], mfmt.quantize(buf[:, k : k + rank]))
            assert not bool(with_mid[:, k + rank :].any())


BATCH_CASES = [  # (main act format, the product's source (None: the main format), mid), rank 32, k 1152
    ("int4_g64", "bf16", None),
    ("uint4_g64", "bf16", None),
    ("mxfp4", None, "mxfp4"),
    ("int4_g64", "int8_g64", "int8_g64"),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_batch_is_each_item_alone(cuda: torch.device, case: tuple) -> None:
    """A batch (one x read by every item through a zero batch stride, a smoothing vector and a
    down-projection per item, written into a slice of a larger buffer) is bit-identical to each
    item's own call; a per-tensor scale is refused in a batch."""
    main, source, mid = case
    act = get_format(main)
    spec = act.kernel_spec(BF16)
    src_spec = None if source == "bf16" else (act if source is None else get_format(source)).kernel_spec(BF16)
    mid_spec = None if mid is None else get_format(mid).kernel_spec(BF16)
    k, rank, items = 1152, 32, 5
    width = kernels.branch_width(k, rank)
    g = torch.Generator().manual_seed(11)
    down = torch.zeros(items, width - k, k, dtype=BF16)
    down[:, :rank] = (torch.randn(items, rank, k, generator=g) / k**0.5).to(BF16)
    down = down.to(cuda)
    smooth = (2.0 ** (torch.rand(items, k, generator=g) * 6 - 3)).to(cuda, BF16)
    x = _x(300, k, "outlier", "cuda")
    big = torch.full((items + 2, 300, width), float("nan"), device=cuda, dtype=BF16)
    out = big[1 : items + 1]
    kernels.fused_branch(x.expand(items, -1, -1), down, spec, src_spec, mid_spec, width, 0.0, smooth, out=out)
    for i in range(items):
        alone = kernels.fused_branch(x, down[i], spec, src_spec, mid_spec, width, 0.0, smooth[i])
        assert torch.equal(out[i], alone), f"{case}: item {i} differs from its own call"
    assert bool(big[0].isnan().all()) and bool(big[-1].isnan().all())  # nothing written outside the slice
    nv = get_format("nvfp4").kernel_spec(BF16)
    with pytest.raises(ValueError, match="per-tensor scale"):
        kernels.fused_branch(x.expand(items, -1, -1), down, nv, None, None, width, 0.0, smooth)


# ----------------------------------------------------------------------------- GPU: the layer

LAYER_CASES = [  # (main act format, branch weight / act / mid formats, rank, smoothed), after KERNEL_CASES
    ("mxfp4", "bf16", "bf16", None, 32, False),
    ("mxfp4", "bf16", "bf16", None, 32, True),
    ("nvfp4_1l", "bf16", "bf16", None, 108, True),
    ("int4_g64", "bf16", "bf16", None, 73, False),
    ("uint4_g64:shift=0.171875", "bf16", "bf16", None, 73, True),
    ("mxfp4", "mxfp4", "mxfp8_e4m3", "mxfp8_e4m3", 108, True),
    ("mxfp4", "mxfp4", "mxfp4", "mxfp4", 108, False),
    ("int4_g64", "int8_g64", "int8_g64", "int8_g64", 73, True),
    ("uint4_g64:shift=0.171875", "int4_g64", "int8_g64", "int8_g64", 108, True),
    ("mxfp4", "mxfp4", "mxfp4", "nvfp4", 32, True),  # two-level mid: torch after the kernel
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_layer_matches_unfused(cuda: torch.device, case: tuple) -> None:
    """The fused layer's output equals the unfused one's to bf16 GEMM rounding (only the GEMMs'
    accumulation order and the one rounding of y differ)."""
    act, bw, ba, mid, rank, smooth = case
    q = _layer(1152, 640, rank, act, bw, ba, mid, smooth, "cuda")
    for kind in ("normal", "outlier"):
        x = _x(2 * 300, 1152, kind, "cuda").view(2, 300, 1152)
        assert q._fused_plan(x) is not None
        fused = q(x)
        assert q.weight._base is q.concat_weight()
        with kernels.use_fused_branch(False):
            unfused = q(x)
        assert fused.shape == unfused.shape == (2, 300, 640)
        assert _rel(fused, unfused) < 6e-3, f"{case} {kind}: {_rel(fused, unfused):.2e}"


def test_shared_input_key_reuses_one_fused_buffer(cuda: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers of one fused q/k/v unit (one smoothing vector, one down-projection, one input key)
    run the fused kernel once for the tensor they all read; a layer with its own key runs it again."""
    qs = [_layer(1152, 640, 32, "mxfp4", "bf16", "bf16", None, True, "cuda") for _ in range(4)]
    for q in qs[1:3]:
        q.smooth, q.branch.down, q.input_key = qs[0].smooth, qs[0].branch.down.clone(), qs[0].input_key
    calls = []
    real = kernels.fused_branch
    monkeypatch.setattr(kernels, "fused_branch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = _x(2 * 300, 1152, "outlier", "cuda").view(2, 300, 1152)
    with torch.no_grad():
        ys = [q(x) for q in qs]
        assert len(calls) == 2  # q, k, v share one; the fourth has its own key
        with kernels.use_fused_branch(False):
            for q, y in zip(qs, ys, strict=True):
                assert _rel(y, q(x)) < 6e-3


def test_conv1x1_and_reassignment(cuda: torch.device) -> None:
    q = _layer(256, 96, 73, "mxfp4", "mxfp4", "mxfp8_e4m3", "mxfp8_e4m3", True, "cuda", conv=True)
    x = _x(2 * 64, 256, "outlier", "cuda").view(2, 8, 8, 256).permute(0, 3, 1, 2)  # NCHW, channels last in memory
    y = q(x)
    with kernels.use_fused_branch(False):
        want = q(x)
    assert y.shape == want.shape == (2, 96, 8, 8) and _rel(y, want) < 6e-3
    cat = q.concat_weight()
    q.weight = q.weight.clone() * 0.5  # reassigned: the next forward rebuilds the concatenation
    y2 = q(x)
    assert q.concat_weight() is not cat and q.weight._base is q.concat_weight()
    assert not torch.equal(y2, y)


def test_autograd_keeps_unfused_path(cuda: torch.device) -> None:
    q = _layer(256, 64, 32, "mxfp4", "bf16", "bf16", None, False, "cuda")
    x = _x(16, 256, "normal", "cuda").requires_grad_(True)
    assert q._fused_plan(x) is None
    with torch.no_grad():
        assert q._fused_plan(x) is not None
    with kernels.use_backend("eager"):
        assert q._fused_plan(x.detach()) is None


def test_cuda_graph_replay(cuda: torch.device) -> None:
    from ptqbench.cudagraph import cuda_graphs

    q = _layer(1152, 256, 108, "mxfp4", "mxfp4", "mxfp8_e4m3", "mxfp8_e4m3", True, "cuda")
    x = _x(512, 1152, "outlier", "cuda")
    eager = q(x)
    with cuda_graphs(q, enabled=True):
        assert torch.equal(q(x), eager) and torch.equal(q(x), eager)
