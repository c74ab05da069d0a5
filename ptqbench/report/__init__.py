"""``ptqbench report``: tables (Markdown, LaTeX, CSV), plots (PNG, PDF) and one HTML page from the MLflow runs.

Everything comes from the tracked runs (params, metrics, tags, artifacts), never from logs or
typed numbers; the same runs give byte-identical tables. Written into ``--out`` (default
``./reports``)::

    index.html                    self-contained page (tables, plots, sample grids inlined)
    tables.md                     every table in one Markdown file
    tables/<group>.{md,tex,csv}   one table per experiment x model x prompt set (x settings)
    tables/runs.csv               every run with all its params, metrics and tags
    plots/<group>--{rank,pareto,layer-errors,samples}.{png,pdf}
    manifest.json                 the files above; the next report into --out removes those it no longer writes

A plot without data (e.g. a single rank) is skipped with a note; notes are printed and shown on the page.

``--compare A B`` (each a run id, a cell hash or a run's label) writes nothing: it prints the paired
difference ``A - B`` of every per-image metric both runs logged (their ``per_image.csv``, matched by
prompt key and seed), its bootstrap interval, p-value and verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment", action="append", metavar="NAME",
        help="experiment (suite name) to report; repeat for several (default: every experiment)",
    )
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: ./reports)")
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--compare", nargs=2, metavar=("A", "B"),
        help="print the paired difference A - B per metric (A, B: run ids, cell hashes or labels); write nothing",
    )


def main(args: argparse.Namespace) -> int:
    from ptqbench.report.build import build_report, compare_runs
    from ptqbench.tracking import resolve_uri

    if args.compare:
        print(compare_runs(resolve_uri(args.tracking_uri), *args.compare, args.experiment), end="")
        return 0
    report = build_report(resolve_uri(args.tracking_uri), args.out, args.experiment)
    for note in report.notes:
        print(f"note: {note}")
    plots = sum(1 for f in report.files if f.suffix == ".png")
    print(f"report: {report.runs} runs in {report.groups} tables, {plots} plots -> {report.out / 'index.html'}")
    return 0
