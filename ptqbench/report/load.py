"""Read ptqbench runs from MLflow into a DataFrame (one row per cell) and fetch their artifacts.

Only the tracked runs are read, each as a :class:`ptqbench.schema.RunRecord` (the schema the
runner logs: tags, params = the resolved cell config, metrics); the DataFrame has one column
per field of the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from ptqbench import schema
from ptqbench.errors import UserError
from ptqbench.schema import RunRecord

_STATUS_RANK = {schema.FINISHED: 0, schema.FAILED: 1, schema.RUNNING: 2}


def redact(uri: str) -> str:
    """The URI without user:password, for display."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
    return uri


def check_store(uri: str) -> None:
    """Raise a UserError when a local store does not exist (reading must not create an empty one)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = uri.split("://", 1)[1]
        path = Path(db[1:] if db.startswith("/") else db).expanduser()
        if not path.is_file():
            raise UserError(
                f"--tracking-uri {uri}: no MLflow store at {path} "
                "(run `ptqbench run SUITE.yaml` first, or pass --tracking-uri / set MLFLOW_TRACKING_URI)"
            )
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not path.is_dir():
            raise UserError(f"--tracking-uri {uri}: no MLflow folder store at {path}")


def client_for(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    check_store(uri)
    return MlflowClient(tracking_uri=uri)


def select_experiments(client: Any, names: Sequence[str] | None) -> list[tuple[str, str]]:
    """(id, name) of the requested experiments (all active ones by default), sorted by name."""
    from mlflow.exceptions import MlflowException

    try:
        experiments = client.search_experiments()
    except MlflowException as exc:
        raise UserError(f"tracking store {redact(client.tracking_uri)}: cannot list experiments ({exc})") from None
    by_name = {e.name: e.experiment_id for e in experiments}
    if not names:
        return sorted((i, n) for n, i in by_name.items())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(
            f"--experiment: unknown experiment(s) {', '.join(missing)} in {redact(client.tracking_uri)} "
            f"(valid: {', '.join(sorted(by_name)) or 'none'})"
        )
    return sorted({(by_name[n], n) for n in names}, key=lambda t: t[1])


def _preference(r: RunRecord) -> tuple[int, int, str]:
    return (_STATUS_RANK.get(r.status, 3), -r.start_time, r.run_id)


def dedupe(records: list[RunRecord]) -> tuple[list[RunRecord], list[str]]:
    """One run per (experiment, cell_hash): finished over failed over running, then the latest."""
    best: dict[tuple[str, str], RunRecord] = {}
    notes = []
    for r in records:
        key = (r.experiment, r.cell_hash or r.run_id)
        old = best.get(key)
        if old is None:
            best[key] = r
            continue
        keep, drop = (r, old) if _preference(r) < _preference(old) else (old, r)
        best[key] = keep
        notes.append(
            f"experiment {r.experiment}: cell {key[1]} has several runs; showing {keep.run_id} "
            f"({keep.status}), not {drop.run_id} ({drop.status})"
        )
    return list(best.values()), sorted(notes)


@dataclass
class Runs:
    """The loaded runs and what was noticed while loading them."""

    frame: pd.DataFrame
    experiments: list[str]
    notes: list[str] = field(default_factory=list)


def load_runs(client: Any, experiments: Sequence[str] | None = None) -> Runs:
    """Every active ptqbench run of the selected experiments as a DataFrame (one row per cell)."""
    from mlflow.entities import ViewType

    chosen = select_experiments(client, experiments)
    records: list[RunRecord] = []
    notes: list[str] = []
    for exp_id, name in chosen:
        token = None
        while True:
            page = client.search_runs([exp_id], "", ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for run in page:
                if schema.MODEL not in run.data.tags or schema.METHOD not in run.data.tags:
                    rid = run.info.run_id
                    notes.append(f"experiment {name}: run {rid} has no ptqbench tags (model, method); left out")
                    continue
                records.append(RunRecord.from_run(run, name))
            token = page.token
            if not token:
                break
    records, dup_notes = dedupe(records)
    if not records:
        raise UserError(
            f"no ptqbench runs in {redact(client.tracking_uri)} "
            f"(experiments: {', '.join(n for _, n in chosen) or 'none'}); run `ptqbench run SUITE.yaml` first"
        )
    frame = pd.DataFrame([r.row() for r in records])
    used = sorted(set(frame["experiment"]))
    return Runs(frame, used, sorted(notes) + dup_notes)


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No per-file download progress bars (unless the user set the variable)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def local_path(uri: str) -> Path | None:
    """The folder of a ``file:`` artifact URI (or a plain path); None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


class Artifacts:
    """Run artifacts by path: read in place from a local store, else downloaded on demand into ``root``.

    A missing artifact is None; a store that cannot be read adds a note.
    """

    def __init__(self, client: Any, root: Path, artifact_uris: dict[str, str]):
        self.client = client
        self.root = root
        self.uris = artifact_uris
        self.notes: list[str] = []
        self._listed: dict[tuple[str, str], set[str] | None] = {}

    def _listing(self, run_id: str, folder: str) -> set[str] | None:
        from mlflow.exceptions import MlflowException

        key = (run_id, folder)
        if key not in self._listed:
            try:
                infos = self.client.list_artifacts(run_id, folder or None)
                self._listed[key] = {i.path for i in infos if not i.is_dir}
            except (MlflowException, OSError) as exc:
                self.notes.append(f"run {run_id}: cannot list artifacts in {folder or '/'} ({exc})")
                self._listed[key] = None
        return self._listed[key]

    def get(self, run_id: str, path: str) -> Path | None:
        """The local copy of artifact ``path`` of the run, or None when the run has none."""
        from mlflow.exceptions import MlflowException

        local_root = local_path(self.uris.get(run_id, ""))
        if local_root is not None:
            local = local_root / path
            return local if local.is_file() else None
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        listing = self._listing(run_id, folder)
        if listing is None or path not in listing:
            return None
        dst = self.root / run_id
        local = dst / path
        if local.is_file():
            return local
        dst.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet_downloads():
                return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except (MlflowException, OSError) as exc:
            self.notes.append(f"run {run_id}: cannot download artifact {path} ({exc})")
            return None

    def json(self, run_id: str, path: str) -> Any:
        local = self.get(run_id, path)
        if local is None:
            return None
        try:
            return json.loads(local.read_text())
        except (ValueError, OSError) as exc:
            self.notes.append(f"run {run_id}: artifact {path} is not valid JSON ({exc})")
            return None


def per_image_table(artifacts: Artifacts, run_id: str) -> pd.DataFrame | None:
    """The run's ``per_image.csv`` (:func:`ptqbench.metrics.base.read_per_image`), or None when it
    has none; an unreadable one is None with a note."""
    from ptqbench.metrics.base import read_per_image

    local = artifacts.get(run_id, schema.PER_IMAGE_FILE)
    if local is None:
        return None
    try:
        return read_per_image(local)
    except (ValueError, OSError) as exc:
        artifacts.notes.append(f"run {run_id}: artifact {schema.PER_IMAGE_FILE} is unreadable ({exc}); left out")
        return None


def attach_per_image(runs: Runs, artifacts: Artifacts) -> None:
    """Give each run row its per-image table (column ``per_image``; None for unfinished runs and
    runs without one, the latter noted once)."""
    frame = runs.frame
    tables = [
        per_image_table(artifacts, rid) if status == schema.FINISHED else None
        for rid, status in zip(frame["run_id"], frame["status"], strict=True)
    ]
    frame["per_image"] = pd.Series(tables, index=frame.index, dtype=object)
    missing = sorted(rid for rid, st, t in zip(frame["run_id"], frame["status"], tables, strict=True)
                     if st == schema.FINISHED and t is None)
    if missing:
        runs.notes.append(
            f"{len(missing)} finished run(s) have no readable {schema.PER_IMAGE_FILE} (e.g. {missing[0]}; logged "
            "before per-image values were kept): their cells are marked best by interval overlap or by value"
        )
