"""Scoring apart from generation: one more metric on a finished suite generates no image and lands in
the existing runs; ``ptqbench score`` re-scores a suite or one run from the saved images."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fresh_store

from ptqbench import cli
from ptqbench.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # eager fake-quant: no kernel builds for these few images

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


def test_added_metric_is_scored_from_saved_images(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    uri = fresh_store(tmp_path, template_db)  # a migrated store: creating one takes seconds
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


RESCORE = """
name: rescore
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 4}
prompts: {set: builtin, n: 4}
metrics: [psnr, {name: fd_fmnist_ref, min_n: 3}]
uncertainty: {level: 0.8, resamples: 100, set_resamples: 20, seed: 7}
methods:
  - {method: rtn, format: mxfp4}
"""
# Rescored with the defaults' intervals and no fd option: the run's own settings must win.
RESCORE_MORE = """
name: rescore
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 4}
prompts: {set: builtin, n: 4}
metrics: [psnr, fd_fmnist_ref, ssim, {name: kid_fmnist_ref, min_n: 3}]
methods:
  - {method: rtn, format: mxfp4}
"""


def test_rescoring_keeps_the_runs_settings_and_merges_its_per_image_table(
    tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with non-default intervals and a metric option, rescored with more metrics: the new
    intervals use the run's ci params, the old metric its logged option, a new one the suite's
    option (then logged); per_image.csv keeps its columns byte for byte and gains the new one."""
    from ptqbench.metrics.base import read_per_image
    from ptqbench.uncertainty import Bootstrap, mean_interval

    uri = fresh_store(tmp_path, template_db)  # a migrated store: creating one takes seconds
    suite = tmp_path / "suite.yaml"
    suite.write_text(RESCORE, encoding="utf-8")
    common = ["--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert cli.main(["run", str(suite), *common]) == 0
    tracker = Tracker(uri)

    def rtn() -> object:
        return next(r for r in tracker.runs(tracker.experiment("rescore")) if r.tags["method"] == "rtn")

    def table_text(run_id: str) -> str:
        return Path(tracker.client.download_artifacts(run_id, "per_image.csv", str(tmp_path / "dl"))).read_text()

    before = rtn()
    old_text = table_text(before.run_id)
    assert old_text.splitlines()[0] == "key,seed,psnr" and before.params["metric_options.fd_fmnist_ref.min_n"] == "3"
    assert "fd_fmnist_ref" in before.metrics and "metric_warning.fd_fmnist_ref" not in before.tags  # min_n=3: no caveat

    def refuse(*args, **kwargs):
        raise AssertionError("scoring must not generate images")

    monkeypatch.setattr("ptqbench.imagestore.ImageWriter.write", refuse)
    monkeypatch.setattr("ptqbench.models.diffusers_models.DiffusersPipeline.generate", refuse, raising=False)
    suite.write_text(RESCORE_MORE, encoding="utf-8")
    assert cli.main(["run", str(suite), *common]) == 0  # the runner scores ssim and kid into the finished runs
    after = rtn()
    assert after.run_id == before.run_id and after.metrics["images_generated"] == 4
    new_text = table_text(after.run_id)
    old_rows, new_rows = old_text.splitlines(), new_text.splitlines()
    assert new_rows[0] == "key,seed,psnr,ssim" and len(new_rows) == len(old_rows) == 5
    assert [r.rsplit(",", 1)[0] for r in new_rows] == old_rows  # old cells unchanged, byte for byte
    table = read_per_image(tmp_path / "dl" / "per_image.csv")
    run_ci = Bootstrap(level=0.8, resamples=100, set_resamples=20, seed=7)
    iv = mean_interval(table["ssim"].to_numpy(), run_ci)
    assert (after.metrics["ssim.lo"], after.metrics["ssim.hi"]) == (iv.lo, iv.hi)
    assert (iv.lo, iv.hi) != (lambda d: (d.lo, d.hi))(mean_interval(table["ssim"].to_numpy()))  # not the defaults
    assert after.metrics["ssim"] == pytest.approx(float(table["ssim"].mean()), rel=1e-12)
    assert after.params["metric_options.kid_fmnist_ref.min_n"] == "3" and "kid_fmnist_ref.lo" in after.metrics
    assert {k: after.params[k] for k in ("ci.level", "ci.seed")} == {"ci.level": "0.8", "ci.seed": "7"}

    # the old metric again, by name: its logged min_n (no caveat), not the suite's default (a caveat at n < 128)
    capsys.readouterr()
    assert cli.main(["score", "--run", after.run_id, "--tracking-uri", uri, "--device", "cpu"]) == 0
    assert "scored nothing (every score is current)" in capsys.readouterr().err  # keys hold the options
    assert cli.main(["score", str(suite), "--metrics", "fd_fmnist_ref,ssim", "--tracking-uri", uri,
                     "--device", "cpu"]) == 0
    again = rtn()
    assert "metric_warning.fd_fmnist_ref" not in again.tags
    assert again.metrics["fd_fmnist_ref"] == before.metrics["fd_fmnist_ref"]
    assert (again.metrics["fd_fmnist_ref.lo"], again.metrics["fd_fmnist_ref.hi"]) == (
        before.metrics["fd_fmnist_ref.lo"], before.metrics["fd_fmnist_ref.hi"])  # 20 set resamples, seed 7
    assert (again.metrics["ssim.lo"], again.metrics["ssim.hi"]) == (iv.lo, iv.hi)
    assert table_text(again.run_id) == new_text


def test_logged_settings_read_back_and_per_image_merge_checks(tmp_path: Path) -> None:
    from ptqbench.artifacts import merge_scores
    from ptqbench.errors import UserError
    from ptqbench.metrics.base import MetricResult, write_per_image
    from ptqbench.schema import logged_metric_options
    from ptqbench.tracking import flatten
    from ptqbench.uncertainty import Bootstrap

    options = {"fid": {"min_n": 1000}, "fd": {"classifier": "/x/1.pt", "flag": True, "none": None, "w": [1, 2],
                                              "f": 0.5}}
    assert logged_metric_options({**flatten({"metric_options": options}), "seed": "3"}) == options
    assert Bootstrap.from_settings({"level": "0.9", "resamples": "500", "seed": "7"}) == Bootstrap(0.9, 500, seed=7)
    with pytest.raises(UserError, match="unknown"):
        Bootstrap.from_settings({"levels": "0.9"})
    with pytest.raises(UserError, match="not readable"):
        Bootstrap.from_settings({"seed": "x"})

    old = write_per_image(tmp_path / "old" / "per_image.csv", ["b", "a"], [2, 1],
                          {"psnr": MetricResult("psnr", 0.0, 2, per_image=(0.1 + 0.2, 1 / 3))})
    ssim = {"ssim": MetricResult("ssim", 0.0, 2, per_image=(0.5, 0.25)), "fid": MetricResult("fid", 3.0, 2)}
    merged = merge_scores(tmp_path, old, ["a", "b"], [1, 2], ssim)
    lines = merged.read_text().splitlines()
    assert lines == ["key,seed,psnr,ssim", f"b,2,{old.read_text().splitlines()[1].split(',')[2]},0.25",
                     f"a,1,{old.read_text().splitlines()[2].split(',')[2]},0.5"]
    with pytest.raises(UserError, match="not the scored images"):
        merge_scores(tmp_path, old, ["a", "c"], [1, 2], ssim)
    with pytest.raises(UserError, match="seeds"):
        merge_scores(tmp_path, old, ["a", "b"], [1, 3], ssim)
    assert merge_scores(tmp_path / "new", None, ["a"], [1], {"fid": MetricResult("fid", 3.0, 1)}) is None
