"""MLflow tracking: one experiment per suite, one run per cell, found again by its ``cell_hash`` tag.

The tracking URI is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
(a SQLite file in the working directory, with artifacts in ``./mlartifacts`` next to it). Any
MLflow URI works the same, a remote ``mlflow server`` included. For a local store (``sqlite:``) artifacts go
next to the database file rather than into the current directory.

A cell's run is FINISHED (done: skipped on rerun), FAILED (recorded: run again), or RUNNING with
no live process behind it (killed: its stale run is deleted and the cell runs again).
"""

from __future__ import annotations

import json
import os
import re
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


class Tracker:
    """A thin layer over :class:`mlflow.MlflowClient` with the ptqbench run schema."""

    def __init__(self, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

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
            exp_id = self.client.create_experiment(name, artifact_location=location, tags=dict(tags or {}))
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

    def claim(self, experiment_id: str, cell_hash: str) -> CellRun | None:
        """The finished run of a cell, if any; every other run of the cell (failed, killed) is deleted.

        Returns None when the cell must run. Extra finished runs (which only a concurrent
        duplicate could create) are deleted too, so one FINISHED run per cell remains.
        """
        runs = self.find(experiment_id, cell_hash)
        finished = [r for r in runs if r.status == "FINISHED"]
        keep = finished[0] if finished else None
        for r in runs:
            if r is not keep:
                self.delete(r.run_id)
        return keep

    # ------------------------------------------------------------------ run lifecycle
    def start(self, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
        """Create a RUNNING run with the given tags (``ptqbench.status`` = running; see :mod:`ptqbench.schema`)."""
        all_tags = {safe_key(k): truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}
        all_tags[schema.STATUS] = schema.RUNNING
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def finish(self, run_id: str) -> None:
        self.client.set_tag(run_id, schema.STATUS, schema.FINISHED)
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, error: str, traceback_text: str = "") -> None:
        """Mark a run FAILED with its error (tag) and traceback (artifact ``traceback.txt``)."""
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
