"""Parity: ptqbench's SVDQuant against an independent float64 re-derivation of deepcompressor's
algorithm (tests/svdquant_reference.py), on real all-MiniLM-L6-v2 weights and real activations of
the shipped prompt sets.

Calibration rows are the inputs of each layer while MiniLM reads the ``builtin-calib`` prompts
(24 prompts, 351 tokens, all of them used, as deepcompressor's ``sample_size: -1``); held-out
rows come from the disjoint ``builtin`` prompts (48 prompts, 814 tokens). Both sides get the same
rows and abs-max; the method runs with the exact SVD and explicit settings (rank 32, branch in the
model's float32 dtype, early stop), and must choose the same (alpha, beta) pair and refinement
iterate, give the same effective weight within float tolerance and the same held-out output
error to 3 significant digits.

The pair and the iterate are compared with the float64 re-derivation, and so is the held-out
error. The effective weight after k refinement iterates depends on arithmetic precision (a residual
element rounded the other way moves the next SVD): the float32 and float64 runs of the
re-derivation itself differ by up to 0.5% of ||W|| at iterate 3. It is therefore compared with the
re-derivation at deepcompressor's own precision (``develop_dtype`` float32, float64 SVD): at most
0.1% of the elements may be apart by more than 1e-3 max|W| (one quantization step: a value
rounded the other way), and the rest within 1e-4 of ||W|| (relative Frobenius distance).

While the method's SVD is not float64 (its ``info["svd"]`` says so: before the deepcompressor
rewrite of issue 11), the effective-weight and held-out checks (and, for the dead channel, the
selection) must fail, and the case is an expected failure (issue 11, items 6 and 7).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from svdquant_reference import Reference

from ptqbench import get_format, get_method
from ptqbench.analysis import relative_output_error
from ptqbench.prompts import get_prompt_set
from ptqbench.stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")

QKV = ("blk0.attn.to_q", "blk0.attn.to_k", "blk0.attn.to_v")
MODULES = {  # our name (q/k/v named as in diffusers, so the method can fuse them) -> MiniLM module
    QKV[0]: "encoder.layer.0.attention.self.query",
    QKV[1]: "encoder.layer.0.attention.self.key",
    QKV[2]: "encoder.layer.0.attention.self.value",
    "blk1.attn.out": "encoder.layer.1.attention.output.dense",  # 384 -> 384
    "blk2.ffn.up": "encoder.layer.2.intermediate.dense",  # 384 -> 1536 (LayerNorm output)
    "blk1.ffn.down": "encoder.layer.1.output.dense",  # 1536 -> 384 (GELU output)
}
RANK = 32
ITERS = 3
OTHER_ELEMENTS = 1e-3  # share of effective-weight elements allowed one rounding step apart
W_EFF_RTOL = 1e-4  # relative Frobenius distance of the effective weights on the other elements


# ----------------------------------------------------------------------------- real weights and rows


@pytest.fixture(scope="module")
def eager_formats():
    """The formats' eager reference (compiling them costs more than it saves on these few calls;
    every path gives the same values, tests/test_formats.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTQBENCH_COMPILE", "0")
        yield


@pytest.fixture(scope="module")
def layers(minilm):
    model, _ = minilm
    return {name: model.get_submodule(path) for name, path in MODULES.items()}


def _inputs(minilm, layers, prompt_set: str) -> dict[str, torch.Tensor]:
    """Every input row of each layer while MiniLM reads the prompts (one at a time: no padding)."""
    model, tokenizer = minilm
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        return lambda _module, args: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for text in get_prompt_set(prompt_set).prompts:
                model(**tokenizer(text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(rows).float() for name, rows in seen.items()}


@pytest.fixture(scope="module")
def dead(layers):
    """The value projection with one dead input channel (a zero weight column): every
    ``(a, 1 - a)`` candidate divides by ``max|W_j|^b = 0``."""
    layer = copy.deepcopy(layers["blk0.attn.to_v"])
    layer.weight.data[:, 5] = 0
    return {"blk0.attn.dead": layer}


@pytest.fixture(scope="module")
def calib(minilm, layers):
    return _inputs(minilm, layers, "builtin-calib")


@pytest.fixture(scope="module")
def heldout(minilm, layers):
    return _inputs(minilm, layers, "builtin")


# ----------------------------------------------------------------------------- both sides


def _pair(info: dict) -> tuple[float, float]:
    """The chosen (alpha, beta) from ``info["smooth_pair"]`` (``'a=0.65,b=0'``, or a pair)."""
    value = info["smooth_pair"]
    if isinstance(value, str):
        a, b = re.fullmatch(r"a=([-+\d.e]+),b=([-+\d.e]+)", value).groups()
        return float(a), float(b)
    return float(value[0]), float(value[1])


BRANCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # the method's branch format -> the reference's


def _ours(layers, calib, names, fmt: str, share_qkv: bool, num_grids: int, branch: str) -> dict:
    method = get_method(
        "svdquant", weight_format=fmt, act_format=fmt, rank=RANK, num_grids=num_grids,
        rows=max(int(calib[n].shape[0]) for n in names), num_iters=ITERS, early_stop=True,
        share_qkv=share_qkv, svd="exact", branch_format=branch, branch_act_format=branch,
    )
    stats = {n: LayerStats(absmax=calib[n].abs().amax(0), rows=calib[n], count=int(calib[n].shape[0])) for n in names}
    return method.quantize_layers({n: layers[n] for n in names}, stats)


def _reference(
    layers, calib, names, fmt: str, share_qkv: bool, num_grids: int, branch: str, dtype: torch.dtype
) -> dict:
    ref = Reference(
        get_format(fmt), get_format(fmt), RANK, num_grids, ITERS, early_stop=True, dtype=dtype,
        branch_dtype=BRANCH_DTYPES[branch],
    )
    out = {}
    for group in [list(names)] if share_qkv else [[n] for n in names]:
        x = calib[group[0]]
        assert all(torch.equal(calib[n], x) for n in group)  # a fused group reads one input
        out.update(zip(group, ref.run(x, x.abs().amax(0), [layers[n].weight for n in group]), strict=True))
    return out


def _same_3_digits(a: float, b: float) -> bool:
    return abs(a - b) <= 0.5 * 10 ** (math.floor(math.log10(abs(b))) - 2)


def _selection(ours: dict, theirs: dict) -> list[str]:
    """Layers whose chosen pair or kept iterate differ."""
    bad = []
    for name, want in theirs.items():
        got = ours[name].info
        if _pair(got) != pytest.approx(want.pair, abs=1e-9) or got["best_iteration"] != want.iteration:
            bad.append(f"{name}: pair {_pair(got)} iterate {got['best_iteration']}, want {want.pair} {want.iteration}")
    return bad


def _weights(ours: dict, theirs: dict) -> list[str]:
    """Layers whose effective weights differ beyond float tolerance."""
    bad = []
    for name, want in theirs.items():
        got, ref = ours[name].effective_weight().double(), want.effective_weight()
        apart = (got - ref).abs() > 1e-3 * ref.abs().max()  # a rounding step apart
        dist = float(torch.linalg.norm((got - ref)[~apart]) / torch.linalg.norm(ref))
        if dist > W_EFF_RTOL or float(apart.double().mean()) > OTHER_ELEMENTS:
            full = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
            bad.append(
                f"{name}: W_eff distance {full:.3g} ({dist:.3g} without the "
                f"{int(apart.sum())}/{apart.numel()} elements more than a rounding step apart)"
            )
    return bad


def _heldout(layers, heldout, ours: dict, theirs: dict) -> list[str]:
    """Layers whose held-out relative output errors differ in their first 3 significant digits."""
    bad = []
    for name, want in theirs.items():
        layer = layers[name]
        got = relative_output_error(layer, ours[name], heldout[name])
        expected = want.relative_output_error(heldout[name], layer.weight, layer.bias)
        if not _same_3_digits(got, expected):
            bad.append(f"{name}: held-out output error {got:.5g}, want {expected:.5g}")
    return bad


def _float64_svd(ours: dict) -> bool:
    """Whether the method says it took deepcompressor's float64 SVD (``info["svd"]``)."""
    return all("float64" in str(q.info.get("svd", "")) for q in ours.values())


def _parity(
    layers, calib, heldout, names, fmt: str, share_qkv: bool, num_grids: int, branch: str = "fp32",
    gated: str = "weights",
) -> None:
    """Compare the method with the re-derivation. ``gated``: the checks that must fail while the
    method's SVD is not float64 (``weights``: W_eff and held-out error; ``all``: the selection too)."""
    case = (names, fmt, share_qkv, num_grids, branch)
    ours = _ours(layers, calib, *case)
    exact = _reference(layers, calib, *case, torch.float64)
    # W_eff after k refinement iterates is sensitive to arithmetic precision (a residual element on
    # the other side of a rounding boundary moves the next SVD): float32 and float64 runs of the
    # reference itself differ by up to 0.5% of ||W|| at iterate 3 (mxfp4). So W_eff is compared with
    # the reference at deepcompressor's precision (develop dtype float32, float64 SVD).
    develop = _reference(layers, calib, *case, torch.float32)
    selection = _selection(ours, exact) + _selection(ours, develop)
    if gated == "weights":
        assert not selection
    mismatches = _weights(ours, develop) + _heldout(layers, heldout, ours, exact)
    mismatches += selection if gated == "all" else []
    if not _float64_svd(ours):
        # Issue 11 items 6 and 7: the method's exact SVD runs in float32 (deepcompressor: float64), which
        # moves W_eff by about 1% of ||W|| after 3 iterates, and (before the same rewrite) a NaN/inf scale
        # reset only its channel: the mismatch must show until the method is deepcompressor's.
        assert mismatches, "the method matches without a float64 SVD: update this test"
        pytest.xfail("float32 SVD (deepcompressor: float64): " + "; ".join(mismatches))
    assert not mismatches


# ----------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("share_qkv", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("fmt", ["int4_g64", "mxfp4"])
def test_qkv_matches_the_reference(layers, calib, heldout, fmt, share_qkv):
    """q/k/v of one attention, each on its own or fused (one smoothing vector and one R from the
    SVD of [Wq; Wk; Wv], the smoothing scored on the three outputs together); 3 candidates."""
    _parity(layers, calib, heldout, QKV, fmt, share_qkv, num_grids=2)


@pytest.mark.parametrize(
    ("name", "fmt", "num_grids", "branch"),
    [
        ("blk1.attn.out", "int4_g64", 20, "fp32"),  # deepcompressor's full grid: 39 candidates
        ("blk1.attn.out", "mxfp4", 2, "bf16"),  # a 16-bit branch: factors and branch input in bf16
        ("blk2.ffn.up", "mxfp4", 4, "fp32"),
        ("blk1.ffn.down", "int4_g64", 2, "fp32"),
    ],
)
def test_layer_matches_the_reference(layers, calib, heldout, name, fmt, num_grids, branch):
    _parity(layers, calib, heldout, (name,), fmt, share_qkv=False, num_grids=num_grids, branch=branch)


def test_dead_channel_resets_the_whole_scale(dead, calib, heldout):
    """A NaN/inf scale resets the whole vector to 1 (deepcompressor ``get_smooth_scale``), so every
    (a, 1 - a) candidate is the identity; a per-channel reset keeps them apart (and here picks
    (0.75, 0.25) with 5 grid steps)."""
    name = "blk0.attn.dead"
    rows, held = {name: calib["blk0.attn.to_v"]}, {name: heldout["blk0.attn.to_v"]}
    _parity(dead, rows, held, (name,), "int4_g64", share_qkv=False, num_grids=4, gated="all")
