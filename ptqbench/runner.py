"""``ptqbench run SUITE``: expand a suite into cells and run each one into MLflow.

Each cell is found again by its ``cell_hash`` tag: a finished cell is skipped (a metric the suite
asks for and its run lacks is scored from its saved images, :mod:`ptqbench.scoring`), a failed or
killed one runs again (its stale run deleted), so a suite can be interrupted and resumed at any
point and never holds two runs of one cell. A cell's folder (``OUT/<cell hash>``) is kept across
attempts: a resumed cell keeps the images it already wrote and its quantized layers
(:mod:`ptqbench.imagestore`, :mod:`ptqbench.quantcache`) and generates only what is missing.
Each model is loaded once and serves all its cells (``evaluate`` restores the transformer). A
crash inside a cell is recorded (FAILED, error tag, ``traceback.txt``) and the suite goes on; the
exit code is 1 if any cell failed. What a run carries is :mod:`ptqbench.schema`; the files it
leaves are written by :mod:`ptqbench.artifacts`. Several processes may run one suite into one
store: a cell another live process holds (its lease, :mod:`ptqbench.tracking`) is *busy*: the
runner goes on with its other cells, tries the busy ones once more at the end (running those whose
holder has failed or died meanwhile) and counts the rest as run elsewhere. Under
``torchrun --nproc-per-node N -m ptqbench run`` every rank runs the same cells cooperatively
(:mod:`ptqbench.distributed`: data-parallel generation and calibration, layer-parallel
quantization); rank 0 alone scores, talks to MLflow and shows progress.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ptqbench import distributed as dist
from ptqbench import schema
from ptqbench.artifacts import write_artifacts, write_scores
from ptqbench.display import dry_run_lines
from ptqbench.errors import UserError
from ptqbench.labels import formats_text, rank_text
from ptqbench.shapes import ShapeCache
from ptqbench.suite import Cell, Suite, expand, load_suite

VERSIONED = ("ptqbench", "torch", "diffusers", "transformers", "mlflow", "numpy", "safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML file (see suites/)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print one line per cell (bits, bytes, rank); run nothing"
    )
    parser.add_argument("--only", metavar="GLOB", help="run cells whose label, model, method or hash matches GLOB")
    parser.add_argument(
        "--shard", metavar="I/N", help="run slice I of N (0 <= I < N) of the cells, in cell-hash order"
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", help="cache of references and calibration (default: $PTQBENCH_CACHE)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default: cuda when available)")
    parser.add_argument("--out", metavar="DIR", help="where cells write their images (default: CACHE/runs/SUITE)")
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="CPU threads for torch (default: torch's; 1 is fastest for tiny models on a busy machine)",
    )


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise UserError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4 .. 3/4")
    return int(m[1]), int(m[2])


def main(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    shard = parse_shard(args.shard)
    for note in sorted({p.note for p in suite.prompts if p.note}):
        print(f"note: {suite.file}: {note}", file=sys.stderr)
    if args.dry_run:
        cells = _select(suite, expand(suite), args.only, shard)
        for line in dry_run_lines(cells):
            print(line)
        refs = sum(c.is_reference for c in cells)
        print(f"# {len(cells)} cells ({refs} 16-bit references) from {suite.file}; nothing was run")
        return 0
    from ptqbench.cache import Cache
    from ptqbench.tracking import Tracker

    device = dist.resolve_device(args.device)
    set_threads(args.threads)
    dist.init(device)  # torchrun: every rank runs the suite cooperatively (ptqbench.distributed)
    try:
        cache = Cache(args.cache_dir)
        out = Path(args.out) if args.out else cache.root / "runs" / _safe(suite.name)
        tracker = dist.main_only(lambda: Tracker(args.tracking_uri))  # only rank 0 talks to MLflow
        runner = Runner(suite, tracker, cache, out, device)
        # models without a shipped config are loaded once, for their shapes and their cells
        shapes = ShapeCache(lambda entry: runner.load(entry).transformer)
        cells = _select(suite, expand(suite, shapes), args.only, shard)
        return runner.run(cells)
    finally:
        dist.shutdown()


def set_threads(n: int | None) -> None:
    import torch

    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads {n}: must be >= 1")
    torch.set_num_threads(n)


def select(cells: Sequence[Cell], only: str | None = None, shard: tuple[int, int] | None = None) -> list[Cell]:
    """Cells matching ``only`` (a glob on label, model, method or hash), then shard ``i`` of ``n``
    (cells sorted by hash, every n-th from i); the suite's order is kept."""
    chosen = list(cells)
    if only:
        chosen = [
            c for c in chosen
            if any(fnmatch.fnmatchcase(s, only) for s in (c.label, c.model.name, c.method_name, c.hash))
        ]
    if shard:
        i, n = shard
        keep = {c.hash for c in sorted(chosen, key=lambda c: c.hash)[i::n]}
        chosen = [c for c in chosen if c.hash in keep]
    return chosen


def _select(suite: Suite, cells: list[Cell], only: str | None, shard: tuple[int, int] | None) -> list[Cell]:
    chosen = select(cells, only, shard)
    if only and not chosen:
        raise UserError(f"--only {only}: matches no cell of {suite.file} (it is matched against labels, "
                        "model and method names and cell hashes)")
    return chosen


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


# ============================================================================ progress


class TqdmProgress:
    """A :class:`~ptqbench.generation.StageProgress` on a second tqdm bar: ``stage(name, total)``, ``advance(n)``.

    Shown by rank 0 only (every rank's images are counted: :mod:`ptqbench.distributed`); image
    stages show images per second and the stage's ETA, and the images of ``counted`` (the stage
    that makes the cell's own images) also move ``suite``.
    """

    def __init__(self, position: int = 1, suite: SuiteBar | None = None, counted: str = "generate"):
        self.position = position
        self.bar: Any = None
        self.suite, self.counted, self.name = suite, counted, ""

    def stage(self, name: str, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        self.close()
        self.name = name
        unit = "img" if name in IMAGE_STAGES else "it"
        self.bar = tqdm(total=total, desc=f"  {name}", position=self.position, leave=False, dynamic_ncols=True,
                        unit=unit, disable=not dist.is_main())

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
        if self.suite is not None and self.name == self.counted:
            self.suite.advance(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


IMAGE_STAGES = ("reference", "calibrate", "generate")


class SuiteBar:
    """The suite's bar (rank 0): the images its pending cells make, with images per second and the
    suite's ETA; ``update(n)`` ends ``n`` cells (their images counted in full, run or not)."""

    def __init__(self, images: Sequence[int]):
        from tqdm.auto import tqdm

        self.images, self.cell, self.counted = list(images), 0, 0
        self.bar = tqdm(total=sum(self.images), desc="suite", unit="img", position=0, dynamic_ncols=True,
                        disable=not dist.is_main())

    def __enter__(self) -> SuiteBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def advance(self, n: int) -> None:
        if self.cell < len(self.images):
            n = min(n, self.images[self.cell] - self.counted)
            self.counted += n
            self.bar.update(n)

    def update(self, cells: int = 1) -> None:
        for _ in range(cells):
            self.advance(self.images[self.cell] - self.counted if self.cell < len(self.images) else 0)
            self.cell, self.counted = self.cell + 1, 0

    def add(self, images: Sequence[int]) -> None:
        """More cells at the end (busy cells tried again)."""
        self.images.extend(images)
        self.bar.total += sum(images)
        self.bar.refresh()

    def set_postfix_str(self, label: str) -> None:
        self.bar.set_postfix_str(f"cell {self.cell + 1}/{len(self.images)} {label}")


# ============================================================================ the runner


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # finished or running in another process
    rescored: list[str] = field(default_factory=list)


class Runner:
    """Runs cells into one MLflow experiment (the suite's name)."""

    def __init__(self, suite: Suite, tracker: Any, cache: Any, out: Path, device: str):
        self.suite = suite
        self.tracker = tracker
        self.cache = cache
        self.out = Path(out)
        self.device = device
        tags = schema.experiment_tags(suite.file, suite.description or suite.name)
        self.experiment = tracker.experiment(suite.name, tags)
        self.outcome = Outcome()
        self.suite_bar: SuiteBar | None = None
        self._prompts: dict[Any, Any] = {}
        self._pipelines: dict[tuple[Any, ...], Any] = {}
        self._runtime = runtime_params()
        self.busy: list[Cell] = []  # cells another process held when their turn came
        self.last_pass = False

    # ------------------------------------------------------------------ suite level
    def run(self, cells: Sequence[Cell]) -> int:
        done = {r.tags.get(schema.HASH): r for r in self.tracker.runs(self.experiment) if r.status == "FINISHED"}
        pending = [c for c in cells if c.hash not in done]
        self.outcome.skipped = [c.hash for c in cells if c.hash in done]
        dist.on_main(self.rescore, [(c, done[c.hash]) for c in cells if c.hash in done])
        for cell in pending:  # missing prompt data fails here, before any cell runs
            self.prompt_set(cell)
            if "calibration" in cell.config:
                c = cell.calibration
                self._load_prompts((c.prompt_set, c.n_prompts, c.path), "calibration")
        uri, ranks = self.tracker.uri, f" x {dist.size()} ranks" if dist.size() > 1 else ""
        _say(
            f"{self.suite.name}: {len(cells)} cells, {len(self.outcome.skipped)} already finished, "
            f"{len(pending)} to run on {self.device}{ranks} (tracking: {uri})"
        )
        with SuiteBar([len(self.prompt_set(c)) for c in pending]) as bar:
            self.suite_bar = bar
            for group in _by_model(pending):
                self.run_model(group, bar)
            self.retry_busy(bar)
        self._pipelines.clear()  # also those loaded only for their shapes
        o = self.outcome
        _say(
            f"{self.suite.name}: {len(o.finished)} finished, {len(o.skipped)} skipped, {len(o.failed)} failed"
            + (f", {len(o.elsewhere)} run elsewhere" if o.elsewhere else "")
            + (f", {len(o.rescored)} scored from their images" if o.rescored else "")
        )
        return 1 if o.failed else 0

    def retry_busy(self, bar: Any) -> None:
        """The busy cells once more, after all others: those whose holder failed or died run here,
        the others (finished or still live elsewhere) are counted as run elsewhere, not waited for."""
        from ptqbench.tracking import lease_fresh

        again, self.busy = self.busy, []
        self.last_pass = True
        bar.add([len(self.prompt_set(c)) for c in again])
        rest = []
        for cell in again:
            runs = self.tracker.find(self.experiment, cell.hash)
            if any(r.status == "FINISHED" or lease_fresh(r) for r in runs):
                self.outcome.elsewhere.append(cell.hash)
                bar.update(1)
            else:
                rest.append(cell)
        for group in _by_model(rest):
            self.run_model(group, bar)

    def claim(self, cell: Cell) -> str | None:
        """A new run of ``cell`` held by this process, or None: finished or busy elsewhere (noted)."""
        claim = self.tracker.claim(self.experiment, cell.hash, cell.label, self.tags(cell))
        if claim.state == "won":
            return claim.run_id
        if claim.state == "busy" and not self.last_pass:
            self.busy.append(cell)
        else:
            self.outcome.elsewhere.append(cell.hash)
        return None

    def rescore(self, finished: Sequence[tuple[Cell, Any]]) -> None:
        """Score the suite's metrics that finished runs lack, from their saved images (no generation)."""
        from ptqbench.scoring import score_run

        for cell, run in finished:
            have = schema.metric_names(run.metrics, run.tags)
            missing = [m for m in cell.metrics if m not in have]
            if not missing:
                continue
            try:
                score_run(self.tracker, run, missing, self.device, self.suite.metric_options, self.suite.uncertainty)
            except UserError as exc:  # e.g. its images were deleted: say so, the suite goes on
                print(f"cannot score {', '.join(missing)} for {cell.label}: {exc}", file=sys.stderr)
                continue
            self.outcome.rescored.append(cell.hash)
            print(f"scored {', '.join(missing)} into finished cell {cell.label}", file=sys.stderr)

    def run_model(self, cells: Sequence[Cell], bar: Any) -> None:
        """Load the cells' model once and run them; a load crash fails each of them."""
        entry = cells[0].model
        try:
            pipeline = self.load(entry)
        except UserError:
            raise
        except Exception as exc:
            if not dist.raised_on_every_rank(exc):  # the others may be in the cells' collectives by now
                dist.abandon(f"loading {entry} failed: {_error_text(exc)}", traceback.format_exc())
            for cell in cells:
                self.record_failure(cell, exc, traceback.format_exc(), stage="load")
                bar.update(1)
            return
        try:
            for cell in cells:
                bar.set_postfix_str(cell.label[:60])
                self.run_cell(cell, pipeline)
                bar.update(1)
        finally:
            del pipeline
            self.release(entry)

    def load(self, entry: Any) -> Any:
        """The entry's pipeline on the run's device, loaded once and kept until :meth:`release`."""
        from ptqbench.models.base import get_model

        key = _model_key(entry)
        if key not in self._pipelines:
            self._pipelines[key] = get_model(entry.name).load(self.device, entry.path, entry.dtype)
        return self._pipelines[key]

    def release(self, entry: Any) -> None:
        self._pipelines.pop(_model_key(entry), None)
        gc.collect()
        _empty_cuda_cache()

    def prompt_set(self, cell: Cell) -> Any:
        return self._load_prompts((cell.prompts.set, cell.prompts.n, cell.prompts.path), "prompts")

    def _load_prompts(self, key: tuple[str, int | None, str | None], section: str) -> Any:
        from ptqbench.prompts import get_prompt_set

        if key not in self._prompts:
            try:
                self._prompts[key] = get_prompt_set(*key)
            except UserError as exc:
                raise UserError(f"{self.suite.file}: {section}: {exc}") from None
        return self._prompts[key]

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell, pipeline: Any) -> bool:
        from ptqbench.quantcache import FOLDER

        run_id = self.claim(cell)
        if run_id is None:  # finished or busy elsewhere
            return True
        start = time.perf_counter()
        progress = TqdmProgress(suite=self.suite_bar, counted="reference" if cell.is_reference else "generate")
        try:
            self.tracker.log_params(run_id, self.params(cell))
            out_dir = self.out / cell.hash  # kept from a killed attempt: its images and layers are reused
            out_dir.mkdir(parents=True, exist_ok=True)
            result = self.evaluate(cell, pipeline, out_dir, progress)
            progress.close()
            dist.on_main(self.log_result, run_id, cell, result, out_dir, time.perf_counter() - start)
            self.tracker.finish(run_id)
            shutil.rmtree(out_dir / FOLDER, ignore_errors=True)  # the images are what a finished cell keeps
        except KeyboardInterrupt:
            progress.close()
            self.tracker.fail(run_id, "KeyboardInterrupt: interrupted", traceback.format_exc())
            raise
        except Exception as exc:
            progress.close()
            if not dist.raised_on_every_rank(exc):  # the others may wait in this cell's collectives
                dist.abandon(f"cell failed: {cell.label}: {_error_text(exc)}", traceback.format_exc())
            self.tracker.fail(run_id, _error_text(exc), traceback.format_exc())
            self.outcome.failed.append(cell.hash)
            print(f"cell failed: {cell.label}: {_error_text(exc)}", file=sys.stderr)
            return False
        self.outcome.finished.append(cell.hash)
        return True

    def record_failure(self, cell: Cell, exc: BaseException, tb: str, stage: str) -> None:
        run_id = self.claim(cell)
        if run_id is None:
            return
        self.tracker.log_params(run_id, self.params(cell))
        self.tracker.fail(run_id, f"{stage}: {_error_text(exc)}", tb)
        self.outcome.failed.append(cell.hash)
        print(f"cell failed: {cell.label}: {stage}: {_error_text(exc)}", file=sys.stderr)

    def evaluate(self, cell: Cell, pipeline: Any, out_dir: Path, progress: TqdmProgress) -> Any:
        from ptqbench.evaluate import evaluate

        return evaluate(
            pipeline,
            cell.method,
            self.prompt_set(cell),
            metrics=cell.metrics,
            settings=cell.model.settings,
            calibration=cell.calibration,
            cache=self.cache,
            out_dir=out_dir,
            plan=cell.plan,
            ranks=dict(cell.ranks) if cell.ranks else None,
            progress=progress,
            real_dir=Path(cell.prompts.real) if cell.prompts.real else None,
            bootstrap=self.suite.uncertainty,
            metric_options=self.suite.metric_options,
        )

    # ------------------------------------------------------------------ what is logged
    def tags(self, cell: Cell) -> dict[str, str]:
        from ptqbench.metrics.base import get_metric

        tags = {
            schema.HASH: cell.hash,
            schema.SUITE: cell.suite,
            schema.SUITE_FILE: self.suite.file,
            schema.MODEL: cell.model.name,
            schema.METHOD: cell.method_name,
            schema.PROMPT_SET: cell.prompts.set,
            schema.IS_REFERENCE: str(cell.is_reference).lower(),
            schema.LABEL: cell.label,
            schema.FORMATS: formats_text(cell.method),
            schema.RANK: rank_text(cell.rank, cell.ranks),
        }
        if cell.replicate_group:
            tags[schema.REPLICATE] = str(cell.replicate)
            tags[schema.REPLICATE_GROUP] = cell.replicate_group
        for name in cell.metrics:
            tags[schema.METRIC_DIRECTION + name] = schema.direction(get_metric(name).higher_is_better)
        return tags

    def params(self, cell: Cell) -> dict[str, Any]:
        import torch

        runtime = {schema.DEVICE: self.device, schema.THREADS: torch.get_num_threads(), schema.HASH: cell.hash}
        return {**cell.params(), **self._runtime, **runtime}

    def log_result(self, run_id: str, cell: Cell, result: Any, out_dir: Path, seconds: float) -> None:
        from ptqbench.scoring import image_tags, score_tags

        metrics, tags = schema.result_metrics(result, seconds)
        self.tracker.log_metrics(run_id, metrics)
        where = image_tags(result.images_dir, result.reference_dir,
                           Path(cell.prompts.real) if cell.prompts.real else None)
        self.tracker.set_tags(run_id, {**tags, **where, **score_tags(result.metrics, where, self.suite.metric_options)})
        options = schema.metric_options_params(self.suite.metric_options)
        self.tracker.log_params(run_id, {**schema.interval_params(self.suite.uncertainty), **options})
        folder = write_artifacts(cell, result, out_dir / "artifacts", self.params(cell))
        write_scores(folder, self.prompt_set(cell), result)
        self.tracker.log_artifacts(run_id, folder)


# ============================================================================ helpers


def _model_key(entry: Any) -> tuple[Any, ...]:
    return (entry.name, entry.path, entry.dtype)


def _by_model(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells grouped by model (name, path, dtype), in first-appearance order."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_model_key(cell.model), []).append(cell)
    return list(groups.values())


def _say(text: str) -> None:
    """A line on stderr, from rank 0 only."""
    if dist.is_main():
        print(text, file=sys.stderr)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def git_commit() -> str:
    """The commit of the ptqbench checkout (``+dirty`` with local changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def runtime_params() -> dict[str, Any]:
    """Package versions and the git commit (logged with every cell, not part of its hash)."""
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {schema.VERSIONS: versions, schema.GIT_COMMIT: git_commit()}
