"""Scoring apart from generation: one more metric on a finished suite generates no image and lands in
the existing runs; ``ptqbench score`` re-scores a suite or one run from the saved images."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptqbench import cli
from ptqbench.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")

SUITE = """
name: scoring
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 2}
prompts: {set: builtin, n: 2}
metrics: [psnr]
methods:
  - {method: rtn, format: mxfp4}
"""


def _runs(uri: str) -> dict[str, object]:
    tracker = Tracker(uri)
    return {r.tags["method"]: r for r in tracker.runs(tracker.experiment("scoring"))}


def test_added_metric_is_scored_from_saved_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE, encoding="utf-8")
    common = ["--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(["run", str(suite), *common]) == 0
    before = _runs(uri)
    assert "ssim" not in before["rtn"].metrics and before["rtn"].metrics["images_generated"] == 2

    def refuse(*args, **kwargs):
        raise AssertionError("scoring must not generate images")

    monkeypatch.setattr("ptqbench.imagestore.ImageWriter.write", refuse)
    monkeypatch.setattr("ptqbench.models.diffusers_models.DiffusersPipeline.generate", refuse, raising=False)
    suite.write_text(SUITE.replace("[psnr]", "[psnr, ssim]"), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["run", str(suite), *common]) == 0
    err = capsys.readouterr().err
    assert "2 already finished, 0 to run" in err and "2 scored from their images" in err
    after = _runs(uri)
    assert {m: r.run_id for m, r in after.items()} == {m: r.run_id for m, r in before.items()}  # the same runs
    rtn = after["rtn"]
    assert 0 < rtn.metrics["ssim"] < 1 and rtn.metrics["ssim_n"] == 2 and rtn.metrics["psnr"] == before[
        "rtn"].metrics["psnr"]
    assert rtn.tags["metric_direction.ssim"] == "higher" and rtn.tags["score_key.ssim"]
    assert "not compared with itself" in after["none"].tags["metric_status.ssim"]

    # ptqbench score: a suite (named metrics are computed again, to the same value) and one run
    assert cli.main(["score", str(suite), "--metrics", "ssim", "--tracking-uri", uri, "--device", "cpu"]) == 0
    assert _runs(uri)["rtn"].metrics["ssim"] == rtn.metrics["ssim"]
    capsys.readouterr()
    assert cli.main(["score", "--run", rtn.run_id, "--tracking-uri", uri, "--device", "cpu"]) == 0
    assert "scored nothing (every score is current)" in capsys.readouterr().err
    assert cli.main(["score", "--run", rtn.run_id, "--metrics", "psnr", "--tracking-uri", uri]) == 0
    assert _runs(uri)["rtn"].metrics["psnr"] == rtn.metrics["psnr"]
    assert cli.main(["score", "--run", "0" * 32, "--tracking-uri", uri]) == 2
    assert cli.main(["score", str(suite), "--metrics", "nope", "--tracking-uri", uri]) == 2


def test_replicate_spread_groups_replicates() -> None:
    import math
    from types import SimpleNamespace

    import pandas as pd

    from ptqbench.report.load import SPREAD, replicate_spread
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
    spread = replicate_spread(pd.DataFrame(rows), ["psnr"]).set_index("replicate_group")
    assert spread.loc["aa", "label"] == "a0" and spread.loc["aa", "k"] == 3
    assert spread.loc["aa", "psnr"] == 22.0 and spread.loc["aa", f"psnr {SPREAD}"] == 2.0
    assert spread.loc["bb", "k"] == 1 and math.isnan(spread.loc["bb", f"psnr {SPREAD}"])
