"""Concurrent runs are safe: the lease on a running cell (fresh: left alone; stale: taken over by
exactly one racer; renewed by its heartbeat; a stale owner fenced), the cache's entry lock, and two
real ``ptqbench run`` processes on one suite, over SQLite and over a real ``mlflow server``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import Server, fresh_store
from test_tracking import expire

from ptqbench.cache import Cache
from ptqbench.errors import UserError
from ptqbench.tracking import Lease, LeaseLost, Tracker, lease_fresh

REPO = Path(__file__).resolve().parent.parent
TAGS = {"cell_hash": "c0ffee", "model": "m"}

SUITE = """
name: duo
models: [tiny-pixart]
defaults: {steps: 2, resolution: 32, batch_size: 2}
prompts: {set: builtin, n: 2}
calibration: {set: builtin-calib, n: 1, steps: 2, rows: 16}
metrics: [psnr]
methods:
  - {method: rtn, format: mxfp4}
  - {method: smoothquant, format: mxfp4}
"""


@pytest.fixture
def uri(tmp_path: Path, template_db: Path) -> str:
    return fresh_store(tmp_path, template_db)


# ============================================================================ the lease


def test_fresh_lease_is_left_alone_and_its_finish_is_kept(uri: str) -> None:
    a, b = Tracker(uri), Tracker(uri)
    exp = a.experiment("lease")
    won = a.claim(exp, "c0ffee", "cell", TAGS)
    assert won.state == "won"
    busy = b.claim(exp, "c0ffee", "cell", TAGS)
    assert busy.state == "busy" and busy.run.run_id == won.run_id
    a.finish(won.run_id)
    done = b.claim(exp, "c0ffee", "cell", TAGS)
    assert done.state == "finished" and done.run.run_id == won.run_id
    assert [r.run_id for r in a.find(exp, "c0ffee")] == [won.run_id]


def test_stale_lease_is_taken_over_exactly_once_by_racing_claimers(uri: str) -> None:
    first = Tracker(uri)
    exp = first.experiment("race")
    stale = first.claim(exp, "c0ffee", "cell", TAGS).run_id
    expire(first, stale)  # as if its process had been killed
    racers = [Tracker(uri) for _ in range(4)]
    barrier = threading.Barrier(len(racers))
    results: list[str] = []

    def claim(t: Tracker) -> None:
        barrier.wait()
        results.append(t.claim(exp, "c0ffee", "cell", TAGS).state)

    threads = [threading.Thread(target=claim, args=(t,)) for t in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == ["busy", "busy", "busy", "won"]
    [live] = first.find(exp, "c0ffee")  # the winner's run; the stale one and the losers' are gone
    assert live.status == "RUNNING" and live.tags["ptqbench.claim_gen"] == "1" and lease_fresh(live)
    old = first.client.get_run(stale)
    assert old.info.status == "KILLED" and old.data.tags["ptqbench.superseded_by"] == live.run_id
    # the stale owner is fenced: it cannot finish the cell, and its failure leaves the takeover alone
    with pytest.raises(LeaseLost):
        first.finish(stale)
    first.fail(stale, "RuntimeError: late")
    assert first.client.get_run(stale).info.status == "KILLED"
    for t in racers:
        for run_id in list(t._beats):
            t.fail(run_id, "test over")


def test_heartbeat_renews_the_lease_and_notices_a_takeover(uri: str) -> None:
    lease = Lease(heartbeat=0.2, expiry=1.0)
    a, b = Tracker(uri, lease), Tracker(uri, lease)
    exp = a.experiment("beat")
    run_id = a.claim(exp, "c0ffee", "cell", TAGS).run_id

    def until() -> float:
        return float(a.client.get_run(run_id).data.tags["ptqbench.lease_until"])

    t0 = until()
    time.sleep(1.5)  # longer than the expiry: only the heartbeat keeps it fresh
    assert until() > t0
    assert b.claim(exp, "c0ffee", "cell", TAGS).state == "busy"
    beat = a._beats[run_id]
    beat._stop.set()  # the owner stalls (no more beats, not released)
    beat._thread.join()
    time.sleep(1.2)
    taken = b.claim(exp, "c0ffee", "cell", TAGS)
    assert taken.state == "won"
    late = a.heartbeat(run_id)
    with late:
        deadline = time.time() + 5
        while not late.lost and time.time() < deadline:
            time.sleep(0.05)
    assert late.lost
    b.finish(taken.run_id)


def test_a_dead_local_owner_frees_its_lease_at_once(uri: str) -> None:
    a = Tracker(uri)
    exp = a.experiment("dead")
    run_id = a.claim(exp, "c0ffee", "cell", TAGS).run_id
    a.release(run_id)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, ns, _, token = a.owner.rsplit(":", 3)
    a.client.set_tag(run_id, "ptqbench.lease_owner", f"{host}:{ns}:{gone.stdout.strip()}:{token}")
    [run] = a.find(exp, "c0ffee")
    assert float(run.tags["ptqbench.lease_until"]) > time.time() and not lease_fresh(run)
    assert Tracker(uri).claim(exp, "c0ffee", "cell", TAGS).state == "won"
    with pytest.raises(UserError, match="heartbeat"):
        Lease(heartbeat=5, expiry=5)


# ============================================================================ the cache lock


def test_cache_entry_is_computed_once_while_others_wait(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    computed: list[int] = []
    read: list[str] = []
    barrier = threading.Barrier(3)

    def worker(i: int) -> None:
        barrier.wait()
        with cache.lock("reference", "k1") as folder:
            if not cache.done("reference", "k1"):
                time.sleep(0.3)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "x.txt").write_text("done")
                computed.append(i)
                cache.mark_done("reference", "k1")
        read.append((folder / "x.txt").read_text())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(computed) == 1 and read == ["done"] * 3
    assert len((cache.path("reference", "k1") / ".done").read_text().splitlines()) == 1
    with cache.lock("reference", "k1"), cache.lock("reference", "k1"):  # re-entrant in one thread
        pass


def test_cache_lock_times_out_with_the_holder_named(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from ptqbench.cache import Cache\n"
         f"with Cache({str(tmp_path)!r}).lock('calibration', 'k2'):\n"
         "    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting = Cache(tmp_path, lock_timeout=0.3)
        expected = rf"calibration/k2: gave up after 0 s .*held by process \S+ {holder.pid}"
        with pytest.raises(UserError, match=expected), waiting.lock("calibration", "k2"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with Cache(tmp_path, lock_timeout=5).lock("calibration", "k2"):  # the kernel dropped the dead holder's lock
        pass


# ============================================================================ two real processes


def run_twice_at_once(tmp_path: Path, uri: str) -> list[str]:
    """Two ``python -m ptqbench run`` processes on one suite, store and cache; their stderr."""
    suite = tmp_path / "duo.yaml"
    suite.write_text(SUITE, encoding="utf-8")
    # eager fake-quant (no torch.compile warm-up in each process: the lease and the locks are under test)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PTQBENCH_HEARTBEAT_S": "1",
           "PTQBENCH_LEASE_S": "20", "PTQBENCH_COMPILE": "0"}
    args = [sys.executable, "-m", "ptqbench", "run", str(suite), "--tracking-uri", uri, "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--threads", "1"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=f, cwd=tmp_path))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    return texts


def check_each_cell_finished_once(tmp_path: Path, uri: str, texts: list[str]) -> None:
    tracker = Tracker(uri)
    exp = tracker.client.get_experiment_by_name("duo").experiment_id
    runs = tracker.runs(exp)
    by_hash = Counter(r.tags["cell_hash"] for r in runs)
    assert len(by_hash) == 3 and set(by_hash.values()) == {1}, by_hash  # one active run per cell...
    assert {r.status for r in runs} == {"FINISHED"}  # ...finished; nothing live was deleted
    finished = sum(int(t.rsplit("duo: ", 1)[1].split(" finished")[0]) for t in texts)
    assert finished == 3, texts  # each cell ran in exactly one of the two processes
    dones = list((tmp_path / "cache").glob("*/*/.done"))
    kinds = Counter(p.parent.parent.name for p in dones)
    assert kinds["reference"] == 1 and kinds["calibration"] == 1, kinds
    for done in dones:  # every entry (16-bit references, calibration) was computed once
        assert len(done.read_text().splitlines()) == 1, (done, done.read_text())


@pytest.mark.slow
def test_two_processes_share_a_sqlite_store(tmp_path: Path, uri: str) -> None:
    start = time.time()
    texts = run_twice_at_once(tmp_path, uri)
    check_each_cell_finished_once(tmp_path, uri, texts)
    print(f"two processes over sqlite: {time.time() - start:.1f} s")


@pytest.mark.slow
def test_two_processes_share_an_mlflow_server(tmp_path: Path, mlflow_server: Server) -> None:
    start = time.time()
    texts = run_twice_at_once(tmp_path, mlflow_server.url)  # the session's server: experiment "duo" is this test's
    check_each_cell_finished_once(tmp_path, mlflow_server.url, texts)
    print(f"two processes over mlflow server: {time.time() - start:.1f} s")
