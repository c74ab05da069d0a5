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
