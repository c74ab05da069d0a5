"""``ptqbench run``: cells into MLflow per the contract, skip on rerun, crash isolation, resume after
SIGKILL with every cell finished exactly once, and identical metrics from independent runs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when

from ptqbench import cli
from ptqbench.method import METHODS
from ptqbench.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent

MINI = """
name: mini
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 2}
prompts: {set: builtin, n: 2}
calibration: {set: builtin-calib, n: 1, steps: 2, rows: 16}
metrics: [psnr, ssim, lpips]
budget:
  reference: {method: svdquant, rank: 4, branch: bf16}
  per_layer: true
methods:
  - {method: rtn, format: [mxfp4, int4_g64]}
  - {method: smoothquant, format: mxfp4}
  - {method: loraq, format: mxfp4, branch: mxfp8_e4m3, rank: budget, steps: 3, rotation: random}
"""

# Test methods, registered in-process by a fixture and in subprocesses by the launcher below.
PLUGIN = '''
import os
import time
from dataclasses import dataclass

from ptqbench.layers import QuantLinear
from ptqbench.method import METHODS, Method, register_method

if "slowrtn" not in METHODS._entries:
    @register_method("slowrtn")
    @dataclass(frozen=True)
    class SlowRTN(Method):
        """RTN that sleeps $PTQ_TEST_DELAY seconds per layer (to be killed in the middle)."""

        def quantize_layer(self, layer, stats=None):
            time.sleep(float(os.environ.get("PTQ_TEST_DELAY", "0")))
            return QuantLinear.from_layer(layer, self.weight_format, self.act_format)

    @register_method("boom")
    @dataclass(frozen=True)
    class Boom(Method):
        """A method that crashes."""

        def quantize_layer(self, layer, stats=None):
            raise RuntimeError("boom: this method always fails")
'''
LAUNCHER = """
import sys
import torch
torch.set_num_threads({threads})
exec(open({plugin!r}).read())
from ptqbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


# tiny tensors: threads only add overhead, and compiling each format costs more than it saves (the
# environment reaches the subprocesses too)
pytestmark = pytest.mark.usefixtures("one_thread", "eager_formats")


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "plugin.py"
    path.write_text(PLUGIN, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def test_methods(plugin_file: Path):
    exec(plugin_file.read_text(encoding="utf-8"), {})
    yield
    for name in ("slowrtn", "boom"):
        METHODS.unregister(name)


def store(folder: Path, template: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlflow.db").write_bytes(template.read_bytes())
    return f"sqlite:///{folder}/mlflow.db"


def write_suite(folder: Path, text: str, name: str = "suite.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def run(suite: Path, uri: str, cache: Path, *extra: str) -> int:
    return cli.main(["run", str(suite), "--tracking-uri", uri, "--cache-dir", str(cache), "--device", "cpu", *extra])


def runs_by_hash(uri: str, experiment: str) -> dict[str, list]:
    tracker = Tracker(uri)
    out: dict[str, list] = {}
    for r in tracker.runs(tracker.experiment(experiment)):
        out.setdefault(r.tags["cell_hash"], []).append(r)
    return out


def metric_values(runs: dict[str, list]) -> dict[str, dict[str, float]]:
    """Each finished cell's metrics without the timings."""
    return {
        h: {k: v for k, v in rs[0].metrics.items() if not k.startswith("seconds_")}
        for h, rs in runs.items() if rs[0].status == "FINISHED"
    }


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, template_db: Path) -> dict:
    """The mini suite run once into a fresh store (shared by the tests that read it)."""
    root = tmp_path_factory.mktemp("clean")
    uri = store(root, template_db)
    suite = write_suite(root, MINI)
    start = time.perf_counter()
    code = run(suite, uri, root / "cache")
    return {"root": root, "uri": uri, "suite": suite, "code": code, "seconds": time.perf_counter() - start}


def test_run_logs_every_cell_per_the_contract(clean_run: dict) -> None:
    assert clean_run["code"] == 0
    runs = runs_by_hash(clean_run["uri"], "mini")
    assert len(runs) == 5 and all(len(rs) == 1 for rs in runs.values())  # reference + 4 cells, once each
    tracker = Tracker(clean_run["uri"])
    by_method = {}
    for h, [r] in runs.items():
        assert r.status == "FINISHED" and r.tags["ptqbench.status"] == "finished"
        assert r.tags["cell_hash"] == h == r.params["cell_hash"]
        assert r.tags["suite"] == "mini" and r.tags["model"] == r.params["model"] == "tiny-pixart"
        assert r.tags["label"] == r.name and r.tags["prompt_set"] == "builtin"
        assert r.tags["metric_direction.psnr"] == "higher" and r.tags["metric_direction.lpips"] == "lower"
        assert r.tags["metric_status.lpips"].startswith("not_computed: ")  # no AlexNet weights offline
        assert "lpips" not in r.metrics
        if r.tags["is_reference"] == "true":  # psnr needs the reference: not scored against itself
            assert "psnr" not in r.metrics and "not compared with itself" in r.tags["metric_status.psnr"]
        else:
            assert r.metrics["psnr_n"] == 2
        for key in ("gen.steps", "gen.guidance", "gen.resolution", "n_prompts", "versions.torch", "versions.mlflow",
                    "git_commit"):
            assert key in r.params, key
        # the exact bits of the dry run are the bits evaluate() measured on the loaded model
        assert float(r.params["bits_per_weight"]) == pytest.approx(r.metrics["bits_per_weight"], rel=1e-12)
        assert int(r.params["model_bytes"]) == r.metrics["model_bytes"]
        for key in ("seconds_generate", "seconds_metrics", "seconds_total"):
            assert r.metrics[key] >= 0
        arts = set(tracker.artifacts(r.run_id))
        assert {"config.yaml", "layer_errors.csv", "patch_report.json", "grid.png", "samples/index.json",
                "samples/000.png", "samples/001.png"} <= arts
        by_method.setdefault(r.tags["method"], []).append(r)
    [ref] = by_method["none"]
    assert ref.tags["is_reference"] == "true" and 16 < ref.metrics["bits_per_weight"] < 16.5  # biases count
    [loraq] = by_method["loraq"]
    assert loraq.tags["is_reference"] == "false"
    assert loraq.params["branch_format"] == "mxfp8_e4m3" and loraq.params["budget.reference.method"] == "svdquant"
    assert int(loraq.params["rank_per_layer.min"]) >= 1
    assert "layer_rel_weight_error_mean" in loraq.metrics and 0 < loraq.metrics["layer_rel_weight_error_max"] < 1
    assert loraq.metrics["psnr"] > 10 and ref.metrics["model_bytes"] > loraq.metrics["model_bytes"]
    # artifacts: the resolved config and the same sample prompts/seeds in every cell of the model
    root = clean_run["root"]
    local = Path(tracker.client.download_artifacts(loraq.run_id, "", str(root / "dl")))
    import yaml

    config = yaml.safe_load((local / "config.yaml").read_text())
    assert config["cell_hash"] == loraq.tags["cell_hash"] and config["config"]["rank_per_layer"]
    samples = json.loads((local / "samples" / "index.json").read_text())
    ref_local = Path(tracker.client.download_artifacts(ref.run_id, "samples", str(root / "dl_ref")))
    assert [(s["prompt"], s["seed"]) for s in samples] == [
        (s["prompt"], s["seed"]) for s in json.loads((ref_local / "index.json").read_text())
    ]
    report = json.loads((local / "patch_report.json").read_text())
    assert len(report["quantized"]) == 16 and "proj_out" in report["skipped"]


def test_rerun_skips_every_cell(clean_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    before = runs_by_hash(clean_run["uri"], "mini")
    capsys.readouterr()
    assert run(clean_run["suite"], clean_run["uri"], clean_run["root"] / "cache") == 0
    err = capsys.readouterr().err
    assert "5 cells, 5 already finished, 0 to run" in err and "0 finished, 5 skipped, 0 failed" in err
    after = runs_by_hash(clean_run["uri"], "mini")
    ids = lambda runs: {h: [r.run_id for r in rs] for h, rs in runs.items()}  # noqa: E731
    assert ids(after) == ids(before)


def test_crashing_cell_is_recorded_and_the_suite_goes_on(
    tmp_path: Path, template_db: Path, test_methods: None, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = store(tmp_path, template_db)
    suite = write_suite(tmp_path, """
        name: crash
        models: [tiny-pixart]
        defaults: {steps: 1, resolution: 32}
        prompts: {set: builtin, n: 1}
        metrics: [psnr]
        methods:
          - {method: boom, format: mxfp4}
          - {method: rtn, format: mxfp4}
        """)
    for attempt in range(2):  # the failed cell runs again on rerun, and still fails; never duplicated
        assert run(suite, uri, tmp_path / "cache") == 1
        runs = runs_by_hash(uri, "crash")
        assert sorted(len(rs) for rs in runs.values()) == [1, 1, 1]
        [failed] = [rs[0] for rs in runs.values() if rs[0].tags["method"] == "boom"]
        assert failed.status == "FAILED" and failed.tags["ptqbench.status"] == "failed"
        assert failed.tags["ptqbench.error"] == "RuntimeError: boom: this method always fails"
        client = Tracker(uri).client
        local = client.download_artifacts(failed.run_id, "traceback.txt", str(tmp_path / f"t{attempt}"))
        text = Path(local).read_text()
        assert "Traceback" in text and "boom" in text
        assert sum(rs[0].status == "FINISHED" for rs in runs.values()) == 2
    assert "cell failed: tiny-pixart boom" in capsys.readouterr().err


def _running(db: Path, label_part: str) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(
                "SELECT name FROM runs WHERE status = 'RUNNING' AND lifecycle_stage = 'active'"
            ).fetchall()
    except sqlite3.Error:
        return False
    return any(label_part in (name or "") for (name,) in rows)


def test_sigkill_mid_cell_then_rerun_finishes_each_cell_once_with_identical_metrics(
    clean_run: dict, tmp_path: Path, template_db: Path, plugin_file: Path, test_methods: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = store(tmp_path, template_db)
    suite = write_suite(tmp_path, MINI.replace(
        "  - {method: smoothquant", "  - {method: slowrtn, format: int4_g64}\n  - {method: smoothquant"
    ))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(threads=torch.get_num_threads(), plugin=str(plugin_file)), encoding="utf-8")
    args = [sys.executable, str(launcher), "run", str(suite), "--tracking-uri", uri, "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu"]
    env = {**os.environ, "PTQ_TEST_DELAY": "3"}
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    sigkill_when(proc, lambda: _running(tmp_path / "mlflow.db", "slowrtn"), "the slow cell started", log.read_text,
                 poll=0.1)
    assert proc.returncode == -signal.SIGKILL
    killed = runs_by_hash(uri, "mini")
    stale = [r for rs in killed.values() for r in rs if r.status == "RUNNING"]
    assert [r.tags["method"] for r in stale] == ["slowrtn"]

    monkeypatch.setenv("PTQ_TEST_DELAY", "0")
    assert run(suite, uri, tmp_path / "cache") == 0
    runs = runs_by_hash(uri, "mini")
    assert len(runs) == 6
    assert all(len(rs) == 1 and rs[0].status == "FINISHED" for rs in runs.values())
    assert stale[0].run_id not in {rs[0].run_id for rs in runs.values()}
    # identical numbers from an independent run (other store, other cache, killed and resumed)
    clean = metric_values(runs_by_hash(clean_run["uri"], "mini"))
    again = metric_values(runs)
    shared = set(clean) & set(again)
    assert len(shared) == 5
    for h in shared:
        assert again[h] == clean[h], h


@pytest.mark.slow
def test_smoke_suite_runs_and_reruns(tmp_path: Path, template_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = store(tmp_path, template_db)
    suite = REPO / "suites" / "smoke.yaml"
    start = time.perf_counter()
    assert run(suite, uri, tmp_path / "cache", "--threads", "1") == 0
    first = time.perf_counter() - start
    runs = runs_by_hash(uri, "smoke")
    assert len(runs) == 18 and all(len(rs) == 1 and rs[0].status == "FINISHED" for rs in runs.values())
    assert {rs[0].params["threads"] for rs in runs.values()} == {"1"}
    methods = {rs[0].tags["method"] for rs in runs.values()}
    assert methods == {"none", "rtn", "smoothquant", "svdquant", "loraq"}
    capsys.readouterr()
    assert run(suite, uri, tmp_path / "cache") == 0
    assert "18 cells, 18 already finished, 0 to run" in capsys.readouterr().err
    print(f"smoke suite: {first:.1f} s")


def test_missing_data_or_weights_exit_2_before_any_cell_runs(
    tmp_path: Path, template_db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PTQBENCH_MJHQ", raising=False)
    monkeypatch.delenv("PTQBENCH_MODEL_PIXART_SIGMA", raising=False)
    uri = store(tmp_path, template_db)
    no_prompts = write_suite(tmp_path, MINI.replace("{set: builtin, n: 2}", "{set: mjhq, n: 2}"), "a.yaml")
    no_weights = write_suite(tmp_path, "name: w\nmodels: [pixart-sigma]\nmethods: [{method: rtn}]\n", "b.yaml")
    capsys.readouterr()
    assert run(no_prompts, uri, tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ptqbench run: error: ") and "a.yaml: prompts: prompt file meta_data.json" in err
    assert run(no_weights, uri, tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model pixart-sigma: weights of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS are not available" in err
    assert runs_by_hash(uri, "mini") == {} and runs_by_hash(uri, "w") == {}
