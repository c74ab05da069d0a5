"""Build the whole report (load runs, group them, write tables, plots and the HTML page), or
compare two runs image by image (``--compare A B``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ptqbench.errors import UserError
from ptqbench.report import html, plots, tables
from ptqbench.report.load import Artifacts, Runs, attach_per_image, client_for, load_runs, per_image_table, redact
from ptqbench.schema import PER_IMAGE_FILE
from ptqbench.uncertainty import compare, format_comparisons

MANIFEST = "manifest.json"


@dataclass
class Report:
    """What a report wrote and noticed."""

    out: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    groups: int = 0


def _write(path: Path, text: str, report: Report) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
    report.files.append(path)


def _meta(uri: str, runs: Runs) -> list[tuple[str, str]]:
    frame = runs.frame
    counts = frame["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index))
    params = list(frame["params"])
    commits = sorted({p.get("git_commit", "") for p in params} - {""})
    versions = sorted({(k[len("versions."):], v) for p in params for k, v in p.items() if k.startswith("versions.")})
    meta = [
        ("tracking store", redact(uri)),
        ("experiments", ", ".join(runs.experiments)),
        ("runs", f"{len(frame)} ({status})"),
    ]
    if commits:
        meta.append(("git commit", ", ".join(commits)))
    if versions:
        meta.append(("versions", ", ".join(f"{k} {v}" for k, v in versions)))
    return meta


def build_report(uri: str, out: Path, experiments: Sequence[str] | None = None) -> Report:
    """Read the runs of ``experiments`` (all by default) from ``uri`` and write the report into ``out``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder (give a folder for the report)")
    client = client_for(uri)
    runs = load_runs(client, experiments)
    report = Report(out=out, runs=len(runs.frame))
    sections = []
    with tempfile.TemporaryDirectory(prefix="ptqbench-report-") as tmp:
        uris = dict(zip(runs.frame["run_id"], runs.frame["artifact_uri"], strict=True))
        artifacts = Artifacts(client, Path(tmp), uris)
        attach_per_image(runs, artifacts)  # the paired tests of the "best" marking read them
        report.notes = list(runs.notes)
        groups = tables.make_groups(runs.frame, tables.registry_metrics(report.notes))
        report.groups = len(groups)
        for group in groups:
            table = tables.build_table(group)
            md, tex = tables.to_markdown(table), tables.to_latex(table)
            csv = tables.to_csv(tables.table_frame(group))
            base = out / "tables" / group.slug
            _write(base.with_suffix(".md"), md, report)
            _write(base.with_suffix(".tex"), tex, report)
            _write(base.with_suffix(".csv"), csv, report)
            made = plots.group_plots(group, artifacts, out / "plots", report.notes)
            report.files += [f for p in made for f in (p.png, p.pdf)]
            sections.append(html.Section(table, tex, csv, made))
        report.notes += artifacts.notes
        _write(out / "tables" / "runs.csv", tables.to_csv(tables.runs_frame(runs.frame)), report)
        _write(out / "tables.md", "\n".join(tables.to_markdown(s.table) for s in sections), report)
        _write(out / "index.html", html.page(sections, _meta(uri, runs), report.notes), report)
    _replace_manifest(out, report)
    return report


# ----------------------------------------------------------------------------- --compare A B

_FIND_BY = ("run_id", "cell_hash", "label", "run_name")


def find_run(frame: pd.DataFrame, ref: str) -> dict[str, Any]:
    """The one loaded run whose id, cell hash, label or run name is ``ref`` (tried in that order)."""
    for column in _FIND_BY:
        hits = frame[frame[column] == ref]
        if len(hits) == 1:
            return hits.iloc[0].to_dict()
        if len(hits) > 1:
            which = ", ".join(f"{r.run_id} ({r.experiment}, {r.cell_hash})" for r in hits.itertuples())
            raise UserError(f"--compare {ref}: {len(hits)} runs have this {column} ({which}); "
                            "give a run id or cell hash, or pick one experiment with --experiment")
    labels = ", ".join(sorted(set(frame["label"]))[:12])
    raise UserError(f"--compare {ref}: no loaded run has this run id, cell hash or label (labels: {labels})")


def compare_runs(uri: str, a: str, b: str, experiments: Sequence[str] | None = None) -> str:
    """The ``--compare A B`` text: the paired difference ``A - B`` with its interval on every
    per-image metric both runs logged (:func:`ptqbench.uncertainty.compare`)."""
    client = client_for(uri)
    frame = load_runs(client, experiments).frame
    rows = [find_run(frame, ref) for ref in (a, b)]
    with tempfile.TemporaryDirectory(prefix="ptqbench-compare-") as tmp:
        artifacts = Artifacts(client, Path(tmp), {r["run_id"]: r["artifact_uri"] for r in rows})
        per_image = [per_image_table(artifacts, r["run_id"]) for r in rows]
    for ref, row, table in zip((a, b), rows, per_image, strict=True):
        if table is None:
            why = "; ".join(artifacts.notes) or f"no {PER_IMAGE_FILE} (logged before per-image values were kept)"
            raise UserError(f"--compare {ref}: run {row['run_id']} ({row['label']}) has no per-image values: {why}")
    registry = tables.registry_metrics([])
    names = {n for r in rows for n in r["metric_names"]}
    directions = {n: tables.metric_info(n, rows, registry).higher_is_better for n in names}
    comparisons = compare(per_image[0], per_image[1], directions, tables.bootstrap_config(rows))
    return format_comparisons(comparisons, *(_run_text(r) for r in rows))


def _run_text(row: dict[str, Any]) -> str:
    return f"{row['label'] or row['run_name']} (run {row['run_id']}, cell {row['cell_hash']}, {row['experiment']})"


def _replace_manifest(out: Path, report: Report) -> None:
    """Delete what the previous report in ``out`` wrote and this one did not (stale tables and
    plots of runs since deleted), then record this report's files. Nothing else is touched."""
    manifest = out / MANIFEST
    try:
        previous = set(json.loads(manifest.read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        previous = set()
    current = {p.relative_to(out).as_posix() for p in report.files}
    for rel in sorted(previous - current):
        stale = out / rel
        if ".." not in Path(rel).parts and stale.is_file():
            stale.unlink()
    manifest.write_text(json.dumps({"files": sorted(current)}, indent=1) + "\n", encoding="utf-8")
