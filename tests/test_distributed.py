"""Results do not depend on the number of ranks: exact reductions, the keyed reservoir, and a
suite run by one process and by two gloo processes under torchrun (bit-identical PNGs,
calibration statistics and metrics)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, fresh_store
from torch import nn

from ptqbench import cli
from ptqbench import distributed as dist
from ptqbench.patching import batch_families
from ptqbench.stats import ALL_ROWS, StatsCollector, StatsSpec, merge_partials, row_keys, row_positions

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ splitting work


@pytest.mark.parametrize("n,batch,size", [(10, 3, 1), (10, 3, 2), (10, 3, 3), (4, 4, 2), (7, 1, 3)])
def test_batch_share_hands_out_whole_batches_once(n: int, batch: int, size: int) -> None:
    shares = [dist.batch_share(n, batch, r, size) for r in range(size)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    one = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    for r, share in enumerate(shares):  # rank r holds batches r, r + size, ... exactly as one process forms them
        assert share == [i for b in one[r::size] for i in b]


def test_assign_is_longest_processing_time_first() -> None:
    assert dist.assign([5, 4, 3, 3, 2, 1], 2) == [0, 1, 1, 0, 1, 0]  # loads 9 and 9
    assert dist.assign([1.0] * 5, 3) == [0, 1, 2, 0, 1]
    assert dist.assign([3, 3], 1) == [0, 0]


def test_single_process_helpers_are_plain_calls() -> None:
    assert dist.size() == 1 and dist.is_main()
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]
    t = torch.randn(3)
    assert dist.all_reduce_max(t) is t and dist.sum_in_rank_order(t) is t
    assert dist.on_main(lambda x: x + 1, 1) == 2
    assert dist.main_only(lambda: "abc").upper() == "ABC"
    with pytest.raises(ValueError):
        dist.on_main(int, "x")
    module = nn.Linear(3, 2)
    back = dist.from_bytes(dist.to_bytes({"m": module}), "cpu")["m"]
    assert torch.equal(back.weight, module.weight)


def test_batch_families_join_equal_shapes_and_qkv_groups() -> None:
    attn = nn.Module()
    attn.to_q, attn.to_k, attn.to_v = nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(4, 8)
    model = nn.Module()
    model.attn, model.out, model.up, model.down = attn, nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert batch_families(layers) == [["attn.to_q", "attn.to_k", "attn.to_v", "out"], ["up"], ["down"]]


# ------------------------------------------------------------------ exact reductions, keyed reservoir


def _inputs(batches: int = 6, calls: int = 3, tokens: int = 5, width: int = 4) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        xs = [torch.randn(tokens, width, generator=g) * torch.logspace(-2, 2, width) for _ in range(calls)]
        xs[0][0, 1] = 1e4  # an outlier
        out.append(xs)
    return out


def _shares(spec: StatsSpec, size: int, inputs: list[list[torch.Tensor]]) -> list[dict]:
    """What ``size`` ranks hold after calibration with batch size 1 (batch b on rank b % size)."""
    shares = []
    for r in range(size):
        collector = StatsCollector({"a": nn.Identity(), "b": nn.Identity()}, spec, seed=7)
        for b in dist.batch_share(len(inputs), 1, r, size):
            collector.begin_batch(b)
            for x in inputs[b]:
                collector.update("a", x)
                collector.update("b", 2 * x)
        shares.append(collector.partial())
    return shares


@pytest.mark.parametrize("xtx", ["full", "diag"])
def test_statistics_do_not_depend_on_the_number_of_ranks(xtx: str) -> None:
    inputs = _inputs()
    spec = StatsSpec(absmax=True, rows=7, xtx=xtx, heldout=4)
    results = [merge_partials(_shares(spec, size, inputs), spec) for size in (1, 2, 3)]
    for other in results[1:]:
        for name in ("a", "b"):
            one, st = results[0][name], other[name]
            assert st.count == one.count == 6 * 3 * 5
            for field in ("absmax", "rows", "xtx", "heldout"):
                assert torch.equal(getattr(st, field), getattr(one, field)), (name, field)
    # against an independent float64 re-derivation
    assert results[0]["a"].heldout.shape == (4, 4)
    rows = torch.cat([x for xs in inputs for x in xs]).double()
    assert torch.equal(results[0]["a"].absmax, rows.abs().amax(0).float())
    want = rows.T @ rows if xtx == "full" else (rows * rows).sum(0)
    assert torch.allclose(results[0]["a"].xtx.double(), want, rtol=1e-6, atol=0)


def test_the_sample_is_the_smallest_keys_in_position_order() -> None:
    inputs = _inputs()
    spec = StatsSpec(rows=7)
    got = merge_partials(_shares(spec, 2, inputs), spec)["a"].rows
    keys = torch.cat([row_keys(7, "a", b, c, 5) for b in range(6) for c in range(3)])
    pos = torch.cat([row_positions(b, c, 5) for b in range(6) for c in range(3)])
    rows = torch.cat([x for xs in inputs for x in xs])
    chosen = sorted(sorted(range(len(keys)), key=lambda i: int(keys[i]))[:7], key=lambda i: int(pos[i]))
    assert torch.equal(got, rows[chosen])


def test_all_rows_come_back_in_batch_order() -> None:
    inputs = _inputs()
    spec = StatsSpec(rows=ALL_ROWS)
    want = torch.cat([x for xs in inputs for x in xs])
    for size in (1, 2, 3):
        assert torch.equal(merge_partials(_shares(spec, size, inputs), spec)["a"].rows, want)


def test_collected_through_hooks_like_before() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    with StatsCollector({"l": layer}, StatsSpec(absmax=True, rows=ALL_ROWS, xtx="full")) as collector:
        layer(x)
    st = collector.result()["l"]
    rows = x.reshape(-1, 4)
    assert st.count == 12 and torch.equal(st.rows, rows) and torch.equal(st.absmax, rows.abs().amax(0))
    exact = rows.double().T @ rows.double()  # float32 products are exact in float64
    assert torch.allclose(st.xtx.double(), exact, rtol=1e-7, atol=0)  # accumulated in float64, rounded once


# ------------------------------------------------------------------ the collectives on 2 gloo ranks

COLLECTIVES = """\
import json, sys, torch
from torch import nn
from ptqbench import distributed as dist
from ptqbench.stats import StatsCollector, StatsSpec

w = dist.init("cpu")
r = w.rank
out = {"size": w.size, "backend": w.backend}
out["max"] = dist.all_reduce_max(torch.tensor([float(r), -float(r)])).tolist()
out["sum"] = dist.sum_in_rank_order(torch.tensor([1.0 + r], dtype=torch.float64)).tolist()
out["bcast"] = dist.broadcast_object({"r": r})
out["gather"] = dist.all_gather_object(r * 10)
out["main"] = dist.on_main(lambda: dist.rank())
try:
    dist.on_main(lambda: 1 / 0)
except ZeroDivisionError as exc:
    out["error"] = "raised" if dist.raised_on_every_rank(exc) else "raised here only"
out["local"] = dist.raised_on_every_rank(ValueError("a rank's own error"))
tracker = dist.main_only(lambda: {"made on": dist.rank()})
out["tracker"] = tracker.get("made on")
torch.manual_seed(r)
shared = dist.share_modules({f"l{r}": nn.Linear(2, 2)}, "cpu")
out["modules"] = sorted(shared)
out["weights"] = [shared[f"l{i}"].weight.sum().item() for i in range(w.size)]
g = torch.Generator().manual_seed(0)
inputs = [torch.randn(6, 3, generator=g) for _ in range(4)]
with StatsCollector({"a": nn.Identity()}, StatsSpec(absmax=True, rows=5, xtx="full")) as c:
    for b in dist.batch_share(4, 1):
        c.begin_batch(b)
        c.update("a", inputs[b])
st = c.result()["a"]
out["stats"] = [st.count, st.absmax.tolist(), st.rows.tolist(), st.xtx.tolist()]
dist.shutdown()
with open(sys.argv[1] + f".{r}", "w") as f:
    json.dump(out, f)
"""


def _env() -> dict[str, str]:
    # no torch.compile: its CPU warm-up would dominate these tiny runs (both sides run the same code)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PTQBENCH_COMPILE": "0"}


def _launch(ranks: int) -> list[str]:
    return [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                  "--master-port", str(free_port())]


def test_collectives_on_two_gloo_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES, encoding="utf-8")
    out = tmp_path / "out1"  # one process (no torchrun): here, which saves an interpreter's start
    monkeypatch.setattr(sys, "argv", [str(script), str(out)])
    with torch.random.fork_rng():
        exec(compile(COLLECTIVES, str(script), "exec"), {"__name__": "__main__"})
    results = {1: [json.loads(Path(f"{out}.0").read_text())]}
    out = tmp_path / "out2"
    cmd = [sys.executable, *_launch(2), str(script), str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results[2] = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert results[1][0]["size"] == 1 and results[1][0]["main"] == 0
    a, b = results[2]
    assert a["size"] == b["size"] == 2 and a["backend"] == "gloo"
    assert a["max"] == b["max"] == [1.0, 0.0] and a["sum"] == b["sum"] == [3.0]
    assert a["bcast"] == b["bcast"] == {"r": 0} and a["gather"] == b["gather"] == [0, 10]
    assert a["main"] == b["main"] == 0 and a["error"] == b["error"] == "raised"  # on every rank, marked so
    assert a["local"] is b["local"] is False and results[1][0]["local"] is True  # one process: always together
    assert a["tracker"] == b["tracker"] == 0
    assert a["modules"] == b["modules"] == ["l0", "l1"] and a["weights"] == b["weights"]
    assert a["stats"] == b["stats"] == results[1][0]["stats"]  # 2 ranks reduce to what 1 process collects


# ------------------------------------------------------------------ 1 vs 2 processes, end to end

SUITE = """\
name: dist
defaults: {steps: 2, resolution: 32, batch_size: 1}
models: [tiny-pixart]
prompts: {set: builtin, n: 4}
calibration: {set: builtin-calib, n: 2, steps: 2, rows: 16}
metrics: [psnr, ssim]
methods:
  - {method: svdquant, format: mxfp4, rank: 8, branch: model, num_iters: 2, num_grids: 2}
  - {method: loraq, format: mxfp4, branch: mxfp8_e4m3, rank: 8, rotation: random, steps: 3}
"""


def _run(root: Path, suite: Path, ranks: int, template: Path) -> None:
    """``ptqbench run`` of ``suite`` into a copy of the migrated ``template`` store under ``root``: one
    process in this interpreter (a plain ``ptqbench run``; eager fake-quant as :func:`_env` gives the
    torchrun processes), or ``ranks`` gloo processes under torchrun."""
    args = ["run", str(suite), "--threads", "1", "--device", "cpu", "--tracking-uri",
            fresh_store(root, template), "--cache-dir", str(root / "cache")]
    if ranks == 1:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PTQBENCH_COMPILE", "0")
            before = torch.get_num_threads()
            try:
                assert cli.main(args) == 0
            finally:
                torch.set_num_threads(before)
        return
    done = subprocess.run([sys.executable, *_launch(ranks), "-m", "ptqbench", *args], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def _files(root: Path) -> dict[str, str]:
    found = [*root.rglob("*.png"), *root.rglob("stats.safetensors"), *root.rglob("index.json")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def _metrics(root: Path) -> dict[str, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dist").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    keep = ("psnr", "ssim", "bits", "model_bytes")
    return {r.data.tags["cell_hash"]: {k: v for k, v in r.data.metrics.items() if k.startswith(keep)} for r in runs}


def test_one_and_two_gloo_processes_give_the_same_suite(tmp_path: Path, template_db: Path) -> None:
    suite = tmp_path / "dist.yaml"
    suite.write_text(SUITE, encoding="utf-8")
    _run(tmp_path / "one", suite, 1, template_db)
    _run(tmp_path / "two", suite, 2, template_db)
    one, two = _files(tmp_path / "one" / "cache"), _files(tmp_path / "two" / "cache")
    made = [k for k in one if k.endswith(".png") and ("reference" in k or "/images/" in k)]
    assert len(made) == 12  # the reference and two quantized cells' images (and the artifacts' PNGs)
    assert sum(k.endswith("stats.safetensors") for k in one) >= 1
    assert one == two
    metrics = _metrics(tmp_path / "one")
    assert len(metrics) == 3 and any("psnr" in m for m in metrics.values())
    assert metrics == _metrics(tmp_path / "two")


# ------------------------------------------------------------------ a cell failing on one rank

FAIL_ON_RANK_1 = """\
import os, sys
import ptqbench.evaluate as ev
from ptqbench import cli

real = ev.evaluate


def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)


ev.evaluate = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_cell_failing_on_one_rank_stops_the_job_at_once(tmp_path: Path, template_db: Path) -> None:
    """Rank 1 fails inside a cell while rank 0 goes on into the cell's collectives: rank 1 exits at
    once (no tracker call, no shutdown barrier: either would pair with rank 0's collective) and
    torchrun stops rank 0, long before the collective timeout; the error names the rank."""
    import time

    suite = tmp_path / "dist.yaml"
    suite.write_text(SUITE, encoding="utf-8")
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1, encoding="utf-8")
    args = ["run", str(suite), "--threads", "1", "--device", "cpu", "--tracking-uri",
            fresh_store(tmp_path, template_db), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    start = time.monotonic()
    env = {**_env(), "PTQBENCH_DIST_TIMEOUT": "900"}
    done = subprocess.run([sys.executable, *_launch(2), str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode != 0
    assert time.monotonic() - start < 300  # not the 900 s collective timeout
    assert "ptqbench: rank 1 of 2: cell failed:" in done.stderr and "injected failure on rank 1" in done.stderr
    assert "stopping the job" in done.stderr


# ------------------------------------------------------------------ the scaling benchmark, 1 vs 2 processes


def test_scaling_benchmark_on_one_and_two_gloo_processes(tmp_path: Path) -> None:
    """``benchmarks/bench_scaling.py --small``: one process and two gloo processes give the same
    latents for every variant, each stage is timed with every rank's memory, and ``--compare``
    prints the speed-ups and the agreement."""
    import json

    script = REPO / "benchmarks" / "bench_scaling.py"
    args = ["--small", "--device", "cpu", "--prompts", "4", "--calib-prompts", "2", "--batch", "1", "--steps", "2",
            "--tokens", "8", "--rows", "16"]  # fmt: skip
    outs = {}
    for ranks in (1, 2):
        outs[ranks] = tmp_path / f"scaling_{ranks}.json"
        cmd = [sys.executable, *_launch(ranks), str(script), *args, "--out", str(outs[ranks])]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    one, two = (json.loads(outs[r].read_text()) for r in (1, 2))
    assert (one["processes"], two["processes"], two["backend"]) == (1, 2, "gloo")
    assert list(one["variants"]) == ["16-bit", "svdquant", "loraq-w4a8"]
    for label, record in two["variants"].items():
        assert record["latents_sha256"] == one["variants"][label]["latents_sha256"], label
        stages = ["generation"] if label == "16-bit" else ["calibration", "quantization", "generation"]
        assert [k for k, v in record.items() if isinstance(v, dict)] == stages
        for name in stages:
            assert len(record[name]["host_peak_rss_bytes"]) == 2 and record[name]["gpu_peak_bytes"] == [None, None]
    done = subprocess.run([sys.executable, str(script), "--compare", str(outs[2]), str(outs[1])], env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| variant | stage | 1 proc") and len(lines) == 2 + 7 + 1
    assert lines[-1] == "latents identical across process counts: True"
