"""The refinement's Gram objective (:mod:`ptqbench.rowgram`) against a float64 per-row re-derivation,
on random and outlier-heavy fp16 rows, for every row-wise activation format family."""

from __future__ import annotations

import pytest
import torch

import ptqbench.rowgram as rowgram
from ptqbench import get_method
from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.lowrank import BranchSpec, Fitter, make_batches, make_units
from ptqbench.rowgram import RowGram, applies
from ptqbench.smoothing import Rows, quantize_stack
from ptqbench.stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")
ROW_WISE = ("int4_g64", "int4_pc", "uint4_g64", "int8_g64", "mxfp4", "mxint4", "mxfp6_e2m3", "mxfp8_e4m3", "nvfp4_1l")


def problem(outliers: bool, n: int = 128, m: int = 96, rows: int = 6000, rank: int = 8, fmt: str = "int4_g64"):
    """fp16 rows, a fp16 weight, its 16-bit smoothing and a quantized SVD branch (main, up, down)."""
    g = torch.Generator().manual_seed(7 + outliers)
    x = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(n, generator=g) * (1.5 if outliers else 0.3))
    if outliers:
        x[:: 97, 5] *= 60.0  # rare huge activations in one channel
        x[:, 9] += 20.0  # and a channel with a large offset
    if fmt.startswith("u"):
        x = x.abs()
    x = x.half()
    w = (torch.randn(m, n, generator=g) * torch.exp(0.5 * torch.randn(n, generator=g)) / n**0.5).half().float()
    s = (x.float().abs().amax(0).sqrt() / w.abs().amax(0).sqrt()).half().float()
    ws = w * s
    u, sv, vh = torch.linalg.svd(ws.double())
    up, down = (u[:, :rank] * sv[:rank]).half().float(), vh[:rank].half().float()
    main = get_format(fmt).quantize(ws - up @ down)
    return x, w, s, main, up, down


def cpu_gram(x, w, s, fmt) -> RowGram:
    rows = Rows([x], torch.device("cpu"), torch.float16)
    return RowGram.build(rows, s[None], w[None], get_format(fmt), torch.float16)


def per_row_float64(x, w, s, main, up, down, fmt) -> float:
    """``||Qa(x^) Q^T + x^ D^T U^T - x W^T||^2`` with every product in float64 (x^ rounded to fp16)."""
    x_hat = (x.float() / s).half()
    xq = quantize_stack(get_format(fmt), x_hat).double()
    y = xq @ main.half().double().T - x.double() @ w.half().double().T
    if up is not None:
        y = y + x_hat.double() @ down.half().double().T @ up.half().double().T
    return float(y.pow(2).sum())


@pytest.mark.parametrize("fmt", ROW_WISE)
@pytest.mark.parametrize("outliers", [False, True])
def test_gram_objective_is_the_per_row_objective(fmt, outliers):
    x, w, s, main, up, down = problem(outliers, fmt=fmt)
    gram = cpu_gram(x, w, s, fmt)
    for branch in ((up, down), (None, None)):
        want = per_row_float64(x, w, s, main, *branch, fmt)
        got = float(gram.sq_error(main[None], *(b if b is None else b[None] for b in branch))[0])
        assert got == pytest.approx(want, rel=1e-11), (fmt, outliers, branch[0] is None)


@pytest.mark.parametrize("fmt", ROW_WISE)
def test_tensor_core_features_are_exact_in_fp16(fmt, monkeypatch):
    """The GPU path's 16-bit ``E = Qa(x^) - x^`` is exact, and float32 sums over CHUNK_ROWS rows keep
    the objective to 1e-6 of itself: emulated on the CPU (fp16 arithmetic rounds the same way)."""
    x, w, s, main, up, down = problem(True, fmt=fmt)
    feats = rowgram._features(x[None], s[None], get_format(fmt), torch.float16, tensor_cores=True)
    x_hat = (x.float() / s).half()
    exact = quantize_stack(get_format(fmt), x_hat).double() - x_hat.double()
    assert torch.equal(feats["e"][0].double(), exact), fmt
    real = rowgram._features
    monkeypatch.setattr(rowgram, "_features", lambda x_, s_, f_, d_, tc: real(x_, s_, f_, d_, True))
    monkeypatch.setattr(rowgram, "_gram", lambda a, b: (a.float().mT @ b.float()).double())
    gram = cpu_gram(x, w, s, fmt)
    want = per_row_float64(x, w, s, main, up, down, fmt)
    assert float(gram.sq_error(main[None], up[None], down[None])[0]) == pytest.approx(want, rel=1e-6), fmt


def test_applies_only_where_the_objective_is_a_quadratic_form():
    fp16, bf16, half = get_format("fp16"), get_format("bf16"), torch.float16
    assert applies(get_format("int4_g64"), fp16, None, half)
    assert applies(get_format("mxfp4"), None, None, half)  # rank 0
    assert not applies(get_format("nvfp4"), fp16, None, half)  # a per-tensor scale: not row-wise
    assert not applies(get_format("int8_pt"), fp16, None, half)
    assert not applies(get_format("int4_g64"), get_format("mxfp8_e4m3"), None, half)  # quantized branch input
    assert not applies(get_format("int4_g64"), fp16, get_format("mxfp8_e4m3"), half)  # quantized intermediate
    assert not applies(get_format("int4_g64"), bf16, None, half)  # the cast would round x^


def test_refinement_on_gram_keeps_the_per_row_iterates():
    """Fitter.refine scores the same iterates whichever way; the errors agree to float32 rounding."""
    x, w, s, *_ = problem(True)
    layer = torch.nn.Linear(w.shape[1], w.shape[0]).half()
    with torch.no_grad():
        layer.weight.copy_(w)
    stats = {"l": LayerStats(absmax=x.float().abs().amax(0), rows=x, count=x.shape[0])}
    batch = make_batches(make_units({"l": layer}, stats), use_rows=True)[0]
    spec = BranchSpec(8, get_format("fp16"), get_format("fp16"))
    runs = {}
    for how in ("gram", "rows"):
        fitter = Fitter(spec, get_format("int4_g64"), get_format("int4_g64"), "exact", 0, torch.float64,
                        score_dtype=torch.float32, refine_objective=how)
        assert fitter.refines_on_gram(batch) == (how == "gram")
        history: list[torch.Tensor] = []
        *_, used = fitter.refine(batch, batch.weight * s, s[None], 12, False, history)
        runs[how] = (int(used), torch.cat(history))
    (it_gram, e_gram), (it_rows, e_rows) = runs["gram"], runs["rows"]
    assert it_gram == it_rows
    assert torch.allclose(e_gram, e_rows, rtol=1e-5)


@pytest.mark.parametrize("fmt", ("int4_g64", "mxfp4"))
def test_gpu_gram_matches_float64(cuda, fmt):
    """On a GPU: 16-bit tensor-core products (float32 out) over CHUNK_ROWS-row chunks, float64 sums.
    The tensor cores' float32 accumulation is coarser than the CPU's (5e-6 of the objective on an
    H200, against 1e-7 emulated on the CPU)."""
    x, w, s, main, up, down = problem(True, rows=3 * rowgram.CHUNK_ROWS + 5, fmt=fmt)
    rows = Rows([x.to(cuda)], cuda, torch.float16)
    gram = RowGram.build(rows, s[None].to(cuda), w[None].to(cuda), get_format(fmt), torch.float16)
    got = float(gram.sq_error(main[None].to(cuda), up[None].to(cuda), down[None].to(cuda))[0])
    assert got == pytest.approx(per_row_float64(x, w, s, main, up, down, fmt), rel=2e-5)


def test_svdquant_searches_on_a_subset_and_refines_on_every_row():
    x, w, *_ = problem(True, rows=2000)
    layer = torch.nn.Linear(w.shape[1], w.shape[0]).half()
    with torch.no_grad():
        layer.weight.copy_(w)
    stats = {"l": LayerStats(absmax=x.float().abs().amax(0), rows=x, count=x.shape[0])}
    common = dict(weight_format="int4_g64", act_format="int4_g64", rank=8, num_grids=4, num_iters=4, rows="all")
    sub = get_method("svdquant", search_rows=500, **common).quantize_layers({"l": layer}, stats)["l"].info
    assert sub["objective"] == "output MSE on 2000 rows (smoothing searched on 500 of them)"
    assert sub["refine_objective"] == "float64 Gram of the rows"
    full = get_method("svdquant", search_rows=2000, **common).quantize_layers({"l": layer}, stats)["l"].info
    rows = get_method("svdquant", refine_objective="rows", **common).quantize_layers({"l": layer}, stats)["l"].info
    assert full["objective"] == "output MSE on 2000 rows" and rows["refine_objective"] == "per row"
    assert (full["smooth_pair"], full["best_iteration"]) == (rows["smooth_pair"], rows["best_iteration"])
    for bad in ({"search_rows": 0}, {"refine_objective": "adam"}):
        with pytest.raises(UserError, match=next(iter(bad))):
            get_method("svdquant", **bad)
