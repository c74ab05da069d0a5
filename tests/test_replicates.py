"""Replicated cells in ``ptqbench report``: a real sqlite MLflow store with k = 3 and k = 2 replicate
groups (and a failed replicate); one row per group with the mean, the interval over prompts of the
replicate-pooled per-prompt values, the between-replicate sd and range in every table format and the
CSV, and the paired "best" marking on the pooled per-prompt values (checked against numpy)."""

from __future__ import annotations

import contextlib
import io
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import fresh_store

from ptqbench.cli import main as cli_main
from ptqbench.metrics.base import MetricResult, write_per_image
from ptqbench.report.replicates import Spread, pool_replicates
from ptqbench.uncertainty import Bootstrap, mean_interval, not_worse_than_best

N = 12
KEYS, SEEDS = [f"k{i:02d}" for i in range(N)], list(range(100, 100 + N))
CI = {"ci.level": "0.9", "ci.resamples": "400", "ci.set_resamples": "200", "ci.seed": "5", "ci.method": "bca",
      "ci.test": "bootstrap"}
CONFIG = Bootstrap(level=0.9, resamples=400, seed=5)
FORMATS = {"weight_format": "mxfp4", "act_format": "mxfp4"}
G = np.random.default_rng(3)
PROMPT = G.normal(20.0, 4.0, N)  # shared by every cell: the paired tests see through it
# cell -> replicate -> per-image psnr; fid (set metric) value with its bounds
PSNR = {
    "rtn": {0: PROMPT + G.normal(0, 0.3, N)},
    "loraq": {r: PROMPT + 1.2 + off + G.normal(0, 0.3, N) for r, off in enumerate((0.0, 0.25, -0.1))},
    "svdquant": {r: PROMPT + 1.1 + off + G.normal(0, 0.3, N) for r, off in enumerate((0.05, -0.05))},
}
FID = {("rtn", 0): (30.0, 26.0, 35.0), ("loraq", 0): (12.0, 10.0, 15.0), ("loraq", 1): (13.0, 11.0, 16.0),
       ("loraq", 2): (14.5, 12.0, 18.0), ("svdquant", 0): (20.0, 17.0, 24.0), ("svdquant", 1): (21.0, 18.0, 25.0)}


def log_run(client: Any, exp: str, tmp: Path, method: str, replicate: int | None, group: str,
            status: str = "FINISHED") -> str:
    """One run as the runner logs it: tags (replicate ones for replicated cells), params, metrics, per_image.csv."""
    from mlflow.entities import Metric as M
    from mlflow.entities import Param, RunTag

    is_ref = method == "none"
    cell_hash = group if not replicate else f"{group}r{replicate}"
    tags = {"cell_hash": cell_hash, "model": "tiny-pixart", "method": method, "prompt_set": "builtin",
            "is_reference": str(is_ref).lower(), "label": f"{method} W:mxfp4 A:mxfp4",
            "ptqbench.status": "finished", "metric_direction.psnr": "higher", "metric_direction.fid": "lower"}
    if replicate is not None:
        tags.update(replicate=str(replicate), replicate_group=group)
    params = {"model": "tiny-pixart", "prompt_set": "builtin", "method": method, "n_prompts": str(N),
              "gen.steps": "2", "cell_hash": cell_hash, **CI, **({} if is_ref else FORMATS)}
    if method in ("loraq", "svdquant"):
        params.update({"seed": str(replicate or 0), "calibration.seed": str(replicate or 0)})
        params.update({"replicate": str(replicate)} if replicate else {})
    run = client.create_run(exp, run_name=cell_hash, tags=tags)
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    if status == "FAILED":
        client.set_tag(rid, "ptqbench.error", "RuntimeError: out of memory")
        client.set_terminated(rid, "FAILED")
        return rid
    metrics = {"bits_per_weight": 16.0 if is_ref else 4.25, "model_bytes": 2048.0}
    if is_ref:
        client.set_tag(rid, "metric_status.psnr", "not_computed: the 16-bit reference is not compared with itself")
        metrics.update({"fid": 5.0, "fid_n": N, "fid.lo": 4.0, "fid.hi": 6.5})
        results = {}
    else:
        values = tuple(PSNR[method][replicate or 0].tolist())
        iv = mean_interval(values, CONFIG)
        fid, lo, hi = FID[(method, replicate or 0)]
        metrics.update({"psnr": float(np.mean(values)), "psnr_n": N, "psnr.lo": iv.lo, "psnr.hi": iv.hi,
                        "fid": fid, "fid_n": N, "fid.lo": lo, "fid.hi": hi})
        results = {"psnr": MetricResult("psnr", float(np.mean(values)), N, per_image=values)}
    client.log_batch(rid, metrics=[M(k, float(v), 0, 0) for k, v in metrics.items()],
                     tags=[RunTag("ptqbench.status", "finished")])
    order = slice(None, None, -1) if replicate == 1 else slice(None)  # another key order: pairing is by key
    keys, seeds = KEYS[order], SEEDS[order]
    table = write_per_image(tmp / rid / "per_image.csv", keys, seeds,
                            {k: MetricResult(k, v.value, N, per_image=v.per_image[order]) for k, v in results.items()})
    client.log_artifact(rid, str(table))
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, template_db: Path) -> dict[str, Any]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("replicates")
    uri = fresh_store(root, template_db)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("reps", artifact_location=(root / "art").as_uri())
    ids = {"ref": log_run(client, exp, root, "none", None, "aaaa"),
           "rtn": log_run(client, exp, root, "rtn", None, "bbbb")}
    for r in range(3):
        ids[f"loraq{r}"] = log_run(client, exp, root, "loraq", r, "cccc")
    ids["loraq3"] = log_run(client, exp, root, "loraq", 3, "cccc", status="FAILED")
    for r in range(2):
        ids[f"svdquant{r}"] = log_run(client, exp, root, "svdquant", r, "dddd")
    plain = client.create_experiment("plain", artifact_location=(root / "art2").as_uri())
    log_run(client, plain, root, "none", None, "eeee")
    log_run(client, plain, root, "rtn", None, "ffff")
    out = root / "report"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli_main(["report", "--tracking-uri", uri, "--out", str(out)]) == 0, stderr.getvalue()
    tables = out / "tables"
    return {"ids": ids, "md": (tables / "reps--tiny-pixart--builtin.md").read_text(),
            "tex": (tables / "reps--tiny-pixart--builtin.tex").read_text(), "html": (out / "index.html").read_text(),
            "csv": pd.read_csv(tables / "reps--tiny-pixart--builtin.csv"),
            "plain_md": (tables / "plain--tiny-pixart--builtin.md").read_text(),
            "plain_csv": pd.read_csv(tables / "plain--tiny-pixart--builtin.csv")}


def pooled(method: str) -> np.ndarray:
    """Each prompt's mean over the replicates (numpy, by key: every replicate is in KEYS order here)."""
    return np.mean(np.stack(list(PSNR[method].values())), axis=0)


def md_cells(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in rows[1:]}


def test_one_row_per_replicate_group_with_mean_interval_and_spread(report: dict[str, Any]) -> None:
    rows = md_cells(report["md"])
    assert sorted(rows) == ["16-bit reference", "loraq", "rtn", "svdquant"]  # 3 + 1 failed loraq runs: one row
    header = [c.strip() for c in report["md"].splitlines()[2].strip("|").split("|")]
    psnr, fid = header.index("psnr ↑ (n=12)"), header.index("fid ↓ (n=12)")
    reps = [float(np.mean(v)) for v in PSNR["loraq"].values()]
    iv = mean_interval(pooled("loraq"), CONFIG)
    mean = statistics.fmean(reps)
    cell = rows["loraq"][psnr].strip("*")
    # the column's 3 significant digits (values ~20: 1 decimal); the spread's 2 significant digits of its sd
    expected_spread = f"(k=3: sd {statistics.stdev(reps):.2f}, range {max(reps) - min(reps):.2f})"
    assert cell == f"{mean:.1f} ± {(max(iv.hi, mean) - min(iv.lo, mean)) / 2:.1f} {expected_spread}", cell
    assert "k=" not in rows["rtn"][psnr]  # no replicates: as before
    lo, hi = (np.mean([FID[("loraq", r)][j] for r in range(3)]) for j in (1, 2))
    fids = [12.0, 13.0, 14.5]  # set metric: the mean of the replicates' bounds
    expected = f"{np.mean(fids):.2f} ± {(hi - lo) / 2:.2f} (k=3: sd {statistics.stdev(fids):.2f}, range 2.50)"
    assert rows["loraq"][fid].strip("*") == expected
    assert "(k=2: sd" in rows["svdquant"][psnr]
    assert f"replicate 3 ({report['ids']['loraq3']}) failed: RuntimeError: out of memory; left out" in report["md"]
    assert "replicated cells (k = finished replicates" in report["md"]
    assert r"(k=3: sd" in report["tex"] and r"$\pm$" in report["tex"]
    assert '<span class="rep">(k=3: sd' in report["html"] and '<span class="ci"> ±' in report["html"]


def test_paired_best_marking_pools_replicates_per_prompt(report: dict[str, Any]) -> None:
    rows = md_cells(report["md"])
    header = [c.strip() for c in report["md"].splitlines()[2].strip("|").split("|")]
    psnr = header.index("psnr ↑ (n=12)")
    samples = {"rtn": PSNR["rtn"][0], "loraq": pooled("loraq"), "svdquant": pooled("svdquant")}
    best = not_worse_than_best(samples, True, CONFIG)
    assert "loraq" in best and "rtn" not in best  # the data make loraq best and rtn clearly worse
    assert {name for name in samples if rows[name][psnr].startswith("**")} == best


def test_csv_has_replicate_columns_and_unreplicated_groups_print_as_before(report: dict[str, Any]) -> None:
    csv = report["csv"].set_index("method")
    reps = [float(np.mean(v)) for v in PSNR["loraq"].values()]
    assert csv.loc["loraq", "psnr"] == pytest.approx(statistics.fmean(reps), rel=1e-12)
    assert csv.loc["loraq", "psnr_k"] == 3 and csv.loc["svdquant", "psnr_k"] == 2 and csv.loc["rtn", "psnr_k"] == 1
    assert csv.loc["loraq", "psnr_rep_sd"] == pytest.approx(statistics.stdev(reps), rel=1e-12)
    assert (csv.loc["loraq", "psnr_rep_min"], csv.loc["loraq", "psnr_rep_max"]) == pytest.approx((min(reps), max(reps)))
    assert pd.isna(csv.loc["rtn", "psnr_rep_sd"]) and csv.loc["loraq", "fid_k"] == 3
    iv = mean_interval(pooled("loraq"), CONFIG)
    assert csv.loc["loraq", "psnr_lo"] == pytest.approx(iv.lo, rel=1e-12)
    ids = report["ids"]
    assert csv.loc["loraq", "replicate_runs"] == " ".join(ids[f"loraq{r}"] for r in range(3))
    assert csv.loc["loraq", "cell_hash"] == "cccc" and csv.loc["loraq", "status"] == "finished"
    assert not any(re.search(r"_k$|_rep_|replicate_runs", c) for c in report["plain_csv"].columns)
    assert "k=" not in report["plain_md"] and "replicated" not in report["plain_md"]


def test_pool_replicates_keeps_lone_runs_and_needs_aligned_tables() -> None:
    base = {"status": "finished", "error": "", "params": {"seed": "0"}, "tags": {}, "metric_names": ("psnr",)}
    table = pd.DataFrame({"key": ["a", "b"], "seed": [1, 2], "psnr": [1.0, 3.0]})
    rows = [
        {**base, "run_id": "x", "replicate": 0, "replicate_group": "g", "per_image": table,
         "metrics": {"psnr": 2.0, "psnr.lo": 1.0, "psnr.hi": 3.0}},
        {**base, "run_id": "y", "replicate": 1, "replicate_group": "g", "per_image": table.assign(seed=[1, 3]),
         "metrics": {"psnr": 4.0, "psnr.lo": 3.0, "psnr.hi": 6.0}},
        {**base, "run_id": "z", "replicate": 0, "replicate_group": "h", "per_image": None, "metrics": {"psnr": 9.0}},
    ]
    merged, lone = pool_replicates(rows, CONFIG)
    assert lone is rows[2]
    assert merged["per_image"] is None  # seeds differ: no pooled per-prompt values, so no paired test
    assert merged["metrics"]["psnr"] == 3.0 and (merged["metrics"]["psnr.lo"], merged["metrics"]["psnr.hi"]) == (2.0,
                                                                                                               4.5)
    assert merged["spread"]["psnr"] == Spread(2, statistics.stdev([2.0, 4.0]), 2.0, 4.0)
    assert merged["replicate_runs"] == ["x", "y"] and merged["replicate_notes"] == []


def test_run_records_carry_replicate_tags_and_pool_by_group() -> None:
    from types import SimpleNamespace

    from ptqbench.schema import RunRecord

    def record(run_id: str, tags: dict, psnr: float, status: str = "FINISHED") -> dict:
        info = SimpleNamespace(run_id=run_id, run_name=run_id, start_time=0, artifact_uri="", status=status)
        data = SimpleNamespace(tags={"model": "m", "method": "loraq", "label": run_id, **tags}, params={},
                               metrics={"psnr": psnr, "psnr_n": 4})
        return RunRecord.from_run(SimpleNamespace(info=info, data=data), "e").row()

    rows = [
        record("a0", {"cell_hash": "aa", "replicate": "0", "replicate_group": "aa"}, 20.0),
        record("a1", {"cell_hash": "ab", "replicate": "1", "replicate_group": "aa"}, 22.0),
        record("a2", {"cell_hash": "ac", "replicate": "2", "replicate_group": "aa"}, 24.0),
        record("a3", {"cell_hash": "ad", "replicate": "3", "replicate_group": "aa"}, 99.0, "FAILED"),
        record("b", {"cell_hash": "bb"}, 30.0),  # no replicates: a group of one, keyed by its hash
    ]
    assert rows[1]["replicate"] == 1 and rows[4]["replicate_group"] == "bb" and rows[4]["replicate"] == 0
    group, lone = pool_replicates(rows, CONFIG)
    assert lone is rows[4] and group["run_id"] == "a0" and group["label"] == "a0"
    assert group["metrics"]["psnr"] == 22.0 and group["spread"]["psnr"] == Spread(3, 2.0, 20.0, 24.0)
    assert group["replicate_notes"] == ["replicate 3 (a3) failed: failed without a ptqbench.error tag"]


def test_a_suite_with_replicates_reports_one_row_per_group(tmp_path: Path, template_db: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``replicates: 2`` through ``ptqbench run`` and ``ptqbench report``: the runner's tags and params
    (replicate, replicate_group, re-drawn calibration seed) give one smoothquant row with its spread."""
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")
    uri = fresh_store(tmp_path, template_db)
    suite = tmp_path / "suite.yaml"
    suite.write_text("""
name: rep
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 4}
prompts: {set: builtin, n: 4}
calibration: {set: builtin-calib, n: 1, steps: 2, rows: 16}
metrics: [psnr]
uncertainty: {resamples: 200}
methods:
  - {method: rtn, format: mxfp4}
  - {method: smoothquant, format: mxfp4, alpha: 0.5, replicates: 2}
""", encoding="utf-8")
    common = ["--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["run", str(suite), *common]) == 0
        assert cli_main(["report", "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "tables.md").read_text()
    rows = md_cells(text)
    assert sorted(rows) == ["16-bit reference", "rtn", "smoothquant"]  # no "replicate=1" variant row
    psnr = [c.strip() for c in text.splitlines()[2].strip("|").split("|")].index("psnr ↑ (n=4)")
    assert "(k=2: sd " in rows["smoothquant"][psnr] and "k=" not in rows["rtn"][psnr]
    [csv_file] = (tmp_path / "report" / "tables").glob("rep--*.csv")
    csv = pd.read_csv(csv_file).set_index("method")
    assert csv.loc["smoothquant", "psnr_k"] == 2 and len(csv.loc["smoothquant", "replicate_runs"].split()) == 2
