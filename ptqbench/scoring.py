"""Scoring apart from generation: metrics computed from a finished cell's saved images.

``ptqbench score SUITE.yaml [--metrics m1,m2]`` scores the finished cells of a suite into their
existing MLflow runs; ``ptqbench score --run RUN_ID`` scores one run. A run finds its images
through its ``images_dir`` / ``reference_dir`` / ``real_dir`` tags (:mod:`ptqbench.schema`), so
no model is loaded and no image generated. Each score is keyed by (the images, the metric, its
weights): the ``score_key.<m>`` tag holds the digest of the image folders' indexes (which carry
every PNG's SHA-256), the metric's name and class and the metric weight files found on this
machine; a metric whose key is unchanged is not computed again unless asked for by name.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptqbench import schema
from ptqbench.cache import cache_key
from ptqbench.errors import UserError
from ptqbench.imagestore import INDEX, ImageFolder
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, get_metric


def folder_digest(folder: str | Path | None) -> str | None:
    """SHA-256 of a folder's ``index.json`` (which names each PNG with its checksum), or None."""
    if folder is None:
        return None
    return hashlib.sha256((Path(folder) / INDEX).read_bytes()).hexdigest()


def weights_fingerprint() -> list[list[Any]]:
    """(file, size) of every metric weight file present where it would be looked for first."""
    from ptqbench.metrics import weights

    out = []
    for value in sorted(vars(weights).values(), key=str):
        if isinstance(value, weights.WeightFile):
            hit = next((p for _, p in value.candidates() if p.is_file()), None)
            out.append([value.filename, hit.stat().st_size if hit else None])
    return out


def score_key(metric: Metric, images: str, reference: str | None, real_dir: str | None) -> str:
    """The key of one score: the images (index digests), the metric and its weights."""
    cls = type(metric)
    return cache_key("score", folder_digest(images), folder_digest(reference), real_dir, metric.name,
                     f"{cls.__module__}.{cls.__qualname__}", weights_fingerprint())


def compute_metrics(inputs: MetricInputs, names: Iterable[str], is_reference: bool) -> dict[str, MetricResult]:
    """Each metric on ``inputs``; the 16-bit reference is not compared with itself."""
    from ptqbench.evaluate import REFERENCE_ITSELF

    out = {}
    for name in names:
        metric = get_metric(name)
        if is_reference and "reference" in metric.needs:
            out[name] = MetricResult.missing(metric, REFERENCE_ITSELF)
        else:
            out[name] = metric(inputs)
    return out


def image_tags(images_dir: Path, reference_dir: Path | None, real_dir: Path | None) -> dict[str, str]:
    """The tags that locate a run's images (for scoring later)."""
    tags = {schema.IMAGES_DIR: str(Path(images_dir).resolve())}
    if reference_dir is not None:
        tags[schema.REFERENCE_DIR] = str(Path(reference_dir).resolve())
    if real_dir is not None:
        tags[schema.REAL_DIR] = str(Path(real_dir).resolve())
    return tags


def score_tags(names: Iterable[str], tags: Mapping[str, str]) -> dict[str, str]:
    """``score_key.<m>`` and ``metric_direction.<m>`` for metrics scored on the images ``tags`` locate."""
    images, ref, real = tags[schema.IMAGES_DIR], tags.get(schema.REFERENCE_DIR), tags.get(schema.REAL_DIR)
    out = {}
    for name in names:
        metric = get_metric(name)
        out[schema.SCORE_KEY + name] = score_key(metric, images, ref, real)
        out[schema.METRIC_DIRECTION + name] = schema.direction(metric.higher_is_better)
    return out


def score_run(tracker: Any, run: Any, names: Sequence[str] | None = None, device: str = "cpu") -> list[str]:
    """Score a finished run from its saved images into itself; returns the metrics computed.

    ``names=None``: the run's metrics whose score key changed or is absent; named metrics are
    always computed again.
    """
    tags = dict(run.tags)
    if schema.IMAGES_DIR not in tags:
        raise UserError(f"run {run.run_id}: no {schema.IMAGES_DIR} tag (it was run before ptqbench kept one); "
                        "run its suite again to regenerate it")
    keys = score_tags(names or schema.metric_names(run.metrics, tags), tags)
    todo = list(names) if names else [
        m for m in sorted(schema.metric_names(run.metrics, tags)) if tags.get(schema.SCORE_KEY + m) != keys[
            schema.SCORE_KEY + m]
    ]
    if not todo:
        return []
    images = Path(tags[schema.IMAGES_DIR])
    for folder in (images, Path(tags[schema.REFERENCE_DIR]) if schema.REFERENCE_DIR in tags else None):
        if folder is not None and not (folder / INDEX).is_file():
            raise UserError(f"run {run.run_id}: image folder {folder} is gone (no {INDEX}); run its suite again")
    reference = tags.get(schema.REFERENCE_DIR)
    is_reference = tags.get(schema.IS_REFERENCE) == "true"
    inputs = MetricInputs.from_folders(
        images, None if is_reference else reference, ImageFolder(images).prompts,
        Path(tags[schema.REAL_DIR]) if schema.REAL_DIR in tags else None, device,
    )
    results = compute_metrics(inputs, todo, is_reference)
    log_scores(tracker, run.run_id, results, {k: v for k, v in keys.items() if k.split(".", 1)[-1] in todo}, tags)
    return todo


def log_scores(
    tracker: Any, run_id: str, results: Mapping[str, MetricResult], keys: Mapping[str, str], tags: Mapping[str, str]
) -> None:
    """Log scores into a run (:func:`ptqbench.schema.score_values`) with their keys; a metric that
    now has a value loses its old ``metric_status`` tag."""
    values, status = schema.score_values(results)
    for name in results:
        if name in values and schema.METRIC_STATUS + name in tags:
            tracker.client.delete_tag(run_id, schema.METRIC_STATUS + name)
    tracker.log_metrics(run_id, values)
    tracker.set_tags(run_id, {**keys, **status})


# ============================================================================ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", nargs="?", help="suite YAML file: score its finished cells")
    parser.add_argument("--run", metavar="RUN_ID", help="score one run (instead of a suite)")
    parser.add_argument("--metrics", metavar="M1,M2",
                        help="metrics to compute (again); default: those whose images or weights changed")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (as for ptqbench run)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where metrics run (default: cuda when available)")


def _metric_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    from ptqbench.metrics.base import METRICS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS.names()]
    if unknown:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown)} (valid: {', '.join(METRICS.names())})")
    return names


def main(args: argparse.Namespace) -> int:
    from ptqbench.distributed import resolve_device
    from ptqbench.tracking import Tracker

    if bool(args.suite) == bool(args.run):
        raise UserError("give a suite file or --run RUN_ID (one of them)")
    names = _metric_list(args.metrics)
    device = resolve_device(args.device)
    tracker = Tracker(args.tracking_uri)
    if args.run:
        from mlflow.exceptions import MlflowException

        from ptqbench.tracking import _cell_run

        try:
            run = _cell_run(tracker.client.get_run(args.run))
        except MlflowException as exc:
            raise UserError(f"--run {args.run}: no such run in {tracker.uri} ({exc})") from None
        done = score_run(tracker, run, names, device)
        print(f"run {args.run}: scored {', '.join(done) or 'nothing (every score is current)'}", file=sys.stderr)
        return 0
    return score_suite(tracker, args.suite, names, device)


def score_suite(tracker: Any, suite_file: str, names: Sequence[str] | None, device: str) -> int:
    """Score every finished cell of a suite (default: the suite's metrics not yet current)."""
    from ptqbench.suite import expand, load_suite

    suite = load_suite(suite_file)
    hashes = {c.hash for c in expand(suite)}
    runs = [r for r in tracker.runs(tracker.experiment(suite.name)) if r.status == "FINISHED"
            and r.tags.get(schema.HASH) in hashes]
    scored = 0
    for run in runs:
        wanted = names or list(suite.metrics)
        current = set(schema.metric_names(run.metrics, run.tags))
        done = score_run(tracker, run, wanted if names else [m for m in wanted if m not in current] or None, device)
        scored += bool(done)
    print(f"{suite.name}: {len(runs)} finished cells of {len(hashes)}, {scored} scored", file=sys.stderr)
    return 0
