"""Methods on real trained weights (all-MiniLM-L6-v2) and real activations of real sentences."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqbench import get_method
from ptqbench.analysis import relative_output_error, relative_weight_error
from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.layers import QuantLinear
from ptqbench.lowrank import BranchSpec, Fitter, make_batches, make_units, truncated_svd
from ptqbench.memory import LayerShape, model_bits, qkv_group, solve_rank
from ptqbench.methods.loraq import Objective, is_int_format
from ptqbench.rotation import get_rotation, hadamard_matrix, random_orthogonal, randomized_hadamard
from ptqbench.smoothing import (
    CandidateBranch,
    Rows,
    quantize_stack,
    smooth_scale,
    smoothing_grid,
    streamed_sq_error,
)
from ptqbench.stats import ALL_ROWS, StatsSpec, collect_stats

CALIB = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Diffusion transformers turn random noise into detailed images one step at a time.",
    "Paris is the capital of France and has been a centre of art for centuries.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Astronomers observed a distant galaxy whose light left it ten billion years ago.",
    "Honeybees communicate the direction of flowers through a waggle dance.",
)
EVAL = (
    "She sold seashells by the seashore on a windy afternoon in late September.",
    "Matrix multiplications dominate the cost of running large neural networks.",
    "Our train was delayed by forty minutes because of a signal failure at the junction.",
    "The museum's new exhibition traces the history of printing from woodblocks to lasers.",
)
QUERY = "encoder.layer.0.attention.self.query"  # 384 -> 384
UP = "encoder.layer.2.intermediate.dense"  # 384 -> 1536, LayerNorm output input (outlier channels)
DOWN = "encoder.layer.1.output.dense"  # 1536 -> 384, post-GELU input (outlier channels)
TESTED = (QUERY, UP, DOWN)
MX = {"weight_format": "mxfp4", "act_format": "mxfp4"}
W8A8 = {"weight_format": "int8_pc", "act_format": "int8_pc"}


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def layers(minilm):
    model, _ = minilm
    return {name: model.get_submodule(name) for name in TESTED}


def _feed(minilm, sentences):
    model, tokenizer = minilm

    def run():
        for text in sentences:
            model(**tokenizer(text, return_tensors="pt"))

    return run


@pytest.fixture(scope="module")
def calib(minilm, layers):
    """Calibration statistics from forward passes of real sentences."""
    spec = StatsSpec(absmax=True, rows=256, xtx="full")
    return collect_stats(layers, spec, _feed(minilm, CALIB), seed=0)


@pytest.fixture(scope="module")
def eval_rows(minilm, layers):
    """Held-out input rows (other sentences) for output errors."""
    stats = collect_stats(layers, StatsSpec(rows=512), _feed(minilm, EVAL), seed=1)
    return {name: st.rows for name, st in stats.items()}


def _wave(layers, method, stats=None):
    return method.quantize_layers(layers, stats)


# ----------------------------------------------------------------------------- rotations


def test_rotations_are_orthogonal_and_seeded():
    h = hadamard_matrix(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert set((h.abs() * 8**0.5).flatten().round(decimals=9).tolist()) == {1.0}
    for build in (randomized_hadamard, random_orthogonal):
        a, b, c = build(16, 3), build(16, 3), build(16, 4)
        assert torch.allclose(a @ a.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert get_rotation("hadamard", 64).label == "hadamard"
    assert get_rotation("hadamard", 62, seed=5).label == "hadamard[60+2]"  # tests/test_rotation.py: any rank
    assert torch.equal(get_rotation("identity", 5).matrix, torch.eye(5, dtype=torch.float64))
    with pytest.raises(UserError, match="valid: hadamard, random, identity"):
        get_rotation("cayley", 4)


def test_randomized_svd_matches_exact_on_real_weights(layers):
    w = layers[UP].weight.detach()
    u, s, vh = truncated_svd(w, 32, "exact")
    u2, s2, vh2 = truncated_svd(w, 32, "randomized", seed=1)
    exact = torch.linalg.norm(w - (u * s) @ vh) / torch.linalg.norm(w)
    approx = torch.linalg.norm(w - (u2 * s2) @ vh2) / torch.linalg.norm(w)
    assert exact <= approx < exact * 1.001
    assert torch.allclose(u2.T @ u2, torch.eye(32), atol=1e-4)
    assert torch.allclose(s2, s, rtol=1e-2)


def test_smoothing_grid_is_deepcompressors():
    grid = smoothing_grid(20)
    assert len(grid) == 39 and grid[0] == (0.0, 0.0)
    assert (0.05, 0.0) in grid and (0.95, 0.0) in grid and (0.25, 0.75) in grid


# ----------------------------------------------------------------------------- exactness and accounting


def test_16bit_formats_give_only_float_rounding_error(layers, calib):
    fp16 = {"weight_format": "fp16", "act_format": "fp16"}
    branch = {"branch_format": "fp16", "branch_act_format": "fp16"}
    methods = [
        get_method("rtn", **fp16),
        get_method("smoothquant", **fp16),
        get_method("svdquant", **fp16, **branch, num_grids=2),
        get_method("loraq", **fp16, **branch, steps=0, num_grids=2),
    ]
    for method in methods:
        for stats in (None, calib):
            for name, q in _wave(layers, method, stats).items():
                assert relative_weight_error(layers[name], q) < 2e-3, (method.name, name)


def test_bits_match_layer_bits_and_branch_counts(layers, calib):
    methods = [
        get_method("rtn", **MX),
        get_method("smoothquant", **MX),
        get_method("svdquant", **MX, rank=16, num_grids=2, num_iters=2),
        get_method("loraq", **MX, rank=16, steps=2, num_grids=2),
    ]
    for method in methods:
        for stats in (None, calib):
            for name, q in _wave(layers, method, stats).items():
                layer = layers[name]
                smoothed = q.smooth is not None
                assert smoothed == (stats is not None and method.smooths)
                assert q.bits() == method.layer_bits(layer.out_features, layer.in_features, True, smoothed=smoothed)
                if stats is not None:
                    assert q.bits() == method.layer_bits(layer.out_features, layer.in_features, True)


# ----------------------------------------------------------------------------- quality on real weights


def test_svdquant_error_falls_with_rank(layers):
    errors = [
        relative_weight_error(layers[UP], get_method("svdquant", **MX, rank=r, num_iters=1).quantize_layer(layers[UP]))
        for r in (0, 16, 32, 64, 128)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_svdquant_beats_rtn_on_every_layer(layers, calib, eval_rows):
    for fmt in ("mxfp4", "int4_g64"):
        formats = {"weight_format": fmt, "act_format": fmt}
        rtn = _wave(layers, get_method("rtn", **formats))
        svd = _wave(layers, get_method("svdquant", **formats, num_iters=1))
        svd_cal = _wave(layers, get_method("svdquant", **formats, num_grids=4, num_iters=1), calib)
        for name, layer in layers.items():
            assert relative_weight_error(layer, svd[name]) < relative_weight_error(layer, rtn[name]), (fmt, name)
            out_rtn = relative_output_error(layer, rtn[name], eval_rows[name])
            assert relative_output_error(layer, svd_cal[name], eval_rows[name]) < out_rtn, (fmt, name)


def test_svdquant_search_with_the_branch_in_place_beats_no_smoothing(layers, calib, eval_rows):
    int4 = {"weight_format": "int4_g64", "act_format": "int4_g64"}
    layer = layers[UP]
    searched = get_method("svdquant", **int4).quantize_layer(layer, calib[UP])
    plain = get_method("svdquant", **int4, smoothing=False).quantize_layer(layer, calib[UP])
    assert searched.info["smoothing"] == "searched on output MSE" and plain.smooth is None
    assert searched.info["smooth_pair"] != "a=0,b=0"
    e_searched = relative_output_error(layer, searched, eval_rows[UP])
    assert e_searched < 0.9 * relative_output_error(layer, plain, eval_rows[UP])


def test_svdquant_refinement_keeps_the_best_iterate(layers, calib, eval_rows):
    layer, stats = layers[QUERY], calib[QUERY]
    one = get_method("svdquant", **MX, num_grids=2, num_iters=1).quantize_layer(layer, stats)
    early = get_method("svdquant", **MX, num_grids=2).quantize_layer(layer, stats)  # 100 iterations, early stop
    fixed = get_method("svdquant", **MX, num_grids=2, num_iters=6, early_stop=False).quantize_layer(layer, stats)
    assert one.info["best_iteration"] == 1 and early.info["best_iteration"] > 1
    assert 1 <= fixed.info["best_iteration"] <= 6
    x = stats.rows
    assert relative_output_error(layer, early, x) < relative_output_error(layer, one, x)
    assert relative_output_error(layer, fixed, x) < relative_output_error(layer, one, x)
    assert relative_output_error(layer, early, eval_rows[QUERY]) < relative_output_error(layer, one, eval_rows[QUERY])


def test_loraq_improves_on_its_init_and_beats_svdquant_at_equal_memory(layers):
    shapes = [LayerShape(n, lay.out_features, lay.in_features, True) for n, lay in layers.items()]
    # deepcompressor's SVDQuant (100 refinement iterates, early stop); its float64 SVDs through the Gram
    # matrix: the same errors to 6 digits and the same best iterates here as svd="exact", 3x faster
    reference = get_method("svdquant", **MX, rank=32, svd="gram")
    candidate = get_method("loraq", **MX, branch_format="mxfp8_e4m3", branch_act_format="mxfp8_e4m3", steps=40)
    rank = solve_rank(reference, candidate, shapes)
    assert 55 <= rank <= 64
    candidate = dataclasses.replace(candidate, rank=rank)
    init = _wave(layers, dataclasses.replace(candidate, steps=0))
    trained = _wave(layers, candidate)
    svd = _wave(layers, reference)
    for name, layer in layers.items():
        e_init = relative_weight_error(layer, init[name])
        e_opt = relative_weight_error(layer, trained[name])
        e_svd = relative_weight_error(layer, svd[name])
        assert e_opt < 0.8 * e_init and e_opt < 0.85 * e_svd, (name, e_init, e_opt, e_svd)
        assert trained[name].bits() <= svd[name].bits()
        info = trained[name].info
        assert info["objective_rel_best"] < info["objective_rel_init"]
        assert info["objective_rel_best"] == pytest.approx(e_opt, rel=1e-3)  # the weight objective is the error


def test_smoothquant_lowers_w8a8_output_error_on_outlier_layers(layers, calib, eval_rows):
    rtn = get_method("rtn", **W8A8)
    for method in (get_method("smoothquant", **W8A8), get_method("smoothquant", **W8A8, alpha_search=True)):
        for name in (QUERY, UP):  # LayerNorm outputs; post-GELU inputs (DOWN) do not gain here
            layer = layers[name]
            q = method.quantize_layer(layer, calib[name])
            assert q.smooth is not None and q.smooth.dtype == layer.weight.dtype
            assert torch.equal(q.smooth, q.smooth.bfloat16().float())  # stored at 16 bits
            e_sq = relative_output_error(layer, q, eval_rows[name])
            e_rtn = relative_output_error(layer, rtn.quantize_layer(layer), eval_rows[name])
            assert e_sq < 0.9 * e_rtn, (method.label(), name, e_sq, e_rtn)


def test_smoothquant_without_statistics_is_rtn(layers):
    q = get_method("smoothquant", **W8A8).quantize_layer(layers[QUERY])
    r = get_method("rtn", **W8A8).quantize_layer(layers[QUERY])
    assert q.smooth is None and torch.equal(q.weight, r.weight)


def test_loraq_data_aware_objectives_improve_their_objective(layers, calib):
    base = get_method("loraq", **MX, rank=32, steps=15, smooth_alpha=0.5)
    for objective, xtx in (("activation", "full"), ("activation", "diag"), ("output", "full")):
        method = dataclasses.replace(base, objective=objective, xtx=xtx)
        q = method.quantize_layer(layers[QUERY], calib[QUERY])
        assert q.info["objective"] == objective
        assert q.info["objective_rel_best"] < q.info["objective_rel_init"]
        assert q.smooth is not None
    fallback = dataclasses.replace(base, objective="activation").quantize_layer(layers[QUERY])
    assert fallback.info["objective"].startswith("weight (activation objective: no X^T X")


# ----------------------------------------------------------------------------- API, determinism, shapes


def test_api_quantize_layer_without_statistics(layers):
    linear = layers[QUERY]
    q = get_method("svdquant").quantize_layer(linear)
    assert isinstance(q, QuantLinear) and q.smooth is None and q.branch.rank == 32
    method = get_method(
        "loraq", rank=64, weight_format="mxfp4", act_format="mxfp4",
        branch_format="mxfp8_e4m3", branch_act_format="mxfp8_e4m3",
    )
    q = method.quantize_layer(linear)
    assert q.effective_weight().shape == (384, 384)
    assert q.branch.rotation == "hadamard" and q.branch.rank == 64
    assert q.branch.mid_format == get_format("mxfp8_e4m3")
    assert q.bits() == method.layer_bits(384, 384, True, smoothed=False)
    assert q.info["best_step"] > 0 and q.info["lr"] == 1e-3
    x = torch.randn(2, 5, 384)
    assert q(x).shape == (2, 5, 384)


def test_same_seed_same_result_and_batching_does_not_change_it(minilm, layers, calib):
    pair = {QUERY: layers[QUERY], "other": minilm[0].get_submodule(QUERY.replace("query", "key"))}
    stats = {QUERY: calib[QUERY], "other": calib[QUERY]}
    for method in (
        get_method("loraq", **MX, rank=24, steps=10, rotation="random", seed=3, svd="randomized"),
        get_method("svdquant", **MX, rank=24, num_iters=3, svd="randomized", seed=3, num_grids=2),
    ):
        a, b = _wave(pair, method, stats), _wave(pair, method, stats)
        alone = method.quantize_layer(layers[QUERY], calib[QUERY])
        for name in pair:
            assert torch.equal(a[name].weight, b[name].weight)
            assert torch.equal(a[name].branch.down, b[name].branch.down)
        assert torch.allclose(alone.effective_weight(), a[QUERY].effective_weight(), atol=1e-5)
    other_seed = get_method("loraq", **MX, rank=24, steps=10, rotation="random", seed=4)
    assert not torch.equal(other_seed.quantize_layer(layers[QUERY]).branch.down, a[QUERY].branch.down)
    assert get_method("loraq", **MX, rank=24, steps=0).quantize_layer(layers[QUERY]).branch.rotation == "hadamard"


def test_pointwise_conv_layers_match_their_linear_twins(layers, calib):
    linear = layers[QUERY]
    conv = nn.Conv2d(384, 384, 1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    rows = calib[QUERY].rows[:64]
    image = rows.T.reshape(1, 384, 8, 8)
    conv_stats = collect_stats({"c": conv}, StatsSpec(absmax=True, rows=64), lambda: conv(image))["c"]
    assert torch.allclose(conv_stats.rows, rows)
    for method in (
        get_method("rtn", **MX),
        get_method("smoothquant", **MX),
        get_method("svdquant", **MX, rank=16, num_grids=2),
        get_method("loraq", **MX, rank=16, steps=5, smooth_alpha=0.5),
    ):
        qc = method.quantize_layer(conv, conv_stats)
        ql = method.quantize_layer(linear, conv_stats)
        assert qc.conv and torch.equal(qc.effective_weight(), ql.effective_weight()), method.name
        out = qc(image).reshape(384, 64).T
        assert torch.allclose(out, ql(rows), atol=1e-5)


def test_shared_qkv_down_projection(layers, minilm):
    model, _ = minilm
    attn = nn.Module()
    for leaf, src in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
        setattr(attn, leaf, model.get_submodule(f"encoder.layer.0.attention.self.{src}"))
    named = {f"attn.{leaf}": getattr(attn, leaf) for leaf in ("to_q", "to_k", "to_v")}
    x = torch.randn(64, 384)
    stats = collect_stats(named, StatsSpec(absmax=True, rows=64), lambda: [m(x) for m in named.values()])
    method = get_method("svdquant", **MX, rank=16, share_qkv=True, num_grids=2, num_iters=2)
    for given in (None, stats):
        out = method.quantize_layers(named, given)
        downs = [q.branch.down for q in out.values()]
        assert all(torch.equal(downs[0], d) for d in downs[1:])
        assert out["attn.to_k"].info["shared_with"] == list(named)
        assert len({q.input_key for q in out.values()}) == 1  # one fused buffer for the three
    separate = get_method("svdquant", **MX, rank=16, share_qkv=False, num_iters=2).quantize_layers(named)
    assert not torch.equal(separate["attn.to_q"].branch.down, separate["attn.to_k"].branch.down)
    assert len({q.input_key for q in separate.values()}) == 3


def _qkv(minilm):
    model, _ = minilm
    src = {"to_q": "query", "to_k": "key", "to_v": "value"}
    return {f"attn.{leaf}": model.get_submodule(f"encoder.layer.0.attention.self.{s}") for leaf, s in src.items()}


def test_svdquant_defaults_are_deepcompressors():
    m = get_method("svdquant")
    assert (m.share_qkv, m.svd, m.early_stop_rule, m.num_grids, m.num_iters, m.early_stop) == (
        True, "exact", "<=", 20, 100, True)
    assert m.branch_format == "model" and m.branch_act_format == "model" and m.params()["branch_format"] == "model"
    assert m.branch_spec(torch.float16).weight_format == get_format("fp16")
    assert m.branch_spec(torch.float32).weight_format == get_format("bf16")
    assert m.branch_bits(64, 128) == 16 * 32 * (64 + 128)
    assert get_method("svdquant", rows="all").rows == ALL_ROWS == get_method("svdquant", rows=-1).rows
    assert get_method("svdquant", smoothing=False).stats_spec() == StatsSpec(rows=256)  # output-error refinement
    with pytest.raises(UserError, match="unknown format 'model'"):
        get_method("loraq", branch_format="model")
    with pytest.raises(UserError, match="early_stop_rule"):
        get_method("svdquant", early_stop_rule="<<")


def test_shared_qkv_counts_smoothing_and_down_projection_once(minilm):
    named = _qkv(minilm)
    x = torch.randn(64, 384)
    stats = collect_stats(named, StatsSpec(absmax=True, rows=64), lambda: [m(x) for m in named.values()])
    method = get_method("svdquant", **MX, rank=16, num_grids=2, num_iters=2)
    out = method.quantize_layers(named, stats)
    shapes = [LayerShape(n, 384, 384, True, qkv_group(n)) for n in named]
    alone = [dataclasses.replace(s, group=None) for s in shapes]
    assert sum(q.bits() for q in out.values()) == model_bits(method, shapes)
    shared = method.down_bits(384) + 16 * 384
    assert model_bits(method, alone) - model_bits(method, shapes) == 2 * shared
    assert out["attn.to_q"].bits() == method.layer_bits(384, 384, True)
    assert out["attn.to_v"].bits() == method.layer_bits(384, 384, True) - shared
    unshared = dataclasses.replace(method, share_qkv=False)
    assert model_bits(unshared, shapes) == model_bits(unshared, alone)
    # r = 32, 1152 wide: r (n + 3m) + n branch and smoothing elements, not 3 (r (n + m) + n) (1.51x)
    wide = [LayerShape(f"a.{k}", 1152, 1152, False, "a.qkv") for k in ("to_q", "to_k", "to_v")]
    ref = get_method("svdquant", **MX, rank=32)
    main = model_bits(get_method("rtn", **MX), wide)
    assert model_bits(ref, wide) - main == 16 * (32 * (1152 + 3 * 1152) + 1152)
    over = (model_bits(ref, [dataclasses.replace(s, group=None) for s in wide]) - main) / (model_bits(ref, wide) - main)
    assert over == pytest.approx(1.5116, abs=1e-4)


class Scripted(Fitter):
    """A Fitter whose refinement errors follow a script (to test the keep-best and stop rules)."""

    script: tuple[float, ...] = ()

    def error(self, batch, index, s, main_q, up_q, down_q):
        self.calls.append(len(self.calls))
        return torch.tensor([self.script[len(self.calls) - 1]], dtype=torch.float64)


def test_refinement_keeps_ties_and_stops_at_the_first_worse_iterate(layers):
    layer = {QUERY: layers[QUERY]}
    batch = make_batches(make_units(layer, None), use_rows=False)[0]
    spec = BranchSpec(8, get_format("bf16"), get_format("bf16"))
    cases = (("<=", True, 3, 4, 5.0), ("<", True, 1, 2, 5.0), ("<=", False, 5, 6, 4.0), ("<", False, 5, 6, 4.0))
    for rule, early, used, calls, best in cases:
        fitter = Scripted(spec, get_format("mxfp4"), get_format("mxfp4"), "exact", 0, rule=rule)
        object.__setattr__(fitter, "script", (5.0, 5.0, 5.0, 6.0, 4.0, 4.5))
        object.__setattr__(fitter, "calls", [])
        *_, err, it = fitter.refine(batch, batch.weight, torch.ones(1, 384), 6, early)
        assert (int(it), len(fitter.calls), float(err)) == (used, calls, best), (rule, early)


def test_nan_or_inf_scale_resets_the_whole_vector():
    x = torch.tensor([[4.0, 1.0, 9.0]])
    w = torch.tensor([[1.0, 0.0, 4.0]])  # a dead weight column: w^b = 0
    assert torch.equal(smooth_scale(x, w, 0.5, 0.5, invalid="vector"), torch.ones(1, 3))
    assert torch.equal(smooth_scale(x, w, 0.5, 0.5, invalid="channel"), torch.tensor([[2.0, 1.0, 1.5]]))
    assert torch.equal(smooth_scale(x, w, 0.5, 0.0, invalid="vector"), torch.tensor([[2.0, 1.0, 3.0]]))


def test_refinement_scores_the_output_error_without_smoothing(layers, calib):
    layer, stats = layers[DOWN], calib[DOWN]
    method = get_method("svdquant", **MX, smoothing=False, num_iters=4, early_stop=False)
    q = method.quantize_layer(layer, stats)
    assert q.smooth is None and q.info["smoothing"] == "off"
    assert q.info["objective"] == f"output MSE on {len(stats.rows)} rows"
    assert method.quantize_layer(layer).info["objective"] == "weight error (no rows)"
    x = stats.rows
    for k in range(1, 5):  # the kept iterate has the lowest output error of the first four
        alone = dataclasses.replace(method, num_iters=k).quantize_layer(layer, stats)
        assert relative_output_error(layer, q, x) <= relative_output_error(layer, alone, x) + 1e-6


def test_all_rows_scoring_in_chunks_equals_one_chunk_and_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    b, m, n, rows = 3, 24, 64, 333
    x = [torch.randn(rows, n, generator=g) * (1 + 20 * (torch.rand(n, generator=g) > 0.9)) for _ in range(b)]
    w = torch.randn(b, m, n, generator=g)
    index = torch.tensor([0, 2, 2, 1])
    s = torch.rand(4, n, generator=g) + 0.5
    fmt = get_format("mxfp4")
    main_q = fmt.quantize(w[index] * s[:, None, :])
    up, down = torch.randn(4, m, 4, generator=g), torch.randn(4, 4, n, generator=g)
    branch = CandidateBranch(up, down, get_format("fp32"))
    whole = streamed_sq_error(Rows(x, torch.device("cpu")), index, w, s, main_q, fmt, branch)
    pieces = streamed_sq_error(Rows(x, torch.device("cpu")), index, w, s, main_q, fmt, branch, chunk=37)
    ref = []
    for i, u in enumerate(index.tolist()):
        xh = x[u].double() / s[i].double()
        yq = fmt.quantize(xh.float()).double() @ main_q[i].double().T + (xh @ down[i].double().T) @ up[i].double().T
        ref.append((x[u].double() @ w[u].double().T - yq).pow(2).sum())
    assert torch.allclose(whole, torch.stack(ref), rtol=1e-5) and torch.allclose(pieces, whole, rtol=1e-6)
    q, k, o = nn.Linear(n, m), nn.Linear(n, m), nn.Linear(n, m)
    kept = collect_stats({"q": q, "k": k, "o": o}, StatsSpec(rows=ALL_ROWS), lambda: [(q(t), k(t), o(-t)) for t in x])
    assert torch.equal(kept["q"].rows, torch.cat(x)) and kept["q"].count == b * rows
    assert torch.equal(kept["o"].rows, -torch.cat(x))
    assert kept["k"].rows is kept["q"].rows  # layers fed the same rows (fused q/k/v) hold one copy


def test_svd_choice_is_logged(layers):
    layer = layers[QUERY]
    q = get_method("svdquant", **MX, num_iters=1).quantize_layer(layer)
    assert q.info["svd"] == "exact float64, iterative top-r"
    q = get_method("svdquant", **MX, num_iters=1, svd="randomized").quantize_layer(layer)
    assert q.info["svd"] == "randomized float32" and q.info["branch_format"] == "bf16"
    assert get_method("svdquant", **MX, num_iters=1, svd="auto").quantize_layer(layer).info["svd"] in (
        "exact float32", "randomized float32")


# ----------------------------------------------------------------------------- gradients and config


def _ste(fmt, x):
    return x + (quantize_stack(fmt, x) - x).detach()


@pytest.mark.parametrize("kind,c_dim", [("weight", 0), ("activation", 1), ("activation", 2), ("output", 0)])
def test_closed_form_gradients_match_autograd(kind, c_dim):
    g = torch.Generator().manual_seed(0)
    b, m, n, r, rows = 2, 12, 64, 8, 16
    ws = torch.randn(b, m, n, generator=g, dtype=torch.float64)
    up = torch.randn(b, m, r, generator=g, dtype=torch.float64)
    down = torch.randn(b, r, n, generator=g, dtype=torch.float64) * 0.3
    q1, qa, q2 = get_format("mxfp4"), get_format("mxfp8_e4m3"), get_format("mxfp6_e2m3")
    spec = BranchSpec(r, q2, qa, get_format("mxfp8_e5m2"), "sqrt")
    x = torch.randn(b, rows, n, generator=g, dtype=torch.float64)
    c = None
    if c_dim == 1:
        c = (x * x).mean(1)
    elif c_dim == 2:
        c = x.mT @ x / rows
    xa, x2 = quantize_stack(qa, x), quantize_stack(qa, x)
    y = x @ (ws + 0.01).mT
    obj = Objective(kind, spec, q1, qa, [m], c=c, xa=xa, x2=x2, y=y)
    loss, d_up, d_down = obj(ws, up, down)
    u, d = up.clone().requires_grad_(), down.clone().requires_grad_()
    bq = u @ d
    p = ws - bq
    main_q = quantize_stack(q1, p).detach()  # piecewise constant
    if kind == "output":
        hm = _ste(spec.mid_format, x2 @ d.mT)
        ref = (y - xa @ main_q.mT - hm @ u.mT).pow(2).sum((-2, -1))
    else:
        e = p - main_q
        weighted = e if c is None else (e * c[:, None, :] if c.dim() == 2 else e @ c)
        ref = (e * weighted).sum((-2, -1))
    ref.sum().backward()
    assert torch.allclose(loss, ref.detach())
    assert torch.allclose(d_up, u.grad) and torch.allclose(d_down, d.grad)


def test_bad_configs_are_user_errors(layers):
    with pytest.raises(UserError, match="rotation"):
        get_method("loraq", rotation="cayley")
    with pytest.raises(UserError, match="objective"):
        get_method("loraq", objective="magic")
    with pytest.raises(UserError, match="svd"):
        get_method("svdquant", svd="qr")
    with pytest.raises(UserError, match="alpha"):
        get_method("smoothquant", alpha=1.5)
    with pytest.raises(UserError, match="exceeds min"):
        get_method("svdquant", rank=400).quantize_layer(layers[QUERY])
    assert is_int_format(get_format("mxint4")) and is_int_format(get_format("int4_g64"))
    assert get_method("loraq", schedule="paper", weight_format="int4_g64").learning_rate == 1e-4
    assert get_method("loraq", schedule="paper", weight_format="mxint4").learning_rate == 1e-4
    assert get_method("loraq", schedule="paper", weight_format="nvfp4").learning_rate == 1e-3
    assert get_method("loraq", mid_format=None).mid_format is None
    assert get_method("loraq", branch_act_format="mxfp6_e2m3").mid_format == get_format("mxfp6_e2m3")


def test_gpu_benchmark_script_runs_small_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
    spec = importlib.util.spec_from_file_location("bench_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "methods.json"
    assert bench.main(["--small", "--device", "cpu", "--steps", "4", "--rows", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert report["layers"] == 20 and set(runs) == {"loraq", "loraq_init", "svdquant_search", "svdquant_datafree"}
    assert runs["loraq"]["rel_weight_error_mean"] < runs["loraq_init"]["rel_weight_error_mean"]
    assert all(r["seconds"] > 0 for r in runs.values())


def test_svdquant_calibration_benchmark_runs_small_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_svdquant_calib.py"
    spec = importlib.util.spec_from_file_location("bench_svdquant_calib", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "calib.json"
    args = ["--small", "--device", "cpu", "--rows", "96", "--subsample", "32", "--search-rows", "32", "--layers", "8",
            "--num-grids", "2", "--num-iters", "3", "--rank", "4", "--out", str(out)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    native, sub, searched = report["runs"]
    assert report["layers"] == 8 and native["rows"] == 96 and sub["rows"] == 32 and searched["rows"] == "search 32"
    assert native["floor_flops"] > searched["floor_flops"] > sub["floor_flops"] > 0 and native["seconds"] > 0
    assert 0.0 <= sub["same_both"] <= min(sub["same_pair"], sub["same_iterate"]) <= 1.0
    # refined on all rows: the iterate is the native one wherever the searched pair is
    assert searched["same_both"] == searched["same_pair"]
