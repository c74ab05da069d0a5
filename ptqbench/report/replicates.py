"""Replicated cells in the report: the k runs of a replicate group as one table row.

A suite's ``replicates: k`` re-draws a method's seeds k times, each replicate a run of its own
(tags ``replicate`` and ``replicate_group``, :mod:`ptqbench.schema`). :func:`pool_replicates` turns
the runs of a group into one row that the tables read like any other:

- **value**: the mean of the finished replicates' values (``k`` of them, per metric);
- **prompt-level interval**: for a per-image metric, the bootstrap interval (the runs' own ``ci.*``
  settings) over prompts of each prompt's mean over the k replicates, which all share the prompts
  and seeds; for a set metric (or runs without per-image tables) the mean of the replicates' bounds;
- **between-replicate spread** (:class:`Spread`): the sample standard deviation (ddof 1) and the
  range (max - min) of the k per-replicate values, shown for k >= 2;
- **per-image values**: the per-prompt means over the replicates, so the paired "best" test
  compares a replicated cell by its replicate-pooled per-prompt values.

Unfinished replicates are left out of the numbers and named in :data:`NOTES`; a group of one run
(a cell without replicates) stays as it is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ptqbench.schema import FINISHED, METRIC_WARNING, REPLICATE, interval_metrics
from ptqbench.uncertainty import Bootstrap, mean_interval

SPREAD = "spread"  # row key: {metric: Spread} of a pooled row
RUNS = "replicate_runs"  # row key: the finished replicates' run ids, in replicate order
NOTES = "replicate_notes"  # row key: one line per unfinished replicate


@dataclass(frozen=True)
class Spread:
    """The between-replicate spread of one metric: k per-replicate values' sd (ddof 1) and range."""

    k: int
    sd: float
    low: float
    high: float

    @property
    def range(self) -> float:
        return self.high - self.low

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(len(values), sd, min(values), max(values))


def interval_of(metrics: Mapping[str, float], name: str) -> tuple[float, float] | None:
    """The logged interval ``(<name>.lo, <name>.hi)``, or None (old runs, or not computed)."""
    lo, hi = (metrics.get(key) for key in interval_metrics(name))
    if lo is None or hi is None or not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return None
    return float(lo), float(hi)


def pool_replicates(rows: list[dict[str, Any]], config: Bootstrap) -> list[dict[str, Any]]:
    """The rows of one table with the runs of each replicate group (two or more) as one row,
    in first-appearance order; ``config`` computes the pooled per-image intervals."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("replicate_group") or r["run_id"], []).append(r)
    return [members[0] if len(members) == 1 else _pooled(members, config) for members in groups.values()]


def _pooled(members: list[dict[str, Any]], config: Bootstrap) -> dict[str, Any]:
    members = sorted(members, key=lambda r: (r["replicate"], r["run_id"]))
    done = [r for r in members if r["status"] == FINISHED]
    first = done[0] if done else members[0]
    row = dict(first)
    # the group's configuration is replicate 0's (its seeds); identity fields are shared by all
    row["params"] = {k: v for k, v in members[0]["params"].items() if k != REPLICATE}
    row[NOTES] = [f"replicate {r['replicate']} ({r['run_id']}) {r['status']}"
                  + (f": {r['error']}" if r["status"] != FINISHED and r["error"] else "")
                  for r in members if r["status"] != FINISHED]
    row[RUNS] = [r["run_id"] for r in done]
    row[SPREAD] = {}
    if not done:
        return row
    names = sorted({n for r in done for n in r["metric_names"]})
    metrics, tags = dict(first["metrics"]), dict(first["tags"])
    table = _pooled_table(done, names)
    for name in names:
        have = [r for r in done if _value(r, name) is not None]
        if not have:
            continue
        values = [float(r["metrics"][name]) for r in have]
        metrics[name] = math.fsum(values) / len(values)
        row[SPREAD][name] = Spread.of(values)
        intervals = [interval_of(r["metrics"], name) for r in have]
        for key in interval_metrics(name):
            metrics.pop(key, None)
        if all(iv is not None for iv in intervals):
            if table is not None and name in table.columns and len(have) == len(done):
                iv = mean_interval(table[name].to_numpy(dtype=np.float64), config)
                bounds = (min(iv.lo, metrics[name]), max(iv.hi, metrics[name]))
            else:
                bounds = tuple(float(np.mean([iv[j] for iv in intervals])) for j in (0, 1))  # type: ignore[index]
            metrics.update(zip(interval_metrics(name), bounds, strict=True))
        warning = next((r["tags"][METRIC_WARNING + name] for r in have if METRIC_WARNING + name in r["tags"]), None)
        if warning is not None:
            tags[METRIC_WARNING + name] = warning
    row.update(metrics=metrics, tags=tags, metric_names=tuple(names), per_image=table)
    return row


def _value(row: dict[str, Any], name: str) -> float | None:
    value = row["metrics"].get(name)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _pooled_table(done: list[dict[str, Any]], names: list[str]) -> pd.DataFrame | None:
    """Per prompt (key, seed), the mean over the replicates of each metric every replicate has a
    per-image column of; None unless all replicates have tables with the same keys and seeds."""
    tables = [r.get("per_image") for r in done]
    if any(t is None for t in tables):
        return None
    aligned = [t.sort_values("key", kind="stable").reset_index(drop=True) for t in tables]
    first = aligned[0]
    if any(len(t) != len(first) or not (t["key"].to_numpy() == first["key"].to_numpy()).all()
           or not (t["seed"].to_numpy() == first["seed"].to_numpy()).all() for t in aligned):
        return None
    out = first[["key", "seed"]].copy()
    for name in names:
        if all(name in t.columns and not t[name].isna().any() for t in aligned):
            out[name] = np.mean(np.stack([t[name].to_numpy(dtype=np.float64) for t in aligned]), axis=0)
    return out
