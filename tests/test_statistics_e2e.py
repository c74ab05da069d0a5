"""Intervals end to end: a suite's ``uncertainty`` block through ``ptqbench run`` (MLflow ``<m>.lo``/``.hi``,
``ci.*`` params, the ``per_image.csv`` artifact), ``ptqbench report`` (``±`` and lo/hi columns, paired
"best" marking) and ``ptqbench report --compare A B``; the block's validation and the cell hash."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fresh_store

from ptqbench import cli
from ptqbench.errors import UserError
from ptqbench.metrics.base import read_per_image
from ptqbench.prompts import get_prompt_set
from ptqbench.suite import expand, load_suite
from ptqbench.tracking import Tracker
from ptqbench.uncertainty import Bootstrap, paired_difference

pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")  # tiny tensors: threads only add overhead

N = 5
SUITE = f"""
name: stats
models: [tiny-pixart]
defaults: {{steps: 2, resolution: 32, batch_size: {N}}}
prompts: {{set: builtin, n: {N}}}
calibration: {{set: builtin-calib, n: 1, steps: 2, rows: 16}}
metrics: [psnr, {{name: ssim}}]
uncertainty: {{level: 0.9, resamples: 500, seed: 7}}
methods:
  - {{method: rtn, format: mxfp4}}
  - {{method: smoothquant, format: mxfp4, alpha: 0.5}}
"""


def write(folder: Path, text: str, name: str = "suite.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, template_db: Path) -> dict:
    """The suite run into a fresh sqlite store, then reported."""
    root = tmp_path_factory.mktemp("stats")
    uri = fresh_store(root, template_db)
    suite = write(root, SUITE)
    code = cli.main(["run", str(suite), "--tracking-uri", uri, "--cache-dir", str(root / "cache"), "--device", "cpu"])
    assert code == 0
    assert cli.main(["report", "--tracking-uri", uri, "--out", str(root / "report")]) == 0
    tracker = Tracker(uri)
    runs = {r.tags["method"]: r for r in tracker.runs(tracker.experiment("stats"))}
    return {"root": root, "uri": uri, "tracker": tracker, "runs": runs}


def per_image(done: dict, method: str) -> pd.DataFrame:
    run = done["runs"][method]
    local = done["tracker"].client.download_artifacts(run.run_id, "per_image.csv", str(done["root"] / method))
    return read_per_image(Path(local))


def test_run_logs_intervals_settings_and_per_image_values(done: dict) -> None:
    runs = done["runs"]
    assert set(runs) == {"none", "rtn", "smoothquant"} and all(r.status == "FINISHED" for r in runs.values())
    prompts = get_prompt_set("builtin", N)
    for method, run in runs.items():
        assert {k: run.params[f"ci.{k}"] for k in ("level", "resamples", "set_resamples", "seed", "method", "test")} \
            == {"level": "0.9", "resamples": "500", "set_resamples": "200", "seed": "7", "method": "bca",
                "test": "bootstrap"}
        table = per_image(done, method)
        assert list(table["key"]) == list(prompts.keys) and list(table["seed"]) == prompts.seeds()
        if method == "none":  # psnr/ssim need the 16-bit images: not computed on themselves
            assert list(table.columns) == ["key", "seed"] and "psnr.lo" not in run.metrics
            continue
        assert list(table.columns) == ["key", "seed", "psnr", "ssim"]
        for m in ("psnr", "ssim"):
            lo, value, hi = run.metrics[f"{m}.lo"], run.metrics[m], run.metrics[f"{m}.hi"]
            assert run.metrics[f"{m}_n"] == N and lo < value < hi
            assert value == pytest.approx(float(np.mean(table[m].to_numpy())), rel=1e-12)


def test_report_tables_show_intervals_and_paired_best(done: dict) -> None:
    tables = done["root"] / "report" / "tables"
    [md] = [p for p in tables.glob("*.md")]
    text = md.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "mxfp4" in line}
    assert len(rows) == 2 and all(line.count("±") == 2 for line in rows.values())
    assert "paired bootstrap at the 90% level" in text and "90% bootstrap interval" in text
    assert any("**" in line for line in rows.values())  # the best (and any not significantly worse) in bold
    assert r"$\pm$" in md.with_suffix(".tex").read_text()
    csv = pd.read_csv(md.with_suffix(".csv"))
    for method in ("rtn", "smoothquant"):
        row = csv[csv["method"] == method].iloc[0]
        metrics = done["runs"][method].metrics
        assert (row["psnr_lo"], row["psnr"], row["psnr_hi"]) == pytest.approx(
            (metrics["psnr.lo"], metrics["psnr"], metrics["psnr.hi"]), rel=1e-12)


def test_compare_prints_the_paired_difference(done: dict, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = done["runs"]["rtn"], done["runs"]["smoothquant"]
    capsys.readouterr()
    assert cli.main(["report", "--tracking-uri", done["uri"], "--compare", a.tags["label"], b.tags["cell_hash"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"A = {a.tags['label']} (run {a.run_id}") and f"B = {b.tags['label']}" in out
    assert "90% interval" in out and "paired bootstrap (BCa)" in out
    ta, tb = per_image(done, "rtn"), per_image(done, "smoothquant")
    expected = paired_difference(ta["psnr"], tb["psnr"], Bootstrap(level=0.9, resamples=500, seed=7))
    assert expected.diff == pytest.approx(a.metrics["psnr"] - b.metrics["psnr"], rel=1e-9)
    [line] = [x for x in out.splitlines() if x.startswith("psnr ")]
    fields = line.split()
    assert int(fields[1]) == N and float(fields[2]) == pytest.approx(expected.diff, abs=0.01)
    assert line.count("[") == 1 and expected.lo < expected.diff < expected.hi
    # by run id; an unknown reference is a clear error (exit 2)
    assert cli.main(["report", "--tracking-uri", done["uri"], "--compare", a.run_id, b.run_id]) == 0
    assert cli.main(["report", "--tracking-uri", done["uri"], "--compare", "nope", b.run_id]) == 2
    assert "--compare nope: no loaded run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the suite block

BASE = """
name: s
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 8}
prompts: {set: builtin, n: 4}
methods:
  - {method: rtn, format: mxfp4}
"""


def test_uncertainty_and_metric_options_leave_the_cell_hash(tmp_path: Path) -> None:
    plain = load_suite(write(tmp_path, BASE + "metrics: [psnr, fd_fmnist]\n", "a.yaml"))
    extra = "metrics: [psnr, {name: fd_fmnist, min_n: 3}]\nuncertainty: {level: 0.8, seed: 3, test: wilcoxon}\n"
    tuned = load_suite(write(tmp_path, BASE + extra, "b.yaml"))
    assert plain.uncertainty == Bootstrap() and plain.metric_options == {}
    assert tuned.uncertainty == Bootstrap(level=0.8, seed=3, test="wilcoxon")
    assert tuned.metrics == ("psnr", "fd_fmnist") and tuned.metric_options == {"fd_fmnist": {"min_n": 3}}
    assert [c.hash for c in expand(plain)] == [c.hash for c in expand(tuned)]


@pytest.mark.parametrize(("block", "message"), [
    ("uncertainty: {level: 1.5}", r"s\.yaml:7: uncertainty\.level: 1\.5 is out of range \(valid: 0\.5 <= level < 1"),
    ("uncertainty: {resamples: 5}", r"uncertainty\.resamples: 5 is out of range \(valid: 20\.\.1000000\)"),
    ("uncertainty: {method: bc}", r"uncertainty\.method: 'bc' is not valid \(valid: bca, percentile\)"),
    ("uncertainty: {test: t}", r"uncertainty\.test: 't' is not valid \(valid: bootstrap, wilcoxon\)"),
    ("uncertainty: {levl: 0.9}", r"unknown key 'levl'; did you mean level\? \(valid: level, resamples"),
    ("uncertainty: {seed: -1}", r"uncertainty\.seed: -1 is out of range \(valid: >= 0\)"),
    ("metrics: [{name: psnr, min_n: 3}]", r"metrics\[0\]: metric psnr: bad options \['min_n'\]"),
    ("metrics: [{min_n: 3}]", r"metrics\[0\]: a metric with options needs its name"),
])
def test_bad_blocks_name_file_field_and_valid_values(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_suite(write(tmp_path, BASE + block + "\n", "s.yaml"))


def test_result_metrics_log_summaries_warnings_and_statuses() -> None:
    from ptqbench import schema
    from ptqbench.evaluate import EvalResult
    from ptqbench.metrics.base import MetricResult

    results = {
        "psnr": MetricResult("psnr", 20.0, 4, per_image=(19.0, 20.0, 20.0, 21.0), lo=19.5, hi=20.5, level=0.95),
        "fd": MetricResult("fd", 3.0, 4, higher_is_better=False, lo=1.0, hi=4.0, level=0.95, warning="n=4 < 128"),
        "kid": MetricResult("kid", None, 0, "not_computed", "needs real images"),
    }
    result = EvalResult(results, pd.DataFrame(), 0, 0, 4.5, 100, [], {}, Path("."), {"generate": 1.0})
    metrics, tags = schema.result_metrics(result, 2.0)
    assert {k: metrics[k] for k in ("psnr", "psnr_n", "psnr.lo", "psnr.hi", "fd", "fd_n", "fd.lo", "fd.hi")} == {
        "psnr": 20.0, "psnr_n": 4, "psnr.lo": 19.5, "psnr.hi": 20.5, "fd": 3.0, "fd_n": 4, "fd.lo": 1.0, "fd.hi": 4.0}
    assert not any(k.startswith("kid") for k in metrics)
    assert tags == {"metric_warning.fd": "n=4 < 128", "metric_status.kid": "not_computed: needs real images"}
    assert schema.interval_params(Bootstrap(level=0.9)) == {
        "ci.level": 0.9, "ci.resamples": 2000, "ci.set_resamples": 200, "ci.seed": 0, "ci.method": "bca",
        "ci.test": "bootstrap"}
    assert schema.interval_params(None) == {}
