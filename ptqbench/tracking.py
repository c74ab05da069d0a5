"""MLflow tracking: one experiment per suite, one run per cell, found again by its ``cell_hash`` tag.

The tracking URI is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
(a SQLite file in the working directory, with artifacts in ``./mlartifacts`` next to it). Any
MLflow URI works the same, a remote ``mlflow server`` included. For a local store (``sqlite:``) artifacts go
next to the database file rather than into the current directory.

A cell's run is FINISHED (done: skipped on rerun), FAILED (recorded: run again, the failed run
deleted), or RUNNING. A RUNNING run holds a **lease**: tags ``ptqbench.lease_owner``
(``host:pidns:pid:token``) and ``ptqbench.lease_until`` (Unix seconds), renewed by a
:class:`Heartbeat` thread every ``Lease.heartbeat`` seconds to ``now + Lease.expiry``
(``$PTQBENCH_HEARTBEAT_S``, default 30; ``$PTQBENCH_LEASE_S``, default 120). Its lease is fresh
(the cell is *busy*: :meth:`Tracker.claim` leaves it alone) until ``lease_until`` passes, or at once
when the owner is a process of this host and pid namespace that no longer exists. A stale run is
taken over: marked KILLED with the reason (``ptqbench.error``, ``ptqbench.superseded_by``), then
deleted like a failed run (MLflow's deletion is soft: ``mlflow runs restore`` brings it back).
Lease times are wall clock: machines sharing a store need clocks within ``expiry - heartbeat``.

**Claims are atomic.** MLflow has no compare-and-set, but its database stores (SQLite, and
PostgreSQL/MySQL, directly or behind ``mlflow server``) keep experiment
names unique with a database constraint, so creating an experiment with a given name succeeds for
exactly one caller, however many race over SQLite's file lock or the server's workers. A cell's
runs carry a claim generation ``g`` (``ptqbench.claim_gen``); to run a cell, a process creates its
RUNNING run with ``g`` and then creates experiment ``ptqbench.claim/<experiment>/<cell hash>/<g>``
tagged with that run's id (and deletes it at once, which hides it but keeps its name taken).
Generation ``g + 1`` is only tried after the winner of ``g`` was seen FAILED or stale, ``g`` only when
no claim ``g`` exists yet; so at most one process ever wins a generation, two processes racing to
take over the same stale run cannot both win, and a stale owner is fenced: its heartbeat and
:meth:`Tracker.finish` find the run superseded and stop. The loser deletes its own run and
reports the cell busy. A file store (``./mlruns``, also as ``mlflow server``'s backend) checks
names without a lock: concurrent runs need a database store.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ptqbench import schema
from ptqbench.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
TRUNCATED = "...[truncated]"
# MLflow's limits (mlflow.utils.validation): key length, param / tag value length, batch sizes.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_INVALID_KEY_CHARS = re.compile(r"[^\w.\- :/]")


def resolve_uri(flag: str | None = None) -> str:
    """The tracking URI: the flag, else ``$MLFLOW_TRACKING_URI``, else the local SQLite default."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def local_artifact_root(uri: str) -> Path | None:
    """Where a local store keeps artifacts (``mlartifacts`` next to it); None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = uri.split("://", 1)[1]
        db = db[1:] if db.startswith("/") else db  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
        return Path(db).expanduser().resolve().parent / "mlartifacts"
    return None  # a folder store keeps artifacts inside itself; a server decides for itself


def safe_key(key: str) -> str:
    """A valid MLflow key: invalid characters replaced, at most 250 characters (a digest keeps it unique)."""
    key = _INVALID_KEY_CHARS.sub("_", str(key))
    if len(key) > MAX_KEY:
        from ptqbench.cache import cache_key

        digest = cache_key(key, length=8)
        key = key[: MAX_KEY - len(digest) - 1] + "~" + digest
    return key


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending with a marker when it was cut."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def _scalar(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings joined with dots; lists as JSON; every value a string within MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[safe_key(name)] = truncate(_scalar(value), MAX_PARAM_VALUE)
    return out


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass(frozen=True)
class CellRun:
    """A tracked run of one cell."""

    run_id: str
    status: str  # MLflow status: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    name: str
    tags: Mapping[str, str]
    metrics: Mapping[str, float]
    params: Mapping[str, str]


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        return float(text) if text else default
    except ValueError:
        raise UserError(f"${name}={text!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class Lease:
    """How often a running cell's lease is renewed and how long it lasts (seconds)."""

    heartbeat: float = 30.0
    expiry: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat < self.expiry:
            raise UserError(
                f"lease: heartbeat {self.heartbeat} s and expiry {self.expiry} s need 0 < heartbeat < expiry "
                "($PTQBENCH_HEARTBEAT_S, $PTQBENCH_LEASE_S)"
            )

    @classmethod
    def from_env(cls) -> Lease:
        return cls(_env_seconds("PTQBENCH_HEARTBEAT_S", cls.heartbeat), _env_seconds("PTQBENCH_LEASE_S", cls.expiry))


FINISHED_STATE, BUSY, WON = "finished", "busy", "won"


@dataclass(frozen=True)
class Claim:
    """What :meth:`Tracker.claim` found: ``finished`` (``run`` is the finished run), ``busy``
    (another live process has the cell; ``run`` is its run when seen) or ``won`` (``run_id`` is
    this process's new RUNNING run, holding the lease)."""

    state: str
    run: CellRun | None = None
    run_id: str = ""


class LeaseLost(RuntimeError):
    """This process's lease on a cell expired and another process took the cell over."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def owner_token() -> str:
    """``host:pidns:pid:token``: who holds a lease (the pid namespace makes the pid meaningful)."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_gone(owner: str) -> bool:
    """True only when the owner is a process of this host and pid namespace that no longer exists."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _pid_namespace():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def lease_fresh(run: CellRun, now: float | None = None) -> bool:
    """A RUNNING run whose lease has not expired and whose owner is not known to be dead."""
    if run.status != "RUNNING":
        return False
    try:
        until = float(run.tags.get(schema.LEASE_UNTIL, "0"))
    except ValueError:
        return False
    return until > (time.time() if now is None else now) and not _owner_gone(run.tags.get(schema.LEASE_OWNER, ""))


def claim_gen(run: CellRun) -> int:
    try:
        return int(run.tags.get(schema.CLAIM_GEN, "-1"))
    except ValueError:
        return -1


class Heartbeat:
    """Renews a run's lease every ``lease.heartbeat`` seconds in a daemon thread (a context manager);
    ``lost`` turns True when another process took the run over."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{run_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.tracker.lease.heartbeat):
            try:
                if self.tracker.superseded(self.run_id):
                    self.lost = True
                    print(f"run {self.run_id}: lease lost, another process took the cell over", file=sys.stderr)
                    return
                self.tracker.client.set_tag(self.run_id, schema.LEASE_UNTIL, self.tracker.lease_until())
            except Exception as exc:  # a busy store: the next beat tries again, within the expiry
                print(f"run {self.run_id}: heartbeat failed ({type(exc).__name__}: {exc})", file=sys.stderr)


class Tracker:
    """A thin layer over :class:`mlflow.MlflowClient` with the ptqbench run schema."""

    def __init__(self, uri: str | None = None, lease: Lease | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.lease = lease or Lease.from_env()
        self.owner = owner_token()
        self._beats: dict[str, Heartbeat] = {}

    def lease_until(self) -> str:
        return f"{time.time() + self.lease.expiry:.3f}"

    # ------------------------------------------------------------------ experiments
    def check(self, timeout: float = 10.0) -> None:
        """Fail fast (UserError) when an HTTP tracking server does not answer its health check."""
        import urllib.request

        if urlparse(self.uri).scheme not in ("http", "https"):
            return
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=timeout):
                pass
        except OSError as exc:
            raise UserError(
                f"tracking URI {self.uri}: no MLflow server answers ({exc}); start one (mlflow server) "
                "or pass another --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None

    def experiment(self, name: str, tags: Mapping[str, str] | None = None) -> str:
        """The id of experiment ``name``, created (or restored if deleted) when needed."""
        from mlflow.entities import LifecycleStage

        self.check()
        try:
            exp = self.client.get_experiment_by_name(name)
        except Exception as exc:  # unreachable server, unreadable store
            raise UserError(f"tracking URI {self.uri}: cannot open the store ({type(exc).__name__}: {exc})") from None
        if exp is None:
            root = local_artifact_root(self.uri)
            location = (root / _dirname(name)).as_uri() if root else None
            try:
                exp_id = self.client.create_experiment(name, artifact_location=location, tags=dict(tags or {}))
            except Exception:  # created meanwhile by another process on this store: use that one
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                self.client.restore_experiment(exp_id)
        for k, v in (tags or {}).items():
            self.client.set_experiment_tag(exp_id, safe_key(k), truncate(str(v), MAX_TAG_VALUE))
        return exp_id

    # ------------------------------------------------------------------ finding runs
    def runs(self, experiment_id: str, filter_string: str = "") -> list[CellRun]:
        """Every active run of the experiment (optionally filtered), all pages."""
        out: list[CellRun] = []
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id], filter_string, max_results=1000, page_token=token,
                order_by=["attributes.start_time ASC"],
            )
            out.extend(_cell_run(r) for r in page)
            token = page.token
            if not token:
                return out

    def find(self, experiment_id: str, cell_hash: str) -> list[CellRun]:
        """Active runs tagged with ``cell_hash``."""
        if not re.fullmatch(r"[0-9a-f]+", cell_hash):
            raise ValueError(f"cell hash must be hex, got {cell_hash!r}")
        return self.runs(experiment_id, f"tags.{schema.HASH} = '{cell_hash}'")

    def claim(self, experiment_id: str, cell_hash: str, run_name: str, tags: Mapping[str, Any]) -> Claim:
        """Decide who runs a cell: ``finished`` (skip it; extra finished runs are deleted), ``busy``
        (a live process has it) or ``won`` (a new RUNNING run with this process's lease was created;
        the cell's failed and stale runs are retired). Atomic across processes: see the module docstring."""
        runs = self.find(experiment_id, cell_hash)
        finished = [r for r in runs if r.status == "FINISHED"]
        if finished:
            for r in finished[1:]:
                self.delete(r.run_id)
            return Claim(FINISHED_STATE, finished[0])
        live = [r for r in runs if lease_fresh(r)]
        if live:
            return Claim(BUSY, live[0])
        gen = max((claim_gen(r) for r in runs), default=-1)
        if gen >= 0 and (holder := self.claim_holder(experiment_id, cell_hash, gen)):
            state = self._run_state(holder, runs)
            if state is not None:  # the winner of ``gen`` is live or finished: nothing to take over
                return Claim(state, next((r for r in runs if r.run_id == holder), None))
            gen += 1
        gen = max(gen, 0)
        run_id = self.start(experiment_id, run_name, {**tags, schema.CLAIM_GEN: gen})
        if not self._take(experiment_id, cell_hash, gen, run_id):
            self.delete(run_id)
            return Claim(BUSY)
        for r in runs:
            try:
                self._retire(r, run_id)
            except Exception as exc:  # e.g. its owner deleted it meanwhile; the claim stands
                print(f"run {r.run_id}: could not retire it ({type(exc).__name__}: {exc})", file=sys.stderr)
        self._beats[run_id] = self.heartbeat(run_id).__enter__()
        return Claim(WON, run_id=run_id)

    def claim_holder(self, experiment_id: str, cell_hash: str, gen: int) -> str:
        """The run that won claim generation ``gen`` of a cell ("" when nobody claimed it)."""
        exp = self.client.get_experiment_by_name(claim_name(experiment_id, cell_hash, gen))
        return exp.tags.get(schema.CLAIM_RUN, "") if exp is not None else ""

    def _take(self, experiment_id: str, cell_hash: str, gen: int, run_id: str) -> bool:
        """Create claim ``gen`` for ``run_id``; True when this call won it (the store's name constraint decides)."""
        name = claim_name(experiment_id, cell_hash, gen)
        location = None
        root = local_artifact_root(self.uri)
        if root is not None:
            location = (root / "claims").as_uri()
        try:
            claim_id = self.client.create_experiment(name, artifact_location=location, tags={schema.CLAIM_RUN: run_id})
        except Exception:  # taken by another process, or a failed call: the stored claim says who won
            return self.claim_holder(experiment_id, cell_hash, gen) == run_id
        self.client.delete_experiment(claim_id)  # hidden from lists and reports; its name stays taken
        return True

    def _run_state(self, run_id: str, seen: list[CellRun]) -> str | None:
        """``busy`` / ``finished`` for a live / finished run, None when it is dead (failed, stale, deleted)."""
        run = next((r for r in seen if r.run_id == run_id), None)
        if run is None:
            try:
                run = _cell_run(self.client.get_run(run_id))
            except Exception:
                return None
        if run.status == "FINISHED":
            return FINISHED_STATE
        return BUSY if lease_fresh(run) else None

    def _retire(self, run: CellRun, successor: str) -> None:
        """A dead run of a cell taken over by ``successor``: a stale RUNNING one is marked KILLED with
        the reason first; then it is deleted (soft: restorable), as a failed run is."""
        if run.status == "RUNNING":
            owner = run.tags.get(schema.LEASE_OWNER, "unknown")
            reason = f"KILLED: lease of {owner} expired or its process is gone; taken over by run {successor}"
            self.set_tags(run.run_id, {schema.ERROR: reason, schema.STATUS: schema.FAILED,
                                       schema.SUPERSEDED_BY: successor})
            self.client.set_terminated(run.run_id, "KILLED")
            print(f"cell {run.tags.get(schema.HASH, '?')}: took over stale run {run.run_id} ({reason})",
                  file=sys.stderr)
        self.delete(run.run_id)

    def superseded(self, run_id: str) -> bool:
        """True when another process took this run over (or it is gone); a failed call raises."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
            raise
        return (run.info.lifecycle_stage != "active" or run.info.status == "KILLED"
                or schema.SUPERSEDED_BY in run.data.tags)

    def heartbeat(self, run_id: str) -> Heartbeat:
        """A (not yet started) heartbeat for ``run_id``; :meth:`claim` starts one for the run it wins,
        and :meth:`finish` / :meth:`fail` stop it."""
        return Heartbeat(self, run_id)

    def release(self, run_id: str) -> bool:
        """Stop the run's heartbeat; True when it had found the run taken over."""
        beat = self._beats.pop(run_id, None)
        if beat is None:
            return False
        beat.__exit__(None, None, None)
        return beat.lost

    # ------------------------------------------------------------------ run lifecycle
    def start(self, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
        """Create a RUNNING run with the given tags (``ptqbench.status`` = running; see :mod:`ptqbench.schema`)."""
        all_tags = {safe_key(k): truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}
        all_tags[schema.STATUS] = schema.RUNNING
        all_tags[schema.LEASE_OWNER] = self.owner
        all_tags[schema.LEASE_UNTIL] = self.lease_until()
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def finish(self, run_id: str) -> None:
        """Mark a run FINISHED; LeaseLost when another process took it over meanwhile."""
        if self.release(run_id) or self.superseded(run_id):
            raise LeaseLost(f"run {run_id}: another process took this cell over (this process's lease expired)")
        self.client.set_tag(run_id, schema.STATUS, schema.FINISHED)
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, error: str, traceback_text: str = "") -> None:
        """Mark a run FAILED with its error (tag) and traceback (artifact ``traceback.txt``); a run
        another process took over is left as it is."""
        if self.release(run_id) or self.superseded(run_id):
            return
        self.client.set_tag(run_id, schema.ERROR, truncate(error, MAX_TAG_VALUE))
        self.client.set_tag(run_id, schema.STATUS, schema.FAILED)
        if traceback_text:
            self.client.log_text(run_id, traceback_text, schema.TRACEBACK_FILE)
        self.client.set_terminated(run_id, "FAILED")

    def delete(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    # ------------------------------------------------------------------ logging
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
        """Flatten and log ``params`` in batches; returns what was logged."""
        from mlflow.entities import Param

        flat = flatten(params)
        for batch in _batches(list(flat.items()), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in batch])
        return flat

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(safe_key(k), truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        for batch in _batches(items, PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=batch)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | int | None], step: int = 0) -> dict[str, float]:
        """Log numeric metrics (None values are left out); returns what was logged."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat = {safe_key(k): float(v) for k, v in metrics.items() if v is not None}
        items = [Metric(k, v, now, step) for k, v in flat.items()]
        for batch in _batches(items, METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch)
        return flat

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths of a run (recursively), for checks and reports."""
        out = []
        for info in self.client.list_artifacts(run_id, path):
            out.extend(self.artifacts(run_id, info.path) if info.is_dir else [info.path])
        return out


def claim_name(experiment_id: str, cell_hash: str, gen: int) -> str:
    return f"{schema.CLAIM_EXPERIMENT}{experiment_id}/{cell_hash}/{gen}"


def _dirname(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name) or "experiment"


def _cell_run(run: Any) -> CellRun:
    return CellRun(
        run_id=run.info.run_id,
        status=run.info.status,
        name=run.info.run_name or "",
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
    )
