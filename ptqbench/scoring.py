"""Scoring apart from generation: metrics computed from a finished cell's saved images.

``ptqbench score SUITE.yaml [--metrics m1,m2]`` scores the finished cells of a suite into their
existing MLflow runs; ``ptqbench score --run RUN_ID`` scores one run. A run finds its images
through its ``images_dir`` / ``reference_dir`` / ``real_dir`` tags (:mod:`ptqbench.schema`), so
no model is loaded and no image generated. Each score is keyed by (the images, the metric, its
weights): the ``score_key.<m>`` tag holds the digest of the image folders' indexes (which carry
every PNG's SHA-256), the metric's name, class and options and the metric weight files found on
this machine; a metric whose key is unchanged is not computed again unless asked for by name.

A run is scored with its own settings (:func:`run_settings`): the interval settings it logged
(``ci.*``) and, per metric, the options it logged (``metric_options.<m>.<option>``); a metric the
run never had takes the suite's options, and a run that logged no interval settings the suite's
(else the defaults), and both are then logged into it. The new metrics' per-image values are
merged into the run's ``per_image.csv`` (:func:`ptqbench.artifacts.merge_scores`), so the report's
intervals and paired tests cover them.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqbench import schema
from ptqbench.cache import cache_key
from ptqbench.errors import UserError
from ptqbench.imagestore import INDEX, ImageFolder
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, get_metric
from ptqbench.uncertainty import DEFAULT as DEFAULT_BOOTSTRAP
from ptqbench.uncertainty import Bootstrap

Options = Mapping[str, Mapping[str, Any]]  # metric options by metric name (a suite's metric_options)


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


def score_key(metric: Metric, images: str, reference: str | None, real_dir: str | None,
              options: Mapping[str, Any] | None = None) -> str:
    """The key of one score: the images (index digests), the metric, its options and its weights."""
    cls = type(metric)
    parts = [folder_digest(images), folder_digest(reference), real_dir, metric.name,
             f"{cls.__module__}.{cls.__qualname__}", weights_fingerprint()]
    if options:  # keys of metrics without options are what they were before options were keyed
        parts.append(sorted((str(k), repr(v)) for k, v in options.items()))
    return cache_key("score", *parts)


def compute_metrics(
    inputs: MetricInputs, names: Iterable[str], is_reference: bool, options: Options | None = None
) -> dict[str, MetricResult]:
    """Each metric (built with its ``options``) on ``inputs``; the 16-bit reference is not compared with itself."""
    from ptqbench.evaluate import REFERENCE_ITSELF

    options = options or {}
    out = {}
    for name in names:
        metric = get_metric(name, **options.get(name, {}))
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


def score_tags(names: Iterable[str], tags: Mapping[str, str], options: Options | None = None) -> dict[str, str]:
    """``score_key.<m>`` and ``metric_direction.<m>`` for metrics (built with their ``options``)
    scored on the images ``tags`` locate."""
    images, ref, real = tags[schema.IMAGES_DIR], tags.get(schema.REFERENCE_DIR), tags.get(schema.REAL_DIR)
    options = options or {}
    out = {}
    for name in names:
        metric = get_metric(name, **options.get(name, {}))
        out[schema.SCORE_KEY + name] = score_key(metric, images, ref, real, options.get(name))
        out[schema.METRIC_DIRECTION + name] = schema.direction(metric.higher_is_better)
    return out


@dataclass(frozen=True)
class RunSettings:
    """What a run is scored with: metric options by name, the interval settings, and the params
    the run lacks of them (to log into it)."""

    options: dict[str, dict[str, Any]]
    bootstrap: Bootstrap
    params: dict[str, Any]


def run_settings(run: Any, names: Iterable[str], options: Options | None = None,
                 bootstrap: Bootstrap | None = None) -> RunSettings:
    """The run's logged settings for scoring ``names``: its ``ci.*`` params (else ``bootstrap``, else
    the defaults) and, per metric, its ``metric_options.<m>.*`` params; a metric the run never had
    takes ``options`` (the suite's); a metric it had without options keeps the metric's defaults."""
    logged = schema.logged_metric_options(run.params)
    have = schema.metric_names(run.metrics, run.tags)
    ci = schema.interval_settings(run.params)
    chosen = Bootstrap.from_settings(ci) if ci else bootstrap or DEFAULT_BOOTSTRAP
    params: dict[str, Any] = {} if ci else schema.interval_params(chosen)
    per_metric: dict[str, dict[str, Any]] = {}
    new: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in logged:
            per_metric[name] = logged[name]
        elif name not in have and options and options.get(name):
            per_metric[name] = new[name] = dict(options[name])
        else:
            per_metric[name] = {}
    params.update(schema.metric_options_params(new))
    return RunSettings(per_metric, chosen, params)


def score_run(tracker: Any, run: Any, names: Sequence[str] | None = None, device: str = "cpu",
              options: Options | None = None, bootstrap: Bootstrap | None = None) -> list[str]:
    """Score a finished run from its saved images into itself, with its own settings
    (:func:`run_settings`; ``options`` and ``bootstrap`` are the suite's, for what the run lacks);
    returns the metrics computed. ``names=None``: the run's metrics whose score key changed or is
    absent; named metrics are always computed again."""
    tags = dict(run.tags)
    if schema.IMAGES_DIR not in tags:
        raise UserError(f"run {run.run_id}: no {schema.IMAGES_DIR} tag (it was run before ptqbench kept one); "
                        "run its suite again to regenerate it")
    candidates = list(names) if names else sorted(schema.metric_names(run.metrics, tags))
    settings = run_settings(run, candidates, options, bootstrap)
    keys = score_tags(candidates, tags, settings.options)
    todo = candidates if names else [m for m in candidates if tags.get(schema.SCORE_KEY + m) != keys[
        schema.SCORE_KEY + m]]
    if not todo:
        return []
    images = Path(tags[schema.IMAGES_DIR])
    for folder in (images, Path(tags[schema.REFERENCE_DIR]) if schema.REFERENCE_DIR in tags else None):
        if folder is not None and not (folder / INDEX).is_file():
            raise UserError(f"run {run.run_id}: image folder {folder} is gone (no {INDEX}); run its suite again")
    reference = tags.get(schema.REFERENCE_DIR)
    is_reference = tags.get(schema.IS_REFERENCE) == "true"
    folder = ImageFolder(images)
    inputs = MetricInputs.from_folders(
        images, None if is_reference else reference, folder.prompts,
        Path(tags[schema.REAL_DIR]) if schema.REAL_DIR in tags else None, device, settings.bootstrap,
    )
    results = compute_metrics(inputs, todo, is_reference, settings.options)
    if settings.params:
        tracker.log_params(run.run_id, settings.params)
    log_scores(tracker, run.run_id, results, {k: v for k, v in keys.items() if k.split(".", 1)[-1] in todo}, tags)
    log_per_image(tracker, run.run_id, folder, results)
    return todo


def log_per_image(tracker: Any, run_id: str, folder: ImageFolder, results: Mapping[str, MetricResult]) -> None:
    """Merge the per-image values of ``results`` into the run's ``per_image.csv`` artifact
    (:func:`ptqbench.artifacts.merge_scores`) and log it back."""
    from ptqbench.artifacts import merge_scores
    from ptqbench.report.load import Artifacts

    with tempfile.TemporaryDirectory(prefix="ptqbench-score-") as tmp:
        root = Path(tmp)
        uri = tracker.client.get_run(run_id).info.artifact_uri
        artifacts = Artifacts(tracker.client, root / "download", {run_id: uri})
        existing = artifacts.get(run_id, schema.PER_IMAGE_FILE)
        if artifacts.notes:  # a table that is there but cannot be read must not be replaced
            raise UserError(f"run {run_id}: {'; '.join(artifacts.notes)}")
        (root / "upload").mkdir()
        if merge_scores(root / "upload", existing, folder.keys, folder.seeds, results) is not None:
            tracker.log_artifacts(run_id, root / "upload")


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
        todo = wanted if names else [m for m in wanted if m not in current] or None
        scored += bool(score_run(tracker, run, todo, device, suite.metric_options, suite.uncertainty))
    print(f"{suite.name}: {len(runs)} finished cells of {len(hashes)}, {scored} scored", file=sys.stderr)
    return 0
