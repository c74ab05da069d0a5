"""The fast calibration paths of SVDQuant: resident 16-bit rows, cached reference outputs,
model-dtype scoring and the Gram-eigendecomposition SVD, against float64 references."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn

from ptqbench import get_method, smoothing
from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.lowrank import (
    BranchSpec,
    Fitter,
    gram_basis,
    gram_svd,
    iterative_gram_svd,
    make_batches,
    make_units,
    truncated_svd,
)
from ptqbench.smoothing import PROFILE, Rows, smooth_divisor, streamed_sq_error
from ptqbench.stats import LayerStats


def spectrum_matrix(m: int, n: int, outliers: bool, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` (float64) with well-separated top singular values; ``outliers`` scales a
    few input columns by 50 afterwards (the spectrum then is whatever it is)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = 10.0 * 0.85 ** torch.arange(k, dtype=torch.float64)
    w = u * s @ v.T
    if outliers:
        w[:, torch.randperm(n, generator=g)[:4]] *= 50
    return w


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
@pytest.mark.parametrize("outliers", [False, True])
def test_gram_svd_matches_float64_svd(shape, outliers):
    w = spectrum_matrix(*shape, outliers, seed=3)
    rank = 5 if outliers else 12  # the outlier columns crowd the spectrum below the 5th
    u, s, vh = gram_svd(w, rank)
    u0, s0, vh0 = torch.linalg.svd(w, full_matrices=False)
    gaps = (s0[:rank] - s0[1 : rank + 1]) / s0[0]
    assert gaps.min() > 1e-3  # the vectors are determined
    u0, s0, vh0 = u0[:, :rank], s0[:rank], vh0[:rank]
    assert torch.allclose(s, s0, rtol=1e-12, atol=0)
    sign = torch.sign((u * u0).sum(0))
    assert (u * sign - u0).abs().max() < 1e-10 and (vh * sign[:, None] - vh0).abs().max() < 1e-10
    assert ((u * s) @ vh - (u0 * s0) @ vh0).abs().max() < 1e-10 * s0[0]
    u32 = truncated_svd(w.float()[None], rank, "gram")[0]
    assert u32.dtype == torch.float32 and u32.shape == (1, shape[0], rank)


def refinement_iterates(w: torch.Tensor, rank: int, count: int) -> list[torch.Tensor]:
    """The targets of ``count`` refinement iterates of ``w[B, m, n]`` (INT4 g16 residual, the
    first iterate's target ``w`` itself), through the float64 SVD."""
    fmt, targets = get_format("int4_g16"), [w]
    for _ in range(count - 1):
        u, s, vh = torch.linalg.svd(targets[-1], full_matrices=False)
        branch = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        targets.append(w - fmt.quantize((w - branch).float()).double())
    return targets


def assert_same_branch(u, s, vh, target: torch.Tensor, rank: int, tol: float = 1e-10) -> None:
    """``U S V^T`` is the float64 SVD's rank-``rank`` approximation of ``target`` within ``tol`` of
    its largest singular value, and the singular values match to ``1e-12``."""
    u0, s0, vh0 = torch.linalg.svd(target, full_matrices=False)
    assert torch.allclose(s.double().cpu(), s0[..., :rank], rtol=1e-12, atol=0)
    branch0 = (u0[..., :rank] * s0[..., None, :rank]) @ vh0[..., :rank, :]
    assert ((u * s[..., None, :]) @ vh).double().cpu().sub(branch0).abs().max() < tol * s0[..., 0].max()


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
@pytest.mark.parametrize("outliers", [False, True])
def test_iterative_svd_of_refinement_iterates_is_the_float64_svd(shape, outliers):
    """On an iterate (the last branch plus a quantization error) the subspace iteration from the
    last iterate's vectors reaches the float64 SVD's triplets to working precision."""
    rank = 4 if outliers else 8
    w = torch.stack([spectrum_matrix(*shape, outliers, seed) for seed in (1, 2)])
    targets = refinement_iterates(w, rank, 4)
    for last, target in itertools.pairwise(targets):
        u, s, vh = gram_svd(last, rank)
        u1, s1, vh1, done = iterative_gram_svd(target, rank, gram_basis(u, vh))
        assert done.tolist() == [True, True]
        assert_same_branch(u1, s1, vh1, target, rank)
        u1, s1, vh1, done = iterative_gram_svd(target, rank, gram_basis(u, vh), start_values=s)
        assert done.tolist() == [True, True]
        assert_same_branch(u1, s1, vh1, target, rank)


def test_a_warm_start_with_its_values_skips_the_first_rayleigh_ritz(monkeypatch: pytest.MonkeyPatch):
    """With the last iterate's singular values the first filter round runs before any
    Rayleigh-Ritz: one eigenproblem less per solve, the same converged triplets; a start whose
    values are far off (the damped interval's end above wanted eigenvalues) still converges."""
    from ptqbench import lowrank

    w = torch.stack([spectrum_matrix(96, 48, False, seed) for seed in (1, 2)])
    last, target = refinement_iterates(w, 8, 2)
    u, s, vh = gram_svd(last, 8)
    calls = []
    real = lowrank._rayleigh_ritz
    monkeypatch.setattr(lowrank, "_rayleigh_ritz", lambda *a: calls.append(1) or real(*a))
    cold = iterative_gram_svd(target, 8, gram_basis(u, vh))
    n_cold, calls[:] = len(calls), []
    warm = iterative_gram_svd(target, 8, gram_basis(u, vh), start_values=s)
    assert len(calls) == n_cold - 1 and bool(warm[3].all())
    for a, b in zip(cold[:3], warm[:3], strict=True):
        assert torch.allclose(a.abs(), b.abs(), rtol=0, atol=1e-9 * float(s.max()))
    off = iterative_gram_svd(target, 8, gram_basis(u, vh), start_values=s * 40)
    assert bool(off[3].all())
    assert_same_branch(*off[:3], target, 8)


@pytest.mark.parametrize("shape", [(192, 96), (96, 192)])
def test_iterative_svd_of_smoothed_weights_is_the_float64_svd(shape):
    """Search candidates (no start): a flat Gaussian spectrum, outlier input columns, and
    smoothed weights ``W diag(s)`` from heavy-tailed activations, in one batch."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    outlier = w * torch.exp(torch.randn(shape[1], generator=g, dtype=torch.float64))
    act = torch.exp(1.5 * torch.randn(shape[1], generator=g, dtype=torch.float64))
    smoothed = [outlier * (act**a / outlier.abs().amax(0) ** (1 - a)) for a in (0.3, 0.9)]
    target = torch.stack([w, outlier, *smoothed])
    u, s, vh, done = iterative_gram_svd(target, 12)
    assert done.all()
    assert_same_branch(u, s, vh, target, 12, tol=1e-9)  # flat spectra: the angle bound over a gap of ~2 %


def iterative_fitter(rank: int) -> Fitter:
    """SVDQuant's fitter: INT4 g16, an fp16 branch, iterative float64 Gram SVDs."""
    fp16, int4 = get_format("fp16"), get_format("int4_g16")
    return Fitter(BranchSpec(rank, fp16, fp16), int4, int4, "gram", 0, torch.float64, iterative=True)


def test_iterative_svd_without_a_gap_falls_back_to_the_full_solve():
    """Equal singular values at the rank (the top-r subspace is not unique): the iteration does
    not converge, the matrix is flagged and :meth:`Fitter.solve` solves it in full."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 48, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    s = 10.0 * 0.9 ** torch.arange(48, dtype=torch.float64)
    s[8] = s[7]
    target = torch.stack([u * s @ v.T, spectrum_matrix(96, 48, False, 3)])
    assert iterative_gram_svd(target, 8)[3].tolist() == [False, True]
    u1, s1, vh1, full = iterative_fitter(8).solve(target.float())
    assert full.tolist() == [True, False]
    u0, s0, vh0 = truncated_svd(target.float()[:1], 8, "gram")
    assert torch.equal(u1[:1], u0) and torch.equal(s1[:1], s0) and torch.equal(vh1[:1], vh0)


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_iterative_svd_keeps_the_full_solve_choices(svd):
    kw = dict(weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6, num_iters=30, rows="all", svd=svd)
    for seed in range(3):
        layer, stats = outlier_layer(seed, torch.float16)
        fast = get_method("svdquant", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
        full = get_method("svdquant", iterative_svd=False, **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
        assert (fast.info["smooth_pair"], fast.info["best_iteration"]) == (full.info["smooth_pair"],
                                                                           full.info["best_iteration"])
        assert fast.info["svd"] == f"{svd} float64, iterative top-r" and full.info["svd"] == f"{svd} float64"
        assert fast.info["full_svds"] == 0 and full.info["full_svds"] == 11 + len(full.info["iterate_errors"])
        assert torch.allclose(torch.tensor(fast.info["iterate_errors"]), torch.tensor(full.info["iterate_errors"]),
                              rtol=1e-9, atol=0)
        w = full.effective_weight()
        assert torch.allclose(fast.effective_weight(), w, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_a_batch_refines_each_unit_as_alone():
    """Stopped units are no longer solved or scored; the others' iterates are those of the unit
    refined alone (a stopped unit's history is NaN)."""
    layers, all_stats = {}, {}
    for seed in range(3):
        layer, stats = outlier_layer(seed, torch.float32)
        layers[f"l{seed}"], all_stats[f"l{seed}"] = layer, stats
    fitter = iterative_fitter(4)

    def refine(names: list[str]):
        batch = make_batches(make_units({k: layers[k] for k in names}, all_stats), use_rows=True)[0]
        history: list[torch.Tensor] = []
        *_, err, used = fitter.refine(batch, batch.weight, torch.ones(len(names), 64), 30, True, history)
        return err, used, torch.stack(history, 1)

    err, used, history = refine(list(layers))
    assert len(set(used.tolist())) > 1  # the units stop at different iterates
    for i, name in enumerate(layers):
        err1, used1, history1 = refine([name])
        assert int(used[i]) == int(used1[0]) and torch.allclose(err[i], err1[0], rtol=1e-12)
        evaluated = history1.shape[1]
        assert torch.allclose(history[i, :evaluated], history1[0], rtol=1e-12)
        assert history[i, evaluated:].isnan().all()


def test_rows_resident_in_the_model_dtype_only_when_exact():
    g = torch.Generator().manual_seed(0)
    exact = [torch.randn(50, 8, generator=g).half().float() for _ in range(2)]
    rows = Rows(exact, torch.device("cpu"), torch.float16)
    assert rows.resident and rows._resident.dtype == torch.float16
    assert torch.equal(rows.chunk(5, 17, [1]), exact[1][5:17][None])
    inexact = [torch.randn(50, 8, generator=g) for _ in range(2)]
    rows = Rows(inexact, torch.device("cpu"), torch.float16)
    assert rows._resident is None and rows.resident and rows._resident.dtype == torch.float32
    assert torch.equal(rows.stacked(), torch.stack(inexact))


def test_batches_calibrating_at_once_split_the_memory_for_kept_rows(monkeypatch):
    """Each of the batches that :func:`map_batches` runs at once checks the free memory itself:
    inside :func:`sharing_memory` each gets its share, so together they keep no more than one would.
    Rows streamed for want of memory come in the dtype they would be kept in (the same products)."""
    monkeypatch.setattr(smoothing, "free_bytes", lambda device: 1000)
    cpu = torch.device("cpu")
    alone = smoothing.memory_budget(cpu)
    assert alone == 1000 * smoothing.DEVICE_MEMORY_SHARE
    parts = [torch.randn(40, 3, generator=torch.Generator().manual_seed(0)).half().float()]  # 240 B in fp16
    with smoothing.sharing_memory(4):
        assert smoothing.memory_budget(cpu) == alone // 4
        with smoothing.sharing_memory(2):
            assert smoothing.memory_budget(cpu) == alone // 8
        streamed = Rows(parts, cpu, torch.float16)
        assert not streamed.resident  # 240 > 500 / 4
    assert smoothing.memory_budget(cpu) == alone
    kept = Rows(parts, cpu, torch.float16)
    assert kept.resident and streamed.dtype == kept.dtype == torch.float16
    for rows in (streamed, kept):
        got = rows.chunk(3, 17, dtype=None)
        assert got.dtype == torch.float16 and torch.equal(got.float(), parts[0][3:17][None])


def test_model_dtype_scores_match_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    m, n, count = 24, 64, 300
    x = [torch.randn(count, n, generator=g).bfloat16().float() * 3]
    w = (torch.randn(1, m, n, generator=g) / 8).bfloat16().float()
    s = (torch.rand(3, n, generator=g) + 0.5).bfloat16().float()
    fmt = get_format("mxfp4")  # power-of-two scales times fp4 values: exact in bf16
    main_q = fmt.quantize(w * s[:, None, :])
    index = torch.zeros(3, dtype=torch.long)
    fast = streamed_sq_error(Rows(x, torch.device("cpu"), torch.bfloat16), index, w, s, main_q, fmt,
                             dtype=torch.bfloat16, chunk=128)
    full = streamed_sq_error(Rows(x, torch.device("cpu")), index, w, s, main_q, fmt)
    ref = []
    for i in range(3):
        xh = x[0].double() / s[i].double()
        yq = fmt.quantize(xh.float()).double() @ main_q[i].double().T
        ref.append((x[0].double() @ w[0].double().T - yq).pow(2).sum())
    ref = torch.stack(ref)
    assert torch.allclose(full, ref, rtol=1e-5)
    assert torch.allclose(fast, ref, rtol=2e-2)  # bf16 rounding of the outputs, nothing else


def outlier_layer(seed: int, dtype: torch.dtype) -> tuple[nn.Linear, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    n, m, count = 64, 48, 512
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g) * torch.exp(0.5 * torch.randn(n, generator=g)) / 8)
    layer = layer.to(dtype)
    x = (torch.randn(count, n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))).to(dtype).float()
    return layer, LayerStats(absmax=x.abs().amax(0), rows=x, count=count)


@pytest.mark.parametrize("fmt", ["int4_g16", "mxfp4"])
def test_fp16_model_dtype_scoring_keeps_the_float32_choices(fmt):
    """fp16 (PixArt-Sigma's dtype) output rounding is far below the candidates' differences here;
    bf16 (8 mantissa bits) can flip near-ties (measured: 1 in 4 of these layers), as it does in
    deepcompressor's bf16 module forwards."""
    kw = dict(weight_format=fmt, act_format=fmt, rank=4, num_grids=6, num_iters=6, rows="all")
    for seed in range(3):
        layer, stats = outlier_layer(seed, torch.float16)
        fast = get_method("svdquant", score_dtype="model", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
        full = get_method("svdquant", score_dtype="float32", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
        assert fast.info["score_dtype"] == "float16" and full.info["score_dtype"] == "float32"
        assert fast.info["smooth_pair"] == full.info["smooth_pair"]
        assert fast.info["best_iteration"] == full.info["best_iteration"]


def test_float32_layers_score_in_float32_and_gram_svd_gives_the_exact_choices():
    kw = dict(weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6, num_iters=6, rows="all")
    layer, stats = outlier_layer(7, torch.float32)
    exact = get_method("svdquant", svd="exact", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
    gram = get_method("svdquant", svd="gram", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
    assert exact.info["score_dtype"] == "float32" and gram.info["svd"] == "gram float64, iterative top-r"
    assert (exact.info["smooth_pair"], exact.info["best_iteration"]) == (gram.info["smooth_pair"],
                                                                         gram.info["best_iteration"])
    w = exact.effective_weight()
    assert torch.allclose(w, gram.effective_weight(), atol=1e-5 * float(w.abs().max()))


def test_reference_outputs_are_computed_once_per_chunk_and_rows_moved_once():
    layer, stats = outlier_layer(2, torch.float32)
    method = get_method("svdquant", weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6,
                        num_iters=8, rows="all")
    PROFILE.reset()
    PROFILE.enabled = True
    try:
        q = method.quantize_layers({"l": layer}, {"l": stats})["l"]
    finally:
        PROFILE.enabled = False
    assert PROFILE.calls["outputs"] == 1  # one chunk, cached across the 11 candidates and the iterates
    assert PROFILE.calls["transfer"] == 1
    iterates = min(q.info["best_iteration"] + 1, 8)
    assert PROFILE.calls["svd iterative"] == 1 + iterates  # the candidates batched in one, then each iterate
    assert q.info["full_svds"] == 0 and "svd" not in PROFILE.calls
    PROFILE.reset()


def test_score_dtype_is_validated():
    with pytest.raises(UserError, match="score_dtype"):
        get_method("svdquant", weight_format="int4_g16", act_format="int4_g16", rank=4, score_dtype="fp8")


def test_info_holds_each_evaluated_iterate_objective():
    """``iterate_errors``: the squared output error of every iterate the refinement evaluated
    (early stop: up to the first worse one after the best); the best one is the deployed layer's."""
    layer, stats = outlier_layer(3, torch.float32)
    kw = dict(weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6, num_iters=30, rows="all")
    q = get_method("svdquant", **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
    curve, best = q.info["iterate_errors"], q.info["best_iteration"]
    assert len(curve) == min(best + 1, 30)
    assert curve[best - 1] == min(curve[:best]) and (best == 30 or curve[best] > curve[best - 1])
    with torch.no_grad():  # the deployed layer's output error on the same rows is the best objective
        deployed = (layer(stats.rows).double() - q(stats.rows).double()).pow(2).sum()
    assert abs(float(deployed) / curve[best - 1] - 1) < 1e-4
    full = get_method("svdquant", early_stop=False, **kw).quantize_layers({"l": layer}, {"l": stats})["l"]
    assert len(full.info["iterate_errors"]) == 30


def test_per_row_error_sums_to_the_whole_error():
    g = torch.Generator().manual_seed(4)
    y, yq, extra = (torch.randn(3, 50, 24, generator=g).half() for _ in range(3))
    from ptqbench.smoothing import _row_sq_error, _sq_error

    whole = _sq_error(y, yq, extra)
    ref = (y.double() - yq.double() - extra.double()).pow(2).sum((-2, -1))
    assert torch.allclose(_row_sq_error(y, yq, extra).sum(-1).double(), ref, rtol=1e-6)
    assert torch.allclose(whole.double(), ref, rtol=1e-6) and _row_sq_error(y, yq, None).shape == (3, 50)


def test_compiled_gpu_error_equals_eager(cuda: torch.device):
    from ptqbench.smoothing import _sq_error, _sq_error_fn

    g = torch.Generator().manual_seed(5)
    y, yq, extra = (torch.randn(3, 700, 96, generator=g).half().to(cuda) for _ in range(3))
    for ref in (y, y[:1].expand(3, -1, -1)):  # a broadcast reference too (one layer, several candidates)
        for e in (extra, None):
            assert torch.allclose(_sq_error_fn(True)(ref, yq, e), _sq_error(ref, yq, e), rtol=1e-5)


def test_gpu_batches_in_threads_give_the_serial_results(cuda: torch.device):
    from ptqbench.methods import svdquant

    layers, stats = {}, {}
    for i, dtype in enumerate((torch.float16, torch.float16, torch.float32)):
        layer, st = outlier_layer(10 + i, dtype)
        layers[f"l{i}"] = layer.to(cuda)
        stats[f"l{i}"] = LayerStats(absmax=st.absmax.to(cuda), rows=st.rows.to(cuda), count=st.count)
    kw = dict(weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6, num_iters=10, rows="all")
    method = get_method("svdquant", **kw)
    saved = svdquant.GPU_WORKERS
    try:
        svdquant.GPU_WORKERS = 1
        serial = method.quantize_layers(layers, stats)
        svdquant.GPU_WORKERS = 3
        threaded = method.quantize_layers(layers, stats)
    finally:
        svdquant.GPU_WORKERS = saved
    for name in layers:
        assert serial[name].info == threaded[name].info
        assert torch.equal(serial[name].effective_weight(), threaded[name].effective_weight())


def test_gpu_iterative_svd_is_the_float64_svd(cuda: torch.device):
    """On the GPU (cuBLAS float64 products, the small eigenproblems on the CPU) as on the CPU."""
    w = torch.stack([spectrum_matrix(192, 96, outliers, seed) for seed, outliers in ((4, False), (5, True))])
    last, target = refinement_iterates(w, 4, 2)
    u, _, vh = gram_svd(last, 4)
    u1, s1, vh1, done = iterative_gram_svd(target.to(cuda), 4, gram_basis(u, vh).to(cuda))
    assert done.all()
    assert_same_branch(u1, s1, vh1, target, 4)
    u1, s1, vh1, done = iterative_gram_svd(w.to(cuda), 12)
    assert done.all()
    assert_same_branch(u1, s1, vh1, w, 12)


def divided_both_ways(device: torch.device) -> None:
    """``x / smooth_divisor(s)`` in the rows' 16-bit dtype equals the float32 quotient rounded
    (outlier-heavy rows and scales, overflow to inf included); inexact scales stay float32."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(2000, 256, generator=g) * torch.exp(3 * torch.randn(256, generator=g))).to(dtype).to(device)
        s = torch.exp(3 * torch.randn(3, 256, generator=g)).to(dtype).float().to(device)
        assert smooth_divisor(s, dtype).dtype == dtype and smooth_divisor(s + 1e-4, dtype).dtype == torch.float32
        fast = (x[None] / smooth_divisor(s, dtype)[:, None, :]).to(dtype)
        assert torch.equal(fast, (x[None] / s[:, None, :]).to(dtype))


def test_smoothing_divides_in_the_rows_dtype_bit_for_bit():
    divided_both_ways(torch.device("cpu"))


def test_gpu_smoothing_divides_in_the_rows_dtype_bit_for_bit(cuda: torch.device):
    divided_both_ways(cuda)


def fused_case(device: torch.device) -> tuple:
    """Outlier-heavy 16-bit rows of two layers, five candidates (units 0, 0, 1, 1, 0: three runs)
    with 16-bit smoothing, an INT4 main weight and a 16-bit rank-16 branch."""
    g = torch.Generator().manual_seed(3)
    b, m, n, count, r = 2, 96, 256, 3000, 16
    x = [(torch.randn(count, n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))).bfloat16()
         for _ in range(b)]
    w = (torch.randn(b, m, n, generator=g) / 16).bfloat16().float()
    index = torch.tensor([0, 0, 1, 1, 0])
    s = torch.exp(torch.randn(5, n, generator=g)).bfloat16().float()
    fmt = get_format("int4_g64")
    main_q = fmt.quantize(w[index] * s[:, None, :])
    up, down = torch.randn(5, m, r, generator=g) / 4, torch.randn(5, r, n, generator=g) / 64
    rows = Rows([p.to(device) for p in x], device, torch.bfloat16)
    return rows, x, w, index, s, fmt, main_q, up, down


def test_gpu_fused_scores_are_the_deployed_layers_outputs(cuda: torch.device):
    """Fused scoring (``[Qa(x') | h] [Q1 | up]^T``, one GEMM, as the deployed layer's GPU path)
    against a float64 re-derivation of that formula with each rounding of the layer (x' and h to
    bf16, the output to bf16): the same squared error to float32-accumulation noise; the unfused
    scores (two outputs each rounded) differ from them by output rounding only."""
    from ptqbench.smoothing import CandidateBranch

    rows, x, w, index, s, fmt, main_q, up, down = fused_case(cuda)
    bf16 = get_format("bf16")
    put = lambda *t: [v.to(cuda) for v in t]  # noqa: E731
    args = (rows, *put(index, w, s, main_q), fmt, CandidateBranch(*put(up, down), bf16))
    fused = streamed_sq_error(*args, dtype=torch.bfloat16, chunk=1000)
    unfused = streamed_sq_error(*args, dtype=torch.bfloat16, chunk=1000, fused=False)
    ref = []
    for i, u in enumerate(index.tolist()):
        xs = (x[u].float() / s[i]).bfloat16()
        qa = fmt.reference(xs).double()
        h = (xs.double() @ down[i].bfloat16().double().T).bfloat16().double()
        y = (qa @ main_q[i].bfloat16().double().T + h @ up[i].bfloat16().double().T).bfloat16()
        y_ref = (x[u].double() @ w[u].bfloat16().double().T).bfloat16()
        ref.append((y_ref.double() - y.double()).pow(2).sum())
    ref = torch.stack(ref).to(cuda)
    assert torch.allclose(fused, ref, rtol=1e-4), (fused / ref - 1).abs().max()
    assert not torch.equal(fused, unfused) and torch.allclose(unfused, ref, rtol=2e-2)


def test_gpu_svdquant_logs_its_score_path_and_fused_choices_are_near_best_unfused(cuda: torch.device):
    """SVDQuant on the GPU scores as the layer's fused path runs (``score_path``), on the CPU and
    with ``fused_scoring: false`` unfused; where the two paths choose differently, the fused choice
    is a near-tie under the unfused scores (within 0.1 % of their best)."""
    kw = dict(weight_format="int4_g16", act_format="int4_g16", rank=4, num_grids=6, num_iters=8, rows="all")
    fused_m, unfused_m = get_method("svdquant", **kw), get_method("svdquant", fused_scoring=False, **kw)
    for seed in range(4):
        layer, stats = outlier_layer(20 + seed, torch.bfloat16)
        cpu = fused_m.quantize_layers({"l": layer}, {"l": stats})["l"]
        assert cpu.info["score_path"].startswith("unfused")
        layer = layer.to(cuda)
        stats = LayerStats(absmax=stats.absmax.to(cuda), rows=stats.rows.to(cuda), count=stats.count)
        fused = fused_m.quantize_layers({"l": layer}, {"l": stats})["l"]
        unfused = unfused_m.quantize_layers({"l": layer}, {"l": stats})["l"]
        assert fused.info["score_path"].startswith("fused") and unfused.info["score_path"].startswith("unfused")
        pairs = smoothing_pairs(kw["num_grids"])
        errors = unfused_search_errors(layer, stats, unfused_m)
        chosen = errors[pairs.index(fused.info["smooth_pair"])]
        assert chosen <= errors.min() * 1.001, (seed, fused.info["smooth_pair"], unfused.info["smooth_pair"])


def smoothing_pairs(num_grids: int) -> list[str]:
    from ptqbench.smoothing import pair_label, smoothing_grid

    return [pair_label(p) for p in smoothing_grid(num_grids)]


def unfused_search_errors(layer: nn.Module, stats: LayerStats, method) -> torch.Tensor:
    """The unfused search's error of every candidate pair (the method's own search, unfused)."""
    from ptqbench.smoothing import smoothing_grid

    batch = make_batches(make_units({"l": layer}, {"l": stats}, True), use_rows=True)[0]
    fitter = method._fitter(method.branch_spec(batch.smooth_dtype), layer.weight.dtype)
    recorded = []
    real = fitter.error

    def record(*args, **kw):
        recorded.append(out := real(*args, **kw))
        return out

    object.__setattr__(fitter, "error", record)
    fitter.search(batch, smoothing_grid(method.num_grids))
    return torch.cat(recorded).cpu()


def test_gpu_row_sq_error_kernel_equals_eager(cuda: torch.device):
    """The Triton per-row squared error (references read through each candidate's index, with and
    without a branch output, bf16 and float32, a width that is not a multiple of its block) equals
    the eager float32 sums to summation order."""
    from ptqbench import kernels
    from ptqbench.smoothing import _row_sq_error

    g = torch.Generator().manual_seed(9)
    pos = torch.tensor([1, 0, 0, 2, 1])
    for dtype, m in ((torch.bfloat16, 3456), (torch.float32, 700)):
        y = (torch.randn(3, 301, m, generator=g) * 4).to(dtype).to(cuda)
        yq, extra = ((torch.randn(5, 301, m, generator=g) * 4).to(dtype).to(cuda) for _ in range(2))
        for e in (extra, None):
            want = _row_sq_error(y[pos.to(cuda)], yq, e)
            got = kernels.row_sq_error(y, yq, e, pos)
            assert got.shape == (5, 301) and torch.allclose(got, want, rtol=1e-5), (got / want - 1).abs().max()


def test_gpu_threads_making_the_first_linalg_call_at_once(cuda: torch.device, tmp_path):
    """In a fresh process, :func:`map_batches` workers whose first CUDA linalg calls come at the
    same moment (torch loads its linalg library on the first call; two threads doing that at once
    fail with "lazy wrapper should be called at most once" unless it is loaded first)."""
    script = tmp_path / "first_linalg.py"
    script.write_text(
        "import threading, types\n"
        "import torch\n"
        "from ptqbench.lowrank import map_batches\n"
        "eye = torch.eye(8, device='cuda')[None].repeat(4, 1, 1)\n"
        "batches = [types.SimpleNamespace(weight=eye) for _ in range(4)]\n"
        "barrier = threading.Barrier(4)\n"
        "def work(b):\n"
        "    barrier.wait()\n"
        "    return torch.linalg.cholesky_ex(b.weight).L.sum().item()\n"
        "assert map_batches(batches, work, 4) == [32.0] * 4\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=300)
