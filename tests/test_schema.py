"""The run schema round trip: what the runner logs for a cell is what the report reads back; labels."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ptqbench import schema
from ptqbench.labels import config_text, describe, extra_fields, formats_text, rank_text
from ptqbench.method import get_method
from ptqbench.metrics.base import MetricResult
from ptqbench.runner import Runner
from ptqbench.schema import RunRecord
from ptqbench.shapes import ModelShapes
from ptqbench.suite import expand, load_suite
from ptqbench.tracking import flatten

SUITE = """
name: roundtrip
models: [tiny-pixart]
defaults: {steps: 3, guidance: 2.5, resolution: 32}
prompts: {set: builtin, n: 2}
metrics: [psnr, fid]
methods:
  - {method: svdquant, format: mxfp4, rank: 4, branch: mxfp8_e4m3}
"""


def _logged(cell, metrics: dict[str, float | None], tags: dict[str, str], status: str = "FINISHED"):
    """An MLflow run as the tracking store returns it, logged as the runner logs it."""
    runner = SimpleNamespace(suite=SimpleNamespace(file="suite.yaml"), device="cpu", _runtime={})
    params = flatten(Runner.params(runner, cell))
    all_tags = {**Runner.tags(runner, cell), **tags}
    all_tags[schema.STATUS] = schema.FINISHED
    info = SimpleNamespace(run_id=cell.hash, run_name=cell.label, status=status, start_time=1, artifact_uri="")
    data = SimpleNamespace(params=params, tags=all_tags, metrics={k: v for k, v in metrics.items() if v is not None})
    return SimpleNamespace(info=info, data=data)


def _result(bits_per_weight: float, model_bytes: int) -> SimpleNamespace:
    """What evaluate() returns, as far as the schema reads it."""
    errors = pd.DataFrame({"rel_weight_error": [0.1, 0.3], "rel_output_error": [0.2, float("nan")]})
    return SimpleNamespace(
        metrics={"psnr": MetricResult("psnr", 21.5, 2), "fid": MetricResult("fid", None, 0, "not_computed", "no")},
        bits_per_weight=bits_per_weight, model_bytes=model_bytes, layer_errors=errors, timings={"generate": 1.5},
        images_generated=2,
    )


def test_what_the_runner_logs_is_what_the_report_reads(tmp_path: Path) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(SUITE).lstrip(), encoding="utf-8")
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 16))
    ref, cell = expand(load_suite(path), lambda entry, layers: ModelShapes.from_module(model, layers))
    assert cell.plan.include == ("*",) and len(cell.plan.exclude) == 0 and cell.model_bytes < ref.model_bytes
    metrics, tags = schema.result_metrics(_result(cell.bits_per_weight, cell.model_bytes), seconds=9.0)
    assert tags == {"metric_status.fid": "not_computed: no"}
    assert metrics["layer_rel_weight_error_mean"] == pytest.approx(0.2)
    assert metrics["layer_heldout_output_error_max"] == 0.2
    assert metrics["seconds_generate"] == 1.5 and metrics["seconds_total"] == 9.0 and metrics["images_generated"] == 2
    record = RunRecord.from_run(_logged(cell, metrics, tags), "roundtrip")
    expected = {
        "model": "tiny-pixart", "method": "svdquant", "is_reference": False, "prompt_set": "builtin",
        "n_prompts": "2", "steps": "3", "guidance": "2.5", "resolution": "32", "cell_hash": cell.hash,
        "weight_format": "mxfp4", "act_format": "mxfp4", "branch_format": "mxfp8_e4m3",
        "branch_act_format": "mxfp8_e4m3", "rank": 4, "rank_text": "4", "label": cell.label,
        "bits_per_weight": cell.bits_per_weight, "model_bytes": float(cell.model_bytes),
        "metric_names": ("fid", "psnr"), "status": "finished", "error": "",
        "replicate": 0, "replicate_group": cell.hash,  # a cell without replicates is a group of one
    }
    assert {k: getattr(record, k) for k in expected} == expected
    assert record.row()["params"] is record.params and set(record.row()) == {
        f.name for f in dataclasses.fields(RunRecord)}
    reference = RunRecord.from_run(_logged(ref, {}, {}), "roundtrip")
    assert reference.is_reference and reference.method == "none" and reference.weight_format == ""
    failed = RunRecord.from_run(_logged(ref, {}, {}, status="KILLED"), "roundtrip")
    assert failed.status == "failed" and failed.error == "failed without a ptqbench.error tag"


def test_labels() -> None:
    svdq = get_method("svdquant", weight_format="mxfp4", act_format="mxfp4", rank=32, num_grids=2)
    assert describe(svdq) == "svdquant W:mxfp4 A:mxfp4 r32 B:model/model num_grids=2"
    assert describe(None) == "16-bit reference"
    # a field the method's own label shows is not repeated; a value that merely occurs in it is not hidden
    loraq = get_method("loraq", weight_format="int4_g64", act_format="int4_g64", steps=5, num_grids=5)
    assert "5st" in loraq.label() and extra_fields(loraq) == ["steps=5", "num_grids=5"]
    assert extra_fields(loraq, besides_label=True) == ["num_grids=5"]
    assert describe(loraq, {"a": 3, "b": 7}).startswith(dataclasses.replace(loraq, rank=7).label())
    assert describe(loraq, {"a": 3, "b": 7}).endswith("num_grids=5 (equal-memory ranks 3-7)")
    assert formats_text(svdq) == "W:mxfp4 A:mxfp4 B:model/model" and formats_text(None) == "16-bit"
    assert config_text("rtn", "int4_g64", "int8_pc") == "rtn W:int4_g64 A:int8_pc"
    assert config_text("loraq", "mxfp4", "mxfp4", "4–12", "bf16") == "loraq W:mxfp4 A:mxfp4 r4–12 B:bf16"
    assert rank_text(None) == "-" and rank_text(8, {"a": 2, "b": 8}) == "per-layer 2..8"
