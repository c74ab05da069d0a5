"""Tables per (experiment, model, prompt set, settings): rows = method x formats x branch, columns = metrics.

A :class:`Group` holds the sorted runs of one comparison; :func:`build_table` turns it into a
:class:`Table` of display cells (``value ± half-width`` of the logged interval, or ``value [lo, hi]``
where a column's intervals are asymmetric; in bold every cell not significantly worse than the
best, see :func:`best_rows`; ``n/c``, warnings and failures as footnotes), which
:func:`to_markdown`, :func:`to_latex` and the HTML page render. The CSV holds the raw numbers
(value, lo, hi). Everything is sorted, and the paired tests are seeded, so the same runs always
give the same bytes.

What a run row may carry beyond the loader's identity columns: metrics ``<m>``, ``<m>_n``,
``<m>.lo``, ``<m>.hi``; params ``ci.level`` / ``ci.resamples`` / ``ci.seed`` / ...; tags
``metric_warning.<m>``; and ``row["per_image"]``, the run's per-image table
(:func:`ptqbench.metrics.base.read_per_image`) or None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ptqbench.labels import REFERENCE as REFERENCE_LABEL
from ptqbench.labels import config_text
from ptqbench.report.replicates import NOTES as REPLICATE_NOTES
from ptqbench.report.replicates import RUNS as REPLICATE_RUNS
from ptqbench.report.replicates import SPREAD, Spread, interval_of, pool_replicates
from ptqbench.schema import (
    CI,
    CI_FIELDS,
    GEN,
    METRIC_OPTIONS,
    SETTING_PARAMS,
    SETTINGS,
    interval_metrics,
    interval_settings,
    n_metric,
)
from ptqbench.schema import METRIC_DIRECTION as DIRECTION_PREFIX
from ptqbench.schema import METRIC_STATUS as STATUS_PREFIX
from ptqbench.schema import METRIC_WARNING as WARNING_PREFIX
from ptqbench.uncertainty import Bootstrap, Interval, not_worse_than_best, overlaps_best

METHOD_ORDER = {"none": 0, "rtn": 1, "smoothquant": 2, "svdquant": 3, "loraq": 4}
DASH = "—"
NOT_COMPUTED = "n/c"
MAX_NOTE = 2000
ARROWS = {True: "↑", False: "↓", None: ""}
CONFIG_COLUMNS = 7  # Method, Weights, Acts, Branch, Rank, Bits/w, Size
# Params that never tell two rows of one table apart (identity, bookkeeping, format sub-fields).
_IDENTITY = {
    "cell_hash", "git_commit", "device", "bits_per_weight", "model_bytes", "model", "prompt_set", "method",
    "weight_format", "act_format", "branch_format", "branch_act_format", "rank",
}
_IDENTITY_PREFIXES = (
    "versions.", "weight_format.", "act_format.", "branch_format.", "branch_act_format.", GEN, CI,
    METRIC_OPTIONS + ".",
)
_SETTING_PARAMS = set(SETTING_PARAMS.values())


# ----------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class MetricInfo:
    """A metric column: its name and direction (None when neither registry nor tags say)."""

    name: str
    higher_is_better: bool | None
    paired: bool = False  # compares with the 16-bit images (so the reference's own value is trivial)

    @property
    def header(self) -> str:
        arrow = ARROWS[self.higher_is_better]
        return f"{self.name} {arrow}" if arrow else self.name


@dataclass
class Group:
    """The runs one table compares: same experiment, model, prompt set and generation settings."""

    experiment: str
    model: str
    prompt_set: str
    settings: dict[str, str]
    rows: list[dict[str, Any]]
    metrics: list[MetricInfo]
    slug: str = ""

    @property
    def title(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items() if v != "")
        return f"{self.model} · {self.prompt_set}" + (f" ({settings})" if settings else "") + f" · {self.experiment}"

    @property
    def reference(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["is_reference"] and r["status"] == "finished"), None)

    def finished(self, quantized_only: bool = False) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "finished" and not (quantized_only and r["is_reference"])]


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def _natural(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def registry_metrics(notes: list[str]) -> dict[str, MetricInfo]:
    """Direction and pairing of every registered metric; a registry that fails to load is noted, not fatal."""
    from ptqbench.metrics import METRICS

    try:
        names = METRICS.names()
    except ImportError as exc:  # a builtin module failed; what registered before it is still there
        notes.append(f"metric registry incomplete ({exc}); directions of the others come from the runs' tags")
        names = METRICS.names()
    out = {}
    for name in names:
        try:
            cls = METRICS.get(name)
            out[name] = MetricInfo(name, bool(cls.higher_is_better), "reference" in getattr(cls, "needs", ()))
        except (ImportError, AttributeError) as exc:
            notes.append(f"metric {name}: registry entry unavailable ({exc}); direction from the runs' tags")
    return out


def metric_info(name: str, rows: Iterable[dict[str, Any]], registry: dict[str, MetricInfo]) -> MetricInfo:
    """The registry's metric (direction, pairing), else the direction of the runs' metric_direction tag."""
    if name in registry:
        return registry[name]
    tags = sorted({r["tags"].get(DIRECTION_PREFIX + name, "") for r in rows} - {""})
    return MetricInfo(name, {"higher": True, "lower": False}.get(tags[0]) if len(tags) == 1 else None)


def sort_key(row: dict[str, Any]) -> tuple:
    method = row["method"]
    return (
        not row["is_reference"],
        METHOD_ORDER.get(method, len(METHOD_ORDER)),
        method,
        row["weight_format"],
        row["act_format"],
        row["branch_format"],
        row["branch_act_format"],
        row["rank"],
        row.get("variant", ""),
        row["cell_hash"],
        row["run_id"],
    )


def _variant_params(row: dict[str, Any]) -> dict[str, str]:
    """Params that may tell two rows of a table apart (the group's settings excluded)."""
    return {
        k: v for k, v in row["params"].items()
        if k not in _IDENTITY and k not in _SETTING_PARAMS and not k.startswith(_IDENTITY_PREFIXES)
    }


def _base_label(row: dict[str, Any]) -> str:
    if row["is_reference"]:
        return REFERENCE_LABEL
    rank = row["rank_text"] if row["rank"] > 0 else None
    return config_text(row["method"], row["weight_format"] or "?", row["act_format"] or "?", rank, branch_text(row))


def _label_variants(rows: list[dict[str, Any]]) -> None:
    """Rows that share method, formats, branch and rank get the params that tell them apart."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(_base_label(r), []).append(r)
    for base, same in by_key.items():
        for r in same:
            r["variant"] = ""
        if len(same) > 1:
            params = [_variant_params(r) for r in same]
            keys = sorted({k for p in params for k in p if len({q.get(k, "") for q in params}) > 1})
            for r, p in zip(same, params, strict=True):
                r["variant"] = ", ".join(f"{k}={p.get(k, '')}" for k in keys)
        for r in same:
            r["row_label"] = base + (f" ({r['variant']})" if r["variant"] else "")


def _assign(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows keyed by (experiment, model, prompt set, *settings)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r["experiment"], r["model"], r["prompt_set"], *(r[k] for k in SETTINGS))
        groups.setdefault(key, []).append(r)
    return groups


def make_groups(frame: pd.DataFrame, registry: dict[str, MetricInfo] | None = None) -> list[Group]:
    """One group per (experiment, model, prompt set, settings), sorted; rows sorted within.

    ``registry`` describes the registered metrics (see :func:`registry_metrics`).
    """
    registry = registry or {}
    groups = []
    for key, runs in _assign([dict(r) for r in frame.to_dict("records")]).items():
        rows = pool_replicates(runs, bootstrap_config(runs))  # a replicate group: one row
        _label_variants(rows)
        rows.sort(key=sort_key)
        names = sorted({n for r in rows for n in r["metric_names"]})
        metrics = [metric_info(n, rows, registry) for n in names]
        experiment, model, prompt_set, *settings = key
        groups.append(Group(experiment, model, prompt_set, dict(zip(SETTINGS, settings, strict=True)), rows, metrics))
    groups.sort(key=lambda g: (g.model, g.prompt_set, g.experiment, [_natural(v) for v in g.settings.values()]))
    siblings: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        siblings.setdefault((g.experiment, g.model, g.prompt_set), []).append(g)
    for g in groups:
        slug = "--".join(slugify(p) for p in (g.experiment, g.model, g.prompt_set))
        same = siblings[(g.experiment, g.model, g.prompt_set)]
        differ = [k for k in SETTINGS if len({s.settings[k] for s in same}) > 1]
        if differ:  # groups of one experiment, model and prompt set at different settings
            slug += "--" + slugify("_".join(f"{k}{g.settings[k]}" for k in differ))
        g.slug = slug
    return groups


# ----------------------------------------------------------------------------- display values


def method_text(row: dict[str, Any]) -> str:
    if row["is_reference"]:
        return REFERENCE_LABEL
    return row["method"] + (f" ({row['variant']})" if row["variant"] else "")


def branch_text(row: dict[str, Any]) -> str:
    if row["rank"] <= 0 or not row["branch_format"]:
        return DASH
    bf, baf = row["branch_format"], row["branch_act_format"]
    return bf if baf in ("", bf) else f"{bf}/{baf}"


def decimals(values: Iterable[float]) -> int:
    """Decimals for a column: three significant digits of its smallest value (0 to 4), plus up to
    two more where that would show different values as equal (e.g. SSIM 0.9987 vs 0.9991)."""
    finite = [v for v in values if math.isfinite(v)]
    nonzero = [abs(v) for v in finite if v != 0]
    if not nonzero:
        return 3
    base = max(0, min(4, 2 - math.floor(math.log10(min(nonzero)))))
    distinct = len(set(finite))
    return next((d for d in range(base, base + 2) if len({f"{v:.{d}f}" for v in finite}) == distinct), base + 2)


def fmt_number(value: float, places: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{places}f}"


SIZE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def size_unit(values: Iterable[float]) -> tuple[str, int]:
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    return next(((u, f) for u, f in SIZE_UNITS if top >= 10 * f), SIZE_UNITS[-1])


def metric_value(row: dict[str, Any], name: str) -> float | None:
    value = row["metrics"].get(name)
    return None if value is None else float(value)


def metric_reason(row: dict[str, Any], name: str) -> str:
    """Why a finished run has no value: its metric_status tag, or that nothing was logged."""
    tag = row["tags"].get(STATUS_PREFIX + name, "")
    if not tag:
        return "the run logged neither a value nor a metric_status tag"
    return re.sub(r"^not_computed:\s*", "", tag)


def one_line(text: str, limit: int = MAX_NOTE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- the table


@dataclass
class Cell:
    text: str
    bold: bool = False
    notes: list[int] = field(default_factory=list)
    spread: str = ""  # a replicated cell's between-replicate spread, shown after the text

    @property
    def full(self) -> str:
        return f"{self.text} {self.spread}" if self.spread else self.text


@dataclass(frozen=True)
class Column:
    header: str
    align: str  # "l" or "r"
    subheader: str = ""  # e.g. "n=16" under a metric
    metric: bool = False


@dataclass
class Table:
    slug: str
    title: str
    columns: list[Column]
    rows: list[list[Cell]]
    reference_rows: int
    footnotes: list[str]
    legend: str
    status_column: int  # index of the Status column

    @property
    def any_unfinished(self) -> bool:
        return any(row[self.status_column].text != "finished" for row in self.rows)


class _Notes:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1


def metric_interval(row: dict[str, Any], name: str) -> tuple[float, float] | None:
    """The row's interval ``(<name>.lo, <name>.hi)`` (:func:`~ptqbench.report.replicates.interval_of`)."""
    return interval_of(row["metrics"], name)


def metric_spread(row: dict[str, Any], name: str) -> Spread | None:
    """The between-replicate spread of a replicated row (k >= 2 finished replicates), else None."""
    spread = row.get(SPREAD, {}).get(name)
    return spread if spread is not None and spread.k >= 2 else None


def spread_text(spread: Spread, places: int) -> str:
    """``(k=3: sd 0.12, range 0.30)``: at the column's decimals, or two significant digits of the sd."""
    if spread.sd > 0 and math.isfinite(spread.sd):
        places = max(places, min(places + 3, 1 - math.floor(math.log10(spread.sd))))
    return f"(k={spread.k}: sd {fmt_number(spread.sd, places)}, range {fmt_number(spread.range, places)})"


def bootstrap_config(rows: Iterable[dict[str, Any]]) -> Bootstrap:
    """The interval settings the runs logged (params ``ci.level``, ``ci.resamples``, ``ci.seed``, ...:
    :func:`ptqbench.schema.interval_settings`), each where all runs that logged it agree, else the default."""
    logged = [interval_settings(r["params"]) for r in rows]
    agreed: dict[str, str] = {}
    for name in CI_FIELDS:
        found = sorted({p[name] for p in logged if name in p})
        if len(found) == 1:
            agreed[name] = found[0]
    return Bootstrap.from_settings(agreed)


def _paired_samples(rows: list[dict[str, Any]], name: str) -> dict[str, np.ndarray] | None:
    """Per-image values of ``name`` of each row (``row["per_image"]``: key, seed, a column per metric),
    aligned by key; None unless every row has them for the same keys and seeds."""
    tables = [r.get("per_image") for r in rows]
    if not tables or any(t is None or name not in t.columns for t in tables):
        return None
    aligned = [t[["key", "seed", name]].dropna().sort_values("key", kind="stable") for t in tables]
    first = aligned[0]
    if any(len(a) != len(first) or not (a["key"].to_numpy() == first["key"].to_numpy()).all()
           or not (a["seed"].to_numpy() == first["seed"].to_numpy()).all() for a in aligned):
        return None
    return {str(i): a[name].to_numpy(dtype=np.float64) for i, a in enumerate(aligned)}


def best_rows(group: Group, info: MetricInfo, config: Bootstrap) -> tuple[set[int], str]:
    """Indices of the finished quantized rows marked best on a metric, and the rule used: ``paired``
    (not significantly worse than the best mean, paired test on per-image values), ``overlap``
    (intervals reach the best's: set metrics), ``value`` (the best shown value: runs without intervals)."""
    if info.higher_is_better is None:
        return set(), ""
    cands = [i for i, r in enumerate(group.rows) if r["status"] == "finished" and not r["is_reference"]
             and metric_value(r, info.name) is not None and not math.isnan(metric_value(r, info.name))]
    if len(cands) < 2:
        return set(), ""
    rows = [group.rows[i] for i in cands]
    samples = _paired_samples(rows, info.name)
    if samples is not None and len(next(iter(samples.values()))) >= 2:
        keep = not_worse_than_best(samples, info.higher_is_better, config)
        return {cands[int(k)] for k in keep}, "paired"
    intervals = [metric_interval(r, info.name) for r in rows]
    if all(iv is not None for iv in intervals):
        ivs = {str(i): Interval(metric_value(r, info.name), iv[0], iv[1], config.level)  # type: ignore[arg-type,index]
               for i, (r, iv) in enumerate(zip(rows, intervals, strict=True))}
        return {cands[int(k)] for k in overlaps_best(ivs, info.higher_is_better)}, "overlap"
    finished = (metric_value(r, info.name) for r in group.rows if r["status"] == "finished")
    places = decimals(v for v in finished if v is not None)  # as the column shows them
    shown = [float(fmt_number(metric_value(r, info.name), places)) for r in rows]  # type: ignore[arg-type]
    best = max(shown) if info.higher_is_better else min(shown)
    return {i for i, v in zip(cands, shown, strict=True) if v == best}, "value"


def _symmetric(value: float, interval: tuple[float, float]) -> bool:
    lo, hi = interval
    return abs((hi - value) - (value - lo)) <= 0.2 * max(hi - lo, 1e-300)


def interval_text(value: float, interval: tuple[float, float] | None, places: int, plus_minus: bool) -> str:
    """``v ± h`` (h the half-width) or ``v [lo, hi]``; the bare value without an interval."""
    text = fmt_number(value, places)
    if interval is None:
        return text
    lo, hi = interval
    if plus_minus:
        return f"{text} ± {fmt_number((hi - lo) / 2, places)}"
    return f"{text} [{fmt_number(lo, places)}, {fmt_number(hi, places)}]"


def _metric_cells(
    group: Group, info: MetricInfo, notes_for: list[_Notes | None], config: Bootstrap
) -> tuple[list[Cell], str, str]:
    rows = group.rows
    values = [metric_value(r, info.name) if r["status"] == "finished" else None for r in rows]
    intervals = [metric_interval(r, info.name) if v is not None else None for r, v in zip(rows, values, strict=True)]
    places = decimals(v for v in values if v is not None)
    ns = {
        int(r["metrics"][n_metric(info.name)])
        for r, v in zip(rows, values, strict=True)
        if v is not None and n_metric(info.name) in r["metrics"]
    }
    uniform = len(ns) <= 1
    sub = f"n={next(iter(ns))}" if len(ns) == 1 else ("n varies" if ns else "")
    plus_minus = all(_symmetric(v, iv) for v, iv in zip(values, intervals, strict=True) if v is not None and iv)
    best, rule = best_rows(group, info, config)
    cells = []
    for i, (r, v, notes) in enumerate(zip(rows, values, notes_for, strict=True)):
        if r["status"] != "finished":
            cells.append(Cell(DASH))
        elif v is None:
            assert notes is not None
            n = notes.add(f"{info.name} not computed: {one_line(metric_reason(r, info.name))}")
            cells.append(Cell(NOT_COMPUTED, notes=[n]))
        else:
            text = interval_text(v, intervals[i], places, plus_minus)
            if not uniform and n_metric(info.name) in r["metrics"]:
                text += f" (n={int(r['metrics'][n_metric(info.name)])})"
            spread = metric_spread(r, info.name)
            cell = Cell(text, bold=i in best, spread=spread_text(spread, places) if spread else "")
            warning = r["tags"].get(WARNING_PREFIX + info.name, "")
            if warning and notes is not None:
                cell.notes.append(notes.add(f"{info.name}: {one_line(warning)}"))
            cells.append(cell)
    return cells, sub, rule


def build_table(group: Group) -> Table:
    """The display table of a group: config columns, metric columns, status; footnotes numbered in order."""
    notes = _Notes()
    rows = group.rows
    columns, table_rows = _config_columns(rows)
    # Metric cells are built column by column, but footnotes must number in reading order:
    # collect per-row notes first, then merge row by row.
    per_row_notes = [_Notes() if r["status"] == "finished" else None for r in rows]
    metric_cols = []
    config = bootstrap_config(rows)
    rules: set[str] = set()
    any_interval = False
    for info in group.metrics:
        cells, sub, rule = _metric_cells(group, info, per_row_notes, config)
        metric_cols.append(cells)
        rules.add(rule)
        any_interval |= any(metric_interval(r, info.name) for r in rows if r["status"] == "finished")
        columns.append(Column(info.header, "r", sub, metric=True))
    columns.append(Column("Status", "l"))
    for i, r in enumerate(rows):
        local = per_row_notes[i]
        for cells in metric_cols:
            cell = cells[i]
            cell.notes = [notes.add(local.texts[n - 1]) for n in cell.notes] if local else []
            table_rows[i].append(cell)
        status = Cell(r["status"])
        if r["status"] != "finished":
            reason = r["error"] if r["status"] == "failed" else "the run has not finished (running, or killed)"
            status.notes = [notes.add(f"{r['row_label']} {r['status']}: {one_line(reason)}")]
        for text in r.get(REPLICATE_NOTES, []):
            status.notes.append(notes.add(f"{r['row_label']}: {one_line(text)}; left out of its values"))
        table_rows[i].append(status)
    legend = _legend(group, rules, config, any_interval)
    return Table(
        slug=group.slug,
        title=group.title,
        columns=columns,
        rows=table_rows,
        reference_rows=sum(1 for r in rows if r["is_reference"]),
        footnotes=notes.texts,
        legend=legend,
        status_column=len(columns) - 1,
    )


def _config_columns(rows: list[dict[str, Any]]) -> tuple[list[Column], list[list[Cell]]]:
    """The configuration columns (method, formats, rank, bits per weight, size) and their cells."""
    unit, factor = size_unit(r["model_bytes"] for r in rows)
    columns = [
        Column("Method", "l"),
        Column("Weights", "l"),
        Column("Acts", "l"),
        Column("Branch", "l"),
        Column("Rank", "r"),
        Column("Bits/w", "r"),
        Column(f"Size ({unit})", "r"),
    ]
    size_places = 0 if factor == 1 else 1
    table_rows: list[list[Cell]] = []
    for r in rows:
        bpw, size = r["bits_per_weight"], r["model_bytes"]
        table_rows.append(
            [
                Cell(method_text(r)),
                Cell(r["weight_format"] or DASH),
                Cell(r["act_format"] or DASH),
                Cell(branch_text(r)),
                Cell(r["rank_text"] or DASH),
                Cell(DASH if math.isnan(bpw) else f"{bpw:.3f}"),
                Cell(DASH if math.isnan(size) else fmt_number(size / factor, size_places)),
            ]
        )
    return columns, table_rows


def _legend(group: Group, rules: set[str], config: Any, any_interval: bool) -> str:
    """The line under a table: directions and the best rule, intervals, the no-value marks."""
    has_dir = any(m.higher_is_better is not None for m in group.metrics)
    legend = "↑ higher is better, ↓ lower is better; " + best_legend(rules - {""}, config.level) if has_dir else ""
    if any_interval:
        legend += ("; " if legend else "") + interval_legend(config)
    if any(r.get(REPLICATE_RUNS) for r in group.rows):
        legend += ("; " if legend else "") + REPLICATE_LEGEND
    legend += ("; " if legend else "") + f"{NOT_COMPUTED} = not computed; {DASH} = no value (run not finished)"
    if group.reference is None:
        legend += "; no finished 16-bit reference run in this group"
    return legend


def best_legend(rules: set[str], level: float) -> str:
    """What the bold marking means, for the rules used in the table (see :func:`best_rows`)."""
    parts = []
    if "paired" in rules:
        parts.append(f"paired bootstrap at the {level:.0%} level on per-image differences (same prompts and seeds)")
    if "overlap" in rules:
        parts.append(f"set metrics: {level:.0%} intervals overlap")
    if "value" in rules or not parts:
        parts.append("without intervals: the best shown value")
    return "bold = not significantly worse than the best quantized cell: " + "; ".join(parts)


REPLICATE_LEGEND = (
    "replicated cells (k = finished replicates of the method's seeds): the mean of the k replicates, the interval "
    "over prompts of each prompt's mean across them (set metrics: their mean bounds), then the sd and range "
    "(max - min) of the k per-replicate values; \"best\" compares them by those per-prompt means"
)


def interval_legend(config: Bootstrap) -> str:
    method = "BCa" if config.method == "bca" else "percentile"
    return (f"± half-width or [lo, hi] of the {config.level:.0%} bootstrap interval ({method} over prompts for "
            "per-image metrics, basic over the image set for set metrics)")


# ----------------------------------------------------------------------------- Markdown


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    text = _md(cell.full)
    if cell.bold:
        text = f"**{text}**"
    return text + "".join(f"[{n}]" for n in cell.notes)


def to_markdown(table: Table) -> str:
    headers = [_md(c.header + (f" ({c.subheader})" if c.subheader else "")) for c in table.columns]
    lines = [f"### {_md(table.title)}", "", "| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join(":---" if c.align == "l" else "---:" for c in table.columns) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    lines += ["", _md(table.legend) + "."]
    if table.footnotes:
        lines += [""] + [f"[{i}] {_md(t)}  " for i, t in enumerate(table.footnotes, 1)]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------- LaTeX

# Only symbols of the base fonts (no TS1/textcomp glyphs, which OT1 documents render as bitmaps).
_LATEX = {
    "\\": r"$\backslash$", "&": r"\&", "%": r"\%", "$": r"{\char36}", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\~{}", "^": r"\^{}", "<": r"$<$", ">": r"$>$", "|": r"$|$",
    "—": "---", "–": "--", "…": r"\ldots{}", "·": r"$\cdot$",
    "×": r"$\times$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "≤": r"$\leq$", "≥": r"$\geq$",
    "±": r"$\pm$", "\u00a0": "~",
}


def latex_escape(text: str) -> str:
    """Plain text as LaTeX (pdflatex-safe): specials escaped, other non-ASCII transliterated."""
    out = []
    for ch in str(text).replace("\n", " "):
        if ch in _LATEX:
            out.append(_LATEX[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            ascii_ = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
            out.append(latex_escape(ascii_) if ascii_ else "?")
    return "".join(out)


def _tex_cell(cell: Cell) -> str:
    text = latex_escape(cell.full)
    if cell.bold:
        text = rf"\textbf{{{text}}}"
    return text + "".join(rf"\textsuperscript{{{n}}}" for n in cell.notes)


def to_latex(table: Table) -> str:
    """A booktabs ``table`` float: grouped headers, n under each metric, footnotes below."""
    keep = [i for i in range(len(table.columns)) if i != table.status_column or table.any_unfinished]
    cols = [table.columns[i] for i in keep]
    n_config = CONFIG_COLUMNS
    n_metrics = sum(1 for c in cols if c.metric)
    lines = [
        "% generated by `ptqbench report` from the tracked MLflow runs; regenerate, do not edit",
        r"\begin{table}[htbp]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(table.title)}}}",
        rf"\label{{tab:{table.slug.replace('_', '-')}}}",
        r"\begin{tabular}{" + "".join(c.align for c in cols) + "}",
        r"\toprule",
    ]
    if n_metrics:
        rest = len(cols) - n_config - n_metrics
        top = [rf"\multicolumn{{{n_config}}}{{c}}{{Configuration}}", rf"\multicolumn{{{n_metrics}}}{{c}}{{Metrics}}"]
        top += [""] * rest
        lines.append(" & ".join(top) + r" \\")
        lines.append(
            rf"\cmidrule(lr){{1-{n_config}}}\cmidrule(lr){{{n_config + 1}-{n_config + n_metrics}}}"
        )
    lines.append(" & ".join(latex_escape(c.header) for c in cols) + r" \\")
    if any(c.subheader for c in cols):
        lines.append(" & ".join(latex_escape(c.subheader).replace("=", "{=}") for c in cols) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        if i == table.reference_rows and table.reference_rows:
            lines.append(r"\midrule")
        lines.append(" & ".join(_tex_cell(row[j]) for j in keep) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip", r"{\footnotesize", latex_escape(table.legend) + "."]
    for i, text in enumerate(table.footnotes, 1):
        lines.append(rf"\par\textsuperscript{{{i}}}\,{latex_escape(text)}")
    lines += ["\\par}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CSV


def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def table_frame(group: Group) -> pd.DataFrame:
    """The raw numbers of a group, one row per table row, in table order. Where the group has a
    replicated cell: per metric ``<m>_k``, ``<m>_rep_sd``, ``<m>_rep_min``, ``<m>_rep_max`` (the
    between-replicate spread, :class:`~ptqbench.report.replicates.Spread`) and ``replicate_runs``."""
    own = {key for m in group.metrics for key in (m.name, n_metric(m.name), *interval_metrics(m.name))}
    replicated = any(r.get(REPLICATE_RUNS) for r in group.rows)
    other = sorted({k for r in group.rows for k in r["metrics"]} - own - {"bits_per_weight", "model_bytes"})
    records = []
    for r in group.rows:
        rec: dict[str, Any] = {
            "experiment": r["experiment"], "model": r["model"], "prompt_set": r["prompt_set"],
            **{k: r[k] for k in SETTINGS},
            "row": r["row_label"], "method": r["method"], "weight_format": r["weight_format"],
            "act_format": r["act_format"], "branch_format": r["branch_format"],
            "branch_act_format": r["branch_act_format"], "rank": r["rank"],
            "bits_per_weight": r["bits_per_weight"], "model_bytes": r["model_bytes"],
            "status": r["status"], "error": r["error"],
        }
        for m in group.metrics:
            value = metric_value(r, m.name)
            interval = metric_interval(r, m.name) if value is not None else None
            rec[m.name] = value
            rec[f"{m.name}_lo"], rec[f"{m.name}_hi"] = interval if interval else (None, None)
            rec[f"{m.name}_n"] = r["metrics"].get(n_metric(m.name))
            if replicated:
                rec.update(_spread_columns(m.name, r))
            status = ("ok" if value is not None else "not_computed") if r["status"] == "finished" else ""
            rec[f"{m.name}_status"] = status
            rec[f"{m.name}_reason"] = metric_reason(r, m.name) if r["status"] == "finished" and value is None else ""
            rec[f"{m.name}_direction"] = {True: "higher", False: "lower", None: ""}[m.higher_is_better]
        for k in other:
            rec[k] = r["metrics"].get(k)
        rec["run_id"], rec["cell_hash"] = r["run_id"], r["cell_hash"]
        if replicated:
            alone = r["run_id"] if r["status"] == "finished" else ""
            rec[REPLICATE_RUNS] = " ".join(r.get(REPLICATE_RUNS, [])) or alone
        records.append({k: _csv_value(v) for k, v in rec.items()})
    return pd.DataFrame(records)


def _spread_columns(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row's ``<m>_k`` and replicate sd/min/max columns (k = 1 and no spread for an unreplicated cell)."""
    spread = row.get(SPREAD, {}).get(name)
    if spread is None:
        k = 1 if row["status"] == "finished" and metric_value(row, name) is not None else None
        return {f"{name}_k": k, f"{name}_rep_sd": None, f"{name}_rep_min": None, f"{name}_rep_max": None}
    return {f"{name}_k": spread.k, f"{name}_rep_sd": spread.sd, f"{name}_rep_min": spread.low,
            f"{name}_rep_max": spread.high}


def to_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def runs_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every loaded run flattened (params, metrics, tags as prefixed columns), sorted deterministically."""
    records = []
    for r in frame.to_dict("records"):
        rec = {k: r[k] for k in ("experiment", "model", "prompt_set", "method", "status", "run_id", "cell_hash")}
        rec.update({f"param.{k}": v for k, v in r["params"].items()})
        rec.update({f"metric.{k}": v for k, v in r["metrics"].items()})
        rec.update({f"tag.{k}": v for k, v in r["tags"].items() if not k.startswith("mlflow.")})
        records.append(rec)
    out = pd.DataFrame(records)
    fixed = ["experiment", "model", "prompt_set", "method", "status", "run_id", "cell_hash"]
    out = out[fixed + sorted(c for c in out.columns if c not in fixed)]
    return out.sort_values(["experiment", "model", "prompt_set", "method", "cell_hash", "run_id"], kind="stable")
