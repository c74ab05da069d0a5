"""LoRaQ's optimizer, stopping rule, schedules and what each layer logs; its loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from ptqbench import get_method
from ptqbench.errors import UserError
from ptqbench.formats import get_format
from ptqbench.lowrank import BranchSpec, truncated_svd
from ptqbench.methods.loraq import CHECK_EVERY, SCHEDULES, Objective, Trace, converged, optimize
from ptqbench.report.plots import loraq_curve_plot, loss_curve_plot, run_loss_curves
from ptqbench.report.tables import Group
from ptqbench.rotation import get_rotation

pytestmark = pytest.mark.usefixtures("one_thread")
MX = {"weight_format": "mxfp4", "act_format": "mxfp4", "branch_format": "mxfp8_e4m3", "branch_act_format": "mxfp8_e4m3"}


def _weights(batch: int = 2, out: int = 96, inp: int = 128, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed weights with a few outlier input channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, out, inp, generator=g) * 0.02
    w[..., :3] *= 12.0
    return w


def _problem(rank: int = 16):
    ws = _weights()
    omega = get_rotation("hadamard", rank).matrix.float()
    spec = BranchSpec(rank, get_format("mxfp8_e4m3"), get_format("mxfp8_e4m3"), None, "sqrt", omega)
    objective = Objective("weight", spec, get_format("mxfp4"), get_format("mxfp4"), [96])
    u, s, vh = truncated_svd(ws, rank, "exact")
    return ws, (u * s.sqrt()[..., None, :], s.sqrt()[..., :, None] * vh), omega, objective


def test_converged_rule_by_hand():
    best = torch.tensor([[10.0, 10.0], [9.0, 8.0], [8.995, 7.0], [8.994, 6.999]])
    assert not converged(best, 1, 1, 1e-3)  # 10 -> 9: a 10% gain
    assert not converged(best, 2, 1, 1e-3)  # the second layer still gains 12.5%
    assert converged(best, 3, 1, 1e-3)  # both gain < 0.1% over one step
    assert not converged(best, 3, 2, 1e-3)  # over two steps the second gains 12.5%
    assert not converged(best, 3, 0, 0.5) and not converged(best, 0, 4, 0.5)  # patience 0 / too early


def test_optimize_keeps_the_best_iterate_and_stops_early():
    ws, (left, right), omega, objective = _problem()
    full_l, full_r, full = optimize(ws, left, right, omega, objective, 60, 1e-3)
    assert full.steps == 60 and full.history.shape == (61, 2)
    assert torch.equal(full.best, full.history.min(0).values)
    assert torch.equal(full.best_step, full.history.argmin(0))
    assert torch.equal(full.init, full.history[0]) and (full.best < full.init).all()
    up_q, down_q = objective.spec.quantize(full_l @ omega, omega.T @ full_r)
    assert torch.allclose(objective(ws, up_q, down_q)[0], full.best, rtol=1e-6)  # the returned iterate is the best
    _, _, early = optimize(ws, left, right, omega, objective, 60, 1e-3, patience=5, tol=0.5)
    assert early.steps == CHECK_EVERY and torch.equal(early.history, full.history[: CHECK_EVERY + 1])  # cut early


def test_trace_curve_and_layer_info():
    history = torch.tensor([[4.0, 1.0], [1.0, 0.25], [0.25, 0.25], [0.16, 0.0625]])
    trace = Trace(history[0], history.min(0).values, torch.tensor([4.0, 1.0]), history.argmin(0), history)
    assert trace.curve(0, points=2) == [[0, 1.0], [3, 0.2]]
    assert [k for k, _ in trace.curve(1, points=40)] == [0, 1, 2, 3]
    info = trace.layer_info(1)
    assert info["best_step"] == 3 and info["steps_run"] == 3 and info["objective_rel_init"] == 1.0
    assert info["objective_rel_final"] == pytest.approx(0.25) and info["loss_curve"][1] == [1, 0.5]


def test_schedules_defaults_and_overrides():
    paper = get_method("loraq", schedule="paper", weight_format="int4_g64")
    assert (paper.max_steps, paper.learning_rate, paper.stopping) == (300, 1e-4, (0, 0.0))
    assert get_method("loraq", schedule="paper", weight_format="mxfp4").learning_rate == 1e-3
    assert get_method("loraq", schedule="paper", weight_format="mxint4").learning_rate == 1e-4
    conv = SCHEDULES["converged"]
    default = get_method("loraq", weight_format="int4_g64")
    assert default.schedule == "converged" and default.max_steps == conv.steps
    assert default.learning_rate == dict(conv.branch_lr)["mxfp8_e4m3"] and default.stopping == (conv.patience, conv.tol)
    by_branch = dict(conv.branch_lr)  # the branch weight format picks the lr first
    assert get_method("loraq", weight_format="mxfp4", branch_format="int4_g64").learning_rate == by_branch["int4_g64"]
    assert by_branch["int4_g64"] < 1e-4 < by_branch["int8_g64"]  # W4 branches: slow; W8: faster than the paper
    assert get_method("loraq", weight_format="int4_g64", branch_format="bf16").learning_rate == conv.lr_int == 1e-4
    assert get_method("loraq", weight_format="nvfp4", branch_format="bf16").learning_rate == conv.lr_float == 1e-3
    assert get_method("loraq", schedule="paper", weight_format="mxfp4", branch_format="int4_g64").learning_rate == 1e-3
    mine = get_method("loraq", schedule="paper", steps=50, lr=3e-3, patience=20, tol=1e-2)
    assert (mine.max_steps, mine.learning_rate, mine.stopping) == (50, 3e-3, (20, 1e-2))
    assert "50st lr:0.003 stop:20/0.01" in mine.label()
    for bad, match in (({"schedule": "fast"}, "schedule 'fast' is not valid"), ({"patience": -1}, "patience"),
                       ({"tol": 1.0}, "tol"), ({"steps": -1}, "steps"), ({"lr": 0.0}, "lr")):
        with pytest.raises(UserError, match=match):
            get_method("loraq", **bad)


def test_layer_info_says_what_ran_at_rank_62():
    layer = nn.Linear(128, 96)
    with torch.no_grad():
        layer.weight.copy_(_weights(1)[0])
    method = get_method("loraq", **MX, rank=62, steps=400, lr=1e-3, patience=10, tol=1e-2)
    q = method.quantize_layer(layer)
    info = q.info
    assert q.branch.rotation == info["rotation"] == "hadamard[60+2]" and info["rotation_blocks"] == [60, 2]
    assert info["schedule"] == "converged" and info["steps"] == 400 and info["lr"] == method.learning_rate
    assert 10 <= info["steps_run"] < 400 and info["steps_run"] % CHECK_EVERY == 0
    assert 0 < info["best_step"] <= info["steps_run"]
    assert info["objective_rel_best"] < info["objective_rel_init"]
    assert info["objective_rel_best"] <= info["objective_rel_final"]
    curve = info["loss_curve"]
    assert curve[0] == [0, pytest.approx(info["objective_rel_init"], rel=1e-5)] and curve[-1][0] == info["steps_run"]
    w = layer.weight.detach()
    w_err = torch.linalg.norm(q.effective_weight() - w) / torch.linalg.norm(w)
    assert float(w_err) == pytest.approx(info["objective_rel_best"], rel=1e-3)  # the weight objective is the error
    plain = get_method("loraq", **MX, rank=62, steps=0, rotation="random").quantize_layer(layer)
    assert plain.info["rotation"] == "random" and plain.info["rotation_blocks"] == []


def _curves() -> pd.DataFrame:
    rows = []
    for panel in ("int4_g64", "mxfp4"):
        for lr in (1e-4, 1e-3):
            for layer in ("a", "b"):
                for k in (0, 1, 3, 10, 30, 100):
                    rows.append({"panel": panel, "series": f"lr {lr:g}", "layer": layer, "step": k,
                                 "rel": 0.08 / (1 + lr * 1e3 * k) ** 0.3 + 0.04})
    return pd.DataFrame(rows)


def test_loss_curve_plot_renders(tmp_path: Path):
    plot = loss_curve_plot(_curves(), tmp_path, "curves", "synthetic")
    assert plot.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.pdf.read_bytes()[:5] == b"%PDF-"
    assert loss_curve_plot(_curves().iloc[:0], tmp_path, "none", "empty") is None


def test_curves_come_from_the_layer_errors_info_column(tmp_path: Path):
    curve = [[0, 0.08], [10, 0.05], [99, 0.045]]
    csv = tmp_path / "layer_errors.csv"
    pd.DataFrame({"layer": ["q", "k"], "rel_weight_error": [0.045, 0.05],
                  "info": [json.dumps({"loss_curve": curve}), json.dumps({"smoothing": "off"})]}).to_csv(csv)
    run = {"run_id": "r1", "status": "finished", "is_reference": False, "method": "loraq", "row_label": "loraq r62",
           "weight_format": "mxfp4"}
    other = {**run, "run_id": "r2", "method": "svdquant", "row_label": "svdquant"}
    group = Group("e", "m", "p", {}, [run, other], [], slug="g")
    artifacts = SimpleNamespace(get=lambda run_id, path: csv if run_id == "r1" else None)
    frame = run_loss_curves(group, artifacts)
    assert frame.to_dict("list") == {"panel": ["mxfp4"] * 3, "series": ["loraq r62"] * 3, "layer": ["q"] * 3,
                                     "step": [0, 10, 99], "rel": [0.08, 0.05, 0.045]}
    notes: list[str] = []
    plot = loraq_curve_plot(group, artifacts, tmp_path, notes)
    assert plot is not None and plot.png.name == "g--loraq-curves.png" and notes == []
    bare = SimpleNamespace(get=lambda run_id, path: None)
    assert loraq_curve_plot(group, bare, tmp_path, notes) is None and "loss-curve plot skipped" in notes[0]
    assert loraq_curve_plot(Group("e", "m", "p", {}, [other], [], slug="s"), bare, tmp_path, notes) is None
    assert len(notes) == 1
