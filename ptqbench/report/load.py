"""Read ptqbench runs from MLflow into a DataFrame (one row per cell) and fetch their artifacts.

Only the tracked runs are read: the schema is the one in CONTRACTS.md (tags ``model``,
``method``, ``prompt_set``, ``is_reference``, ``cell_hash``, ``ptqbench.status``/``ptqbench.error``,
``metric_status.<m>``/``metric_direction.<m>``; params = the resolved cell config; metrics).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from ptqbench.errors import UserError

# Params that identify the group a table compares within (same reference images, same n).
SETTINGS = ("n_prompts", "steps", "guidance", "resolution", "dtype")
# the param each setting is logged as (generation settings are namespaced, methods have a "steps")
SETTING_PARAMS = {"n_prompts": "n_prompts", "steps": "gen.steps", "guidance": "gen.guidance",
                  "resolution": "gen.resolution", "dtype": "dtype"}
# Non-metric numbers logged as metrics.
BOOKKEEPING_METRICS = ("bits_per_weight", "model_bytes")
BOOKKEEPING_PREFIXES = ("layer_", "seconds_")
STATUS_PREFIX = "metric_status."
DIRECTION_PREFIX = "metric_direction."
_MLFLOW_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed", "RUNNING": "running"}
_STATUS_RANK = {"finished": 0, "failed": 1, "running": 2}


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


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "", "None") else math.nan
    except ValueError:
        return math.nan


def metric_names(metrics: dict[str, float], tags: dict[str, str]) -> set[str]:
    """The quality metrics a run reports (computed or not) per the schema."""
    names = {k[len(STATUS_PREFIX):] for k in tags if k.startswith(STATUS_PREFIX)}
    names |= {k[len(DIRECTION_PREFIX):] for k in tags if k.startswith(DIRECTION_PREFIX)}
    names |= {k[:-2] for k in metrics if k.endswith("_n")}
    return {n for n in names if n and n not in BOOKKEEPING_METRICS and not n.startswith(BOOKKEEPING_PREFIXES)}


def run_status(mlflow_status: str, tags: dict[str, str]) -> str:
    """finished / failed / running: the ptqbench tag, overruled by an MLflow FAILED/KILLED state."""
    mapped = _MLFLOW_STATUS.get(mlflow_status, "running")
    if mapped == "failed":
        return "failed"
    return tags.get("ptqbench.status", mapped)


def record(run: Any, experiment: str) -> dict[str, Any]:
    """One run as a flat record (identity columns) plus its raw params, metrics and tags."""
    tags, params, metrics = dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)
    method = tags.get("method") or params.get("method") or ""
    is_ref = tags.get("is_reference", "").lower() == "true" or method == "none"
    status = run_status(run.info.status, tags)
    rank = _number(params.get("rank"))
    low, high = _number(params.get("rank_per_layer.min")), _number(params.get("rank_per_layer.max"))
    if math.isfinite(low) and math.isfinite(high) and low != high:
        rank_text = f"{int(low)}–{int(high)}"  # per-layer ranks (the method's rank is their maximum)
    else:
        rank_text = str(int(rank)) if math.isfinite(rank) and rank > 0 else ""
    bpw = metrics.get("bits_per_weight", _number(params.get("bits_per_weight")))
    size = metrics.get("model_bytes", _number(params.get("model_bytes")))
    return {
        "experiment": experiment,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "start_time": int(run.info.start_time or 0),
        "artifact_uri": run.info.artifact_uri or "",
        "status": status,
        "error": tags.get("ptqbench.error", "" if status != "failed" else "failed without a ptqbench.error tag"),
        "model": tags.get("model") or params.get("model") or "",
        "prompt_set": tags.get("prompt_set") or params.get("prompt_set") or "",
        **{k: params.get(SETTING_PARAMS[k], "") for k in SETTINGS},
        "method": "none" if is_ref else method,
        "is_reference": is_ref,
        "label": tags.get("label", run.info.run_name or ""),
        "cell_hash": tags.get("cell_hash") or params.get("cell_hash") or "",
        "weight_format": "" if is_ref else params.get("weight_format", ""),
        "act_format": "" if is_ref else params.get("act_format", ""),
        "branch_format": params.get("branch_format", "") if rank > 0 else "",
        "branch_act_format": params.get("branch_act_format", "") if rank > 0 else "",
        "rank": int(rank) if math.isfinite(rank) else 0,
        "rank_text": rank_text,
        "bits_per_weight": float(bpw),
        "model_bytes": float(size),
        "metric_names": tuple(sorted(metric_names(metrics, tags))),
        "params": params,
        "metrics": metrics,
        "tags": tags,
    }


def dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One run per (experiment, cell_hash): finished over failed over running, then the latest."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    notes = []
    for r in records:
        key = (r["experiment"], r["cell_hash"] or r["run_id"])
        order = (_STATUS_RANK.get(r["status"], 3), -r["start_time"], r["run_id"])
        old = best.get(key)
        if old is None:
            best[key] = r
            continue
        old_order = (_STATUS_RANK.get(old["status"], 3), -old["start_time"], old["run_id"])
        keep, drop = (r, old) if order < old_order else (old, r)
        best[key] = keep
        notes.append(
            f"experiment {r['experiment']}: cell {key[1]} has several runs; showing {keep['run_id']} "
            f"({keep['status']}), not {drop['run_id']} ({drop['status']})"
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
    records, notes = [], []
    for exp_id, name in chosen:
        token = None
        while True:
            page = client.search_runs([exp_id], "", ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for run in page:
                if "model" not in run.data.tags or "method" not in run.data.tags:
                    rid = run.info.run_id
                    notes.append(f"experiment {name}: run {rid} has no ptqbench tags (model, method); left out")
                    continue
                records.append(record(run, name))
            token = page.token
            if not token:
                break
    records, dup_notes = dedupe(records)
    if not records:
        raise UserError(
            f"no ptqbench runs in {redact(client.tracking_uri)} "
            f"(experiments: {', '.join(n for _, n in chosen) or 'none'}); run `ptqbench run SUITE.yaml` first"
        )
    frame = pd.DataFrame(records)
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
