"""MLflow tracking: run lifecycle by cell hash, limits on keys and values, a real ``mlflow server``
(the lease and concurrent claims: tests/test_concurrency.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Server, free_port, fresh_store

from ptqbench.tracking import (
    DEFAULT_URI,
    MAX_KEY,
    MAX_PARAM_VALUE,
    TRUNCATED,
    Tracker,
    flatten,
    local_artifact_root,
    resolve_uri,
    safe_key,
    truncate,
)


@pytest.fixture
def tracker(tmp_path: Path, template_db: Path) -> Tracker:
    return Tracker(fresh_store(tmp_path, template_db))


def test_uri_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri() == DEFAULT_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_uri() == "http://127.0.0.1:1"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.chdir(tmp_path)
    assert local_artifact_root("sqlite:///mlflow.db") == tmp_path.resolve() / "mlartifacts"
    assert local_artifact_root(f"sqlite:///{tmp_path}/sub/m.db") == tmp_path / "sub" / "mlartifacts"
    assert local_artifact_root("http://127.0.0.1:5000") is None


def test_flatten_and_limits() -> None:
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None, "g": {}})
    assert flat == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "None", "g": "{}"}
    long = "v" * (MAX_PARAM_VALUE + 10)
    value = flatten({"k": long})["k"]
    assert len(value) == MAX_PARAM_VALUE and value.endswith(TRUNCATED)
    assert truncate("short", 10) == "short"
    k1, k2 = safe_key("k" * 300 + "1"), safe_key("k" * 300 + "2")
    assert len(k1) == MAX_KEY and k1 != k2
    assert safe_key("metric_status.fid (x)*") == "metric_status.fid _x__"


def test_cell_lifecycle(tracker: Tracker, tmp_path: Path) -> None:
    exp = tracker.experiment("suite-a", {"suite_file": "a.yaml"})
    assert tracker.experiment("suite-a") == exp
    claim = tracker.claim(exp, "abc123", "cell one", {"cell_hash": "abc123", "model": "m"})
    assert claim.state == "won"  # nothing yet: run it
    run = claim.run_id
    logged = tracker.log_params(run, {f"p{i}": i for i in range(250)} | {"long": "x" * 7000})
    assert len(logged) == 251 and logged["long"].endswith(TRUNCATED)
    tracker.log_metrics(run, {"psnr": 21.5, "psnr_n": 4, "fid": None})
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "config.yaml").write_text("a: 1\n")
    tracker.log_artifacts(run, tmp_path / "art")
    tracker.finish(run)

    [found] = tracker.find(exp, "abc123")
    assert found.status == "FINISHED" and found.tags["ptqbench.status"] == "finished"
    assert found.metrics == {"psnr": 21.5, "psnr_n": 4.0}
    assert found.params["p249"] == "249" and len(found.params) == 251
    assert tracker.artifacts(run) == ["config.yaml"]
    # artifacts of a local store go next to the database, not into the working directory
    assert (tmp_path / "mlartifacts").is_dir()
    again = tracker.claim(exp, "abc123", "cell one", {"cell_hash": "abc123"})
    assert again.state == "finished" and again.run.run_id == run  # finished: skip


def expire(tracker: Tracker, run_id: str) -> None:
    """Make a run look like that of a killed process: its lease ran out."""
    tracker.release(run_id)
    tracker.client.set_tag(run_id, "ptqbench.lease_until", str(time.time() - 1))


def test_stale_and_failed_runs_are_replaced(tracker: Tracker) -> None:
    exp = tracker.experiment("suite-b")
    killed = tracker.start(exp, "c", {"cell_hash": "beef"})  # left RUNNING, as after SIGKILL
    expire(tracker, killed)
    failed = tracker.start(exp, "c", {"cell_hash": "beef"})
    tracker.fail(failed, "RuntimeError: boom", "Traceback...\nRuntimeError: boom")
    runs = {r.run_id: r for r in tracker.find(exp, "beef")}
    assert runs[failed].status == "FAILED" and runs[failed].tags["ptqbench.error"] == "RuntimeError: boom"
    assert runs[killed].status == "RUNNING"
    assert tracker.artifacts(failed) == ["traceback.txt"]

    claim = tracker.claim(exp, "beef", "c", {"cell_hash": "beef"})  # both retired; the cell must run
    assert claim.state == "won"
    fresh = claim.run_id
    assert [r.run_id for r in tracker.find(exp, "beef")] == [fresh]
    old = tracker.client.get_run(killed)  # marked before it was deleted (restorable)
    assert old.info.status == "KILLED" and old.info.lifecycle_stage == "deleted"
    assert old.data.tags["ptqbench.superseded_by"] == fresh and "lease" in old.data.tags["ptqbench.error"]
    tracker.finish(fresh)
    extra = tracker.start(exp, "c", {"cell_hash": "beef"})  # a duplicate (a lease lost while alive)
    tracker.release(extra)
    tracker.client.set_terminated(extra, "FINISHED")
    assert tracker.claim(exp, "beef", "c", {}).run.run_id == fresh
    assert [r.run_id for r in tracker.find(exp, "beef")] == [fresh]
    with pytest.raises(ValueError):
        tracker.find(exp, "x' OR '1'='1")


def test_deleted_experiment_is_restored(tracker: Tracker) -> None:
    exp = tracker.experiment("suite-c")
    tracker.client.delete_experiment(exp)
    assert tracker.experiment("suite-c") == exp
    assert tracker.client.get_experiment(exp).lifecycle_stage == "active"


def test_unreachable_store_is_a_user_error() -> None:
    from ptqbench.errors import UserError

    start = time.time()
    with pytest.raises(UserError, match="no MLflow server answers"):
        Tracker(f"http://127.0.0.1:{free_port()}").experiment("x")
    assert time.time() - start < 15


def test_real_mlflow_server(mlflow_server: Server, tmp_path: Path) -> None:
    tracker = Tracker(mlflow_server.url)
    exp = tracker.experiment("served")
    run = tracker.start(exp, "cell", {"cell_hash": "0a1b", "is_reference": "false"})
    tracker.log_params(run, {"method": "rtn", "weight_format": {"block": 32}})
    tracker.log_metrics(run, {"psnr": 30.0})
    art = tmp_path / "a"
    art.mkdir()
    (art / "layer_errors.csv").write_text("layer,rel_weight_error\nx,0.1\n")
    tracker.log_artifacts(run, art)
    tracker.finish(run)
    stale = tracker.start(exp, "cell", {"cell_hash": "0a1c"})
    expire(tracker, stale)
    claim = tracker.claim(exp, "0a1c", "cell", {"cell_hash": "0a1c"})
    assert claim.state == "won" and [r.run_id for r in tracker.find(exp, "0a1c")] == [claim.run_id]
    assert stale not in [r.run_id for r in tracker.runs(exp)]
    tracker.fail(claim.run_id, "RuntimeError: x")

    [found] = tracker.find(exp, "0a1b")
    assert found.status == "FINISHED"
    assert found.params == {"method": "rtn", "weight_format.block": "32"}
    assert found.metrics == {"psnr": 30.0}
    assert tracker.artifacts(run) == ["layer_errors.csv"]
    assert list((mlflow_server.folder / "art").rglob("layer_errors.csv"))  # proxied to the server's artifact folder
