"""The MLflow run schema: what the runner logs for a cell and what the report reads back.

One experiment per suite, one run per cell. The names below are the whole contract between
:mod:`ptqbench.runner` (writing), :mod:`ptqbench.tracking` (the run lifecycle) and
:mod:`ptqbench.report` (reading, through :class:`RunRecord`):

- **tags**: ``cell_hash`` (the content hash of the cell's resolved configuration), ``suite``,
  ``suite_file``, ``model``, ``method`` (``none`` for the 16-bit reference), ``prompt_set``,
  ``is_reference`` (``true``/``false``), ``label``, ``formats``, ``rank``, ``ptqbench.status``
  (running / finished / failed), ``ptqbench.error``, ``metric_direction.<m>`` (higher / lower),
  ``metric_status.<m>`` (``not_computed: <why>``, only for metrics without a value),
  ``metric_warning.<m>`` (a caveat of a computed value, e.g. a Frechet distance at small n);
  ``images_dir``, ``reference_dir`` and ``real_dir`` (where the run's images, its 16-bit reference
  images and the real images are: what ``ptqbench score`` reads), ``score_key.<m>`` (the digest of
  the images, the metric and its weights that ``<m>`` was computed from), for replicated cells
  ``replicate`` (0..k-1) and ``replicate_group`` (the hash of replicate 0, shared by all k) and,
  while a cell runs, its lease (see :mod:`ptqbench.tracking`): ``ptqbench.lease_owner``
  (``host:pidns:pid:token``), ``ptqbench.lease_until`` (Unix seconds, renewed by a heartbeat),
  ``ptqbench.claim_gen`` (the claim generation the run won) and, on a run taken over,
  ``ptqbench.superseded_by`` (the run that took it over);
- **params**: the resolved configuration (generation settings as ``gen.<name>``, since a method
  may have a field of the same name), ``bits_per_weight``, ``model_bytes``, ``versions.<pkg>``,
  ``git_commit``, ``device``, ``threads``, ``cell_hash`` and how intervals were computed:
  ``ci.level``, ``ci.resamples``, ``ci.set_resamples``, ``ci.seed``, ``ci.method``, ``ci.test``
  (:class:`ptqbench.uncertainty.Bootstrap`) and ``metric_options.<m>.<option>`` (a suite's
  ``{name: m, option: value}``, e.g. ``metric_options.fid.min_n``; read back by
  :func:`logged_metric_options`), both what ``ptqbench score`` scores the run with;
- **metrics**: each computed quality metric ``<m>`` with its sample count ``<m>_n`` and, where it
  has one, its confidence interval ``<m>.lo`` / ``<m>.hi``;
  ``bits_per_weight``, ``model_bytes``, ``layer_rel_{weight,output}_error_{mean,max}`` and
  ``seconds_<stage>`` and ``images_generated`` (images this run generated; fewer than n when it
  resumed a killed cell) as bookkeeping;
- **artifacts**: ``config.yaml``, ``per_image.csv`` (one row per image: ``key``, ``seed``, a
  column per per-image metric; :func:`ptqbench.metrics.base.read_per_image`),
  ``layer_errors.csv``, ``patch_report.json``, ``grid.png``,
  ``samples/`` (with ``samples/index.json``) and, for a failed run, ``traceback.txt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ptqbench.evaluate import EvalResult
    from ptqbench.metrics.base import MetricResult
    from ptqbench.uncertainty import Bootstrap

# ----------------------------------------------------------------------------- tags
HASH = "cell_hash"
SUITE = "suite"
SUITE_FILE = "suite_file"
MODEL = "model"
METHOD = "method"
PROMPT_SET = "prompt_set"
IS_REFERENCE = "is_reference"
LABEL = "label"
FORMATS = "formats"
RANK = "rank"
STATUS = "ptqbench.status"
ERROR = "ptqbench.error"
METRIC_STATUS = "metric_status."
METRIC_DIRECTION = "metric_direction."
METRIC_WARNING = "metric_warning."
NOT_COMPUTED = "not_computed: "
LEASE_OWNER = "ptqbench.lease_owner"
LEASE_UNTIL = "ptqbench.lease_until"
CLAIM_GEN = "ptqbench.claim_gen"
SUPERSEDED_BY = "ptqbench.superseded_by"
CLAIM_EXPERIMENT = "ptqbench.claim/"  # + experiment id/cell hash/generation: one (deleted) experiment per claim
CLAIM_RUN = "ptqbench.claim_run"  # the claim experiment's tag: the run that won it
IMAGES_DIR = "images_dir"
REFERENCE_DIR = "reference_dir"
REAL_DIR = "real_dir"
SCORE_KEY = "score_key."
REPLICATE = "replicate"
REPLICATE_GROUP = "replicate_group"
EXPERIMENT_NOTE = "mlflow.note.content"  # the experiment's description, as MLflow shows it

RUNNING, FINISHED, FAILED = "running", "finished", "failed"
REFERENCE_METHOD = "none"

# ----------------------------------------------------------------------------- params
GEN = "gen."  # generation settings: gen.steps, gen.guidance, gen.resolution, gen.batch_size
N_PROMPTS = "n_prompts"
DTYPE = "dtype"
BITS_PER_WEIGHT = "bits_per_weight"
MODEL_BYTES = "model_bytes"
RANK_PER_LAYER = "rank_per_layer"
VERSIONS = "versions"
GIT_COMMIT = "git_commit"
DEVICE = "device"
THREADS = "threads"
FORMAT_FIELDS = ("weight_format", "act_format", "branch_format", "branch_act_format")
CI = "ci."  # the interval settings: ci.level, ci.resamples, ... (the fields of uncertainty.Bootstrap)
CI_FIELDS = ("level", "resamples", "set_resamples", "seed", "method", "test")
METRIC_OPTIONS = "metric_options"  # metric_options.<m>.<option>: a suite's {name: m, option: value}

# The settings a report table compares within (same reference images, same n), and their params.
SETTINGS = ("n_prompts", "steps", "guidance", "resolution", "dtype")
SETTING_PARAMS = {"n_prompts": N_PROMPTS, "steps": GEN + "steps", "guidance": GEN + "guidance",
                  "resolution": GEN + "resolution", "dtype": DTYPE}

# ----------------------------------------------------------------------------- metrics
SECONDS = "seconds_"
LAYER = "layer_"
IMAGES_GENERATED = "images_generated"
BOOKKEEPING_METRICS = (BITS_PER_WEIGHT, MODEL_BYTES, IMAGES_GENERATED)  # non-quality numbers logged as metrics
BOOKKEEPING_PREFIXES = (LAYER, SECONDS)
# layer_errors.csv column -> the run metric summarizing it (``_mean``, ``_max``): ``rel_output_error``
# is measured on held-out rows, ``insample_output_error`` on rows the method saw.
LAYER_ERROR_COLUMNS = {
    "rel_weight_error": f"{LAYER}rel_weight_error",
    "rel_output_error": f"{LAYER}heldout_output_error",
    "insample_output_error": f"{LAYER}insample_output_error",
}

# ----------------------------------------------------------------------------- artifacts
CONFIG_FILE = "config.yaml"
PER_IMAGE_FILE = "per_image.csv"
LAYER_ERRORS_FILE = "layer_errors.csv"
PATCH_REPORT_FILE = "patch_report.json"
GRID_FILE = "grid.png"
SAMPLES_DIR = "samples"
TRACEBACK_FILE = "traceback.txt"


def gen_param(setting: str) -> str:
    """The param a generation setting is logged as: ``steps`` -> ``gen.steps``."""
    return GEN + setting


def direction(higher_is_better: bool) -> str:
    """The ``metric_direction.<m>`` value: ``higher`` or ``lower`` (is better)."""
    return "higher" if higher_is_better else "lower"


def n_metric(metric: str) -> str:
    """The metric holding how many samples ``metric`` was computed on."""
    return f"{metric}_n"


def interval_metrics(metric: str) -> tuple[str, str]:
    """The metrics holding the bounds of ``metric``'s interval: ``<m>.lo``, ``<m>.hi`` (as
    :meth:`~ptqbench.metrics.base.MetricResult.summary` writes them; it spells them itself, since
    this module reads its type)."""
    return f"{metric}.lo", f"{metric}.hi"


# ============================================================================ writing (the runner)


def experiment_tags(suite_file: str, description: str) -> dict[str, str]:
    return {SUITE_FILE: suite_file, EXPERIMENT_NOTE: description}


def result_metrics(result: EvalResult, seconds: float) -> tuple[dict[str, float | None], dict[str, str]]:
    """The metrics of a finished cell (:func:`score_values` of its metrics, then the bookkeeping)."""
    metrics, tags = score_values(result.metrics)
    metrics.update({BITS_PER_WEIGHT: result.bits_per_weight, MODEL_BYTES: result.model_bytes,
                    IMAGES_GENERATED: result.images_generated})
    metrics.update(layer_error_summary(result.layer_errors))
    for stage, value in result.timings.items():
        metrics[SECONDS + stage] = value
    metrics.setdefault(SECONDS + "total", seconds)
    return metrics, tags


def score_values(results: Mapping[str, MetricResult]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Quality metrics as logged: each computed one's :meth:`~ptqbench.metrics.base.MetricResult.summary`
    (value, ``_n``, ``.lo``/``.hi``), ``metric_warning`` tags of those with a caveat and
    ``metric_status`` tags of those without a value."""
    metrics: dict[str, float | None] = {}
    tags: dict[str, str] = {}
    for name, m in results.items():
        summary = m.summary()
        if summary:
            metrics.update(summary)
            if m.warning:
                tags[METRIC_WARNING + name] = m.warning
        else:
            tags[METRIC_STATUS + name] = f"{NOT_COMPUTED}{m.reason}"
    return metrics, tags


def interval_params(config: Bootstrap | None) -> dict[str, str | float | int]:
    """The ``ci.*`` params of a run's interval settings (none when intervals are off)."""
    return {} if config is None else {CI + f: getattr(config, f) for f in CI_FIELDS}


def interval_settings(params: Mapping[str, str]) -> dict[str, str]:
    """The logged ``ci.*`` params of a run, by field (``level`` -> ``"0.95"``), for ``Bootstrap``."""
    return {f: params[CI + f] for f in CI_FIELDS if CI + f in params}


def metric_options_params(options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``metric_options.<m>.<option>`` params of metric options by name (none when there are none)."""
    return {METRIC_OPTIONS: {m: dict(o) for m, o in options.items() if o}} if any(options.values()) else {}


def logged_metric_options(params: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """A run's metric options as it logged them (``metric_options.<m>.<option>``), by metric name,
    each value read back from its text (:func:`logged_value`)."""
    out: dict[str, dict[str, Any]] = {}
    prefix = METRIC_OPTIONS + "."
    for key, text in params.items():
        if key.startswith(prefix) and "." in key[len(prefix):]:
            metric, option = key[len(prefix):].split(".", 1)
            out.setdefault(metric, {})[option] = logged_value(text)
    return out


def logged_value(text: str) -> Any:
    """A param value as the suite gave it: the text MLflow holds of ``str(value)`` (lists as JSON)
    read back as None, a bool, an int, a float or a list where it spells one, else the text."""
    import json

    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def layer_error_summary(frame: pd.DataFrame | None) -> dict[str, float]:
    """Model-wide mean and max of the per-layer errors, as run metrics: ``layer_rel_weight_error``,
    ``layer_heldout_output_error`` (on held-out rows) and ``layer_insample_output_error`` (on rows
    the method saw), each ``_mean`` and ``_max`` (NaN-free; absent when nothing was measured)."""
    out: dict[str, float] = {}
    if frame is None or len(frame) == 0:
        return out
    for column, metric in LAYER_ERROR_COLUMNS.items():
        if column not in frame:
            continue
        values = [float(v) for v in frame[column] if v is not None and not math.isnan(float(v))]
        if values:
            out[f"{metric}_mean"] = sum(values) / len(values)
            out[f"{metric}_max"] = max(values)
    return out


# ============================================================================ reading (the report)

_MLFLOW_STATUS = {"FINISHED": FINISHED, "FAILED": FAILED, "KILLED": FAILED, "RUNNING": RUNNING}


def run_status(mlflow_status: str, tags: Mapping[str, str]) -> str:
    """finished / failed / running: the ptqbench tag, overruled by an MLflow FAILED/KILLED state."""
    mapped = _MLFLOW_STATUS.get(mlflow_status, RUNNING)
    if mapped == FAILED:
        return FAILED
    return tags.get(STATUS, mapped)


def metric_names(metrics: Mapping[str, float], tags: Mapping[str, str]) -> set[str]:
    """The quality metrics a run reports (computed or not)."""
    names = {k[len(METRIC_STATUS):] for k in tags if k.startswith(METRIC_STATUS)}
    names |= {k[len(METRIC_DIRECTION):] for k in tags if k.startswith(METRIC_DIRECTION)}
    names |= {k[len(SCORE_KEY):] for k in tags if k.startswith(SCORE_KEY)}
    names |= {k[: -len(n_metric(""))] for k in metrics if k.endswith(n_metric(""))}
    return {n for n in names if n and n not in BOOKKEEPING_METRICS and not n.startswith(BOOKKEEPING_PREFIXES)}


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "", "None") else math.nan
    except ValueError:
        return math.nan


def _rank_text(params: Mapping[str, str], rank: float) -> str:
    """``12`` or, for per-layer ranks, ``4–12`` (the method's rank is their maximum); "" for none."""
    low = _number(params.get(f"{RANK_PER_LAYER}.min"))
    high = _number(params.get(f"{RANK_PER_LAYER}.max"))
    if math.isfinite(low) and math.isfinite(high) and low != high:
        return f"{int(low)}–{int(high)}"
    return str(int(rank)) if math.isfinite(rank) and rank > 0 else ""


def _formats(params: Mapping[str, str], is_reference: bool, rank: float) -> dict[str, str]:
    """The logged formats: main ones for a quantized cell, branch ones when it has a branch."""
    out = dict.fromkeys(FORMAT_FIELDS, "")
    for name in FORMAT_FIELDS:
        has = rank > 0 if name.startswith("branch") else not is_reference
        if has:
            out[name] = params.get(name, "")
    return out


@dataclass(frozen=True)
class RunRecord:
    """One tracked run as the report reads it: identity, configuration, size, status, raw data."""

    experiment: str
    run_id: str
    run_name: str
    start_time: int
    artifact_uri: str
    status: str
    error: str
    model: str
    prompt_set: str
    n_prompts: str
    steps: str
    guidance: str
    resolution: str
    dtype: str
    method: str
    is_reference: bool
    label: str
    cell_hash: str
    weight_format: str
    act_format: str
    branch_format: str
    branch_act_format: str
    rank: int
    rank_text: str
    bits_per_weight: float
    model_bytes: float
    metric_names: tuple[str, ...]
    replicate: int
    replicate_group: str
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    tags: Mapping[str, str]

    @classmethod
    def from_run(cls, run: Any, experiment: str) -> RunRecord:
        """Read an MLflow run (``run.info``, ``run.data``) per the schema."""
        tags, params, metrics = dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)
        method = tags.get(METHOD) or params.get(METHOD) or ""
        is_ref = tags.get(IS_REFERENCE, "").lower() == "true" or method == REFERENCE_METHOD
        status = run_status(run.info.status, tags)
        rank = _number(params.get(RANK))
        return cls(
            experiment=experiment,
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            start_time=int(run.info.start_time or 0),
            artifact_uri=run.info.artifact_uri or "",
            status=status,
            error=tags.get(ERROR, "" if status != FAILED else f"failed without a {ERROR} tag"),
            model=tags.get(MODEL) or params.get(MODEL) or "",
            prompt_set=tags.get(PROMPT_SET) or params.get(PROMPT_SET) or "",
            **{k: params.get(SETTING_PARAMS[k], "") for k in SETTINGS},
            method=REFERENCE_METHOD if is_ref else method,
            is_reference=is_ref,
            label=tags.get(LABEL, run.info.run_name or ""),
            cell_hash=tags.get(HASH) or params.get(HASH) or "",
            **_formats(params, is_ref, rank),
            rank=int(rank) if math.isfinite(rank) else 0,
            rank_text=_rank_text(params, rank),
            bits_per_weight=float(metrics.get(BITS_PER_WEIGHT, _number(params.get(BITS_PER_WEIGHT)))),
            model_bytes=float(metrics.get(MODEL_BYTES, _number(params.get(MODEL_BYTES)))),
            metric_names=tuple(sorted(metric_names(metrics, tags))),
            replicate=int(tags.get(REPLICATE, "0") or 0),
            replicate_group=tags.get(REPLICATE_GROUP) or tags.get(HASH) or params.get(HASH) or "",
            params=params,
            metrics=metrics,
            tags=tags,
        )

    def row(self) -> dict[str, Any]:
        """The record as a row of the report's DataFrame (one column per field)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
