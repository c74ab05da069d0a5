"""``ptqbench run SUITE``: expand a suite into cells and run each one into MLflow.

Each cell is found again by its ``cell_hash`` tag: a finished cell is skipped, a failed or killed
one runs again (its stale run deleted), so a suite can be interrupted and resumed at any point
and never holds two runs of one cell. Each model is loaded once and serves all its cells
(``evaluate`` restores the transformer). A crash inside a cell is recorded (FAILED, error tag,
``traceback.txt``) and the suite goes on; the exit code is 1 if any cell failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ptqbench.errors import UserError
from ptqbench.suite import (
    Cell,
    ShapeCache,
    Suite,
    dry_run_lines,
    expand,
    formats_text,
    load_suite,
    rank_text,
    select,
)

SAMPLES = 8  # images logged per cell (the same prompts and seeds in every cell of a model)
GRID_COLUMNS = 4
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


def resolve_device(name: str | None) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (valid: cpu)")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


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

    device = resolve_device(args.device)
    set_threads(args.threads)
    cache = Cache(args.cache_dir)
    out = Path(args.out) if args.out else cache.root / "runs" / _safe(suite.name)
    runner = Runner(suite, Tracker(args.tracking_uri), cache, out, device)
    # models without a shipped config are loaded once, for their shapes and their cells
    cells = _select(suite, expand(suite, ShapeCache(lambda entry: runner.load(entry).transformer)), args.only, shard)
    return runner.run(cells)


def set_threads(n: int | None) -> None:
    import torch

    if n is None:
        return
    if n < 1:
        raise UserError(f"--threads {n}: must be >= 1")
    torch.set_num_threads(n)


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
    """The evaluate() progress protocol on a second tqdm bar: ``stage(name, total)``, ``advance(n)``."""

    def __init__(self, position: int = 1):
        self.position = position
        self.bar: Any = None

    def stage(self, name: str, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=f"  {name}", position=self.position, leave=False, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ============================================================================ the runner


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Runner:
    """Runs cells into one MLflow experiment (the suite's name)."""

    def __init__(self, suite: Suite, tracker: Any, cache: Any, out: Path, device: str):
        self.suite = suite
        self.tracker = tracker
        self.cache = cache
        self.out = Path(out)
        self.device = device
        self.experiment = tracker.experiment(
            suite.name, {"suite_file": suite.file, "mlflow.note.content": suite.description or suite.name}
        )
        self.outcome = Outcome()
        self._prompts: dict[Any, Any] = {}
        self._pipelines: dict[tuple[Any, ...], Any] = {}
        self._runtime = runtime_params()

    # ------------------------------------------------------------------ suite level
    def run(self, cells: Sequence[Cell]) -> int:
        from tqdm.auto import tqdm

        done = {r.tags.get("cell_hash") for r in self.tracker.runs(self.experiment) if r.status == "FINISHED"}
        pending = [c for c in cells if c.hash not in done]
        self.outcome.skipped = [c.hash for c in cells if c.hash in done]
        for cell in pending:  # missing prompt data fails here, before any cell runs
            self.prompt_set(cell)
            if "calibration" in cell.config:
                c = cell.calibration
                self._load_prompts((c.set, c.n, c.path), "calibration")
        print(
            f"{self.suite.name}: {len(cells)} cells, {len(self.outcome.skipped)} already finished, "
            f"{len(pending)} to run on {self.device} (tracking: {self.tracker.uri})",
            file=sys.stderr,
        )
        with tqdm(total=len(pending), desc="cells", position=0, dynamic_ncols=True) as bar:
            for group in _by_model(pending):
                self.run_model(group, bar)
        self._pipelines.clear()  # also those loaded only for their shapes
        o = self.outcome
        print(
            f"{self.suite.name}: {len(o.finished)} finished, {len(o.skipped)} skipped, {len(o.failed)} failed",
            file=sys.stderr,
        )
        return 1 if o.failed else 0

    def run_model(self, cells: Sequence[Cell], bar: Any) -> None:
        """Load the cells' model once and run them; a load crash fails each of them."""
        entry = cells[0].model
        try:
            pipeline = self.load(entry)
        except UserError:
            raise
        except Exception as exc:
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
        if self.tracker.claim(self.experiment, cell.hash) is not None:  # finished meanwhile
            self.outcome.skipped.append(cell.hash)
            return True
        run_id = self.tracker.start(self.experiment, cell.label, self.tags(cell))
        start = time.perf_counter()
        progress = TqdmProgress()
        try:
            self.tracker.log_params(run_id, self.params(cell))
            out_dir = self.out / cell.hash
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            result = self.evaluate(cell, pipeline, out_dir, progress)
            progress.close()
            self.log_result(run_id, cell, result, out_dir, time.perf_counter() - start)
            self.tracker.finish(run_id)
        except KeyboardInterrupt:
            progress.close()
            self.tracker.fail(run_id, "KeyboardInterrupt: interrupted", traceback.format_exc())
            raise
        except Exception as exc:
            progress.close()
            self.tracker.fail(run_id, _error_text(exc), traceback.format_exc())
            self.outcome.failed.append(cell.hash)
            print(f"cell failed: {cell.label}: {_error_text(exc)}", file=sys.stderr)
            return False
        self.outcome.finished.append(cell.hash)
        return True

    def record_failure(self, cell: Cell, exc: BaseException, tb: str, stage: str) -> None:
        self.tracker.claim(self.experiment, cell.hash)
        run_id = self.tracker.start(self.experiment, cell.label, self.tags(cell))
        self.tracker.log_params(run_id, self.params(cell))
        self.tracker.fail(run_id, f"{stage}: {_error_text(exc)}", tb)
        self.outcome.failed.append(cell.hash)
        print(f"cell failed: {cell.label}: {stage}: {_error_text(exc)}", file=sys.stderr)

    def evaluate(self, cell: Cell, pipeline: Any, out_dir: Path, progress: TqdmProgress) -> Any:
        from ptqbench.calibration import CalibConfig
        from ptqbench.evaluate import evaluate
        from ptqbench.patching import LayerPlan

        calib = cell.calibration
        plan = LayerPlan.for_model(pipeline.transformer, cell.layers.include, cell.layers.exclude)
        return evaluate(
            pipeline,
            cell.method,
            self.prompt_set(cell),
            metrics=cell.metrics,
            settings=cell.model.settings,
            calibration=CalibConfig(
                prompt_set=calib.set, n_prompts=calib.n, steps=calib.steps, guidance=calib.guidance,
                resolution=calib.resolution, seed=calib.seed, rows=calib.rows, path=calib.path,
            ),
            cache=self.cache,
            out_dir=out_dir,
            plan=plan,
            ranks=dict(cell.ranks) if cell.ranks else None,
            progress=progress,
            real_dir=Path(cell.prompts.real) if cell.prompts.real else None,
        )

    # ------------------------------------------------------------------ what is logged
    def tags(self, cell: Cell) -> dict[str, str]:
        from ptqbench.metrics.base import get_metric

        tags = {
            "cell_hash": cell.hash,
            "suite": self.suite.name,
            "suite_file": self.suite.file,
            "model": cell.model.name,
            "method": cell.method_name,
            "prompt_set": cell.prompts.set,
            "is_reference": str(cell.is_reference).lower(),
            "label": cell.label,
            "formats": formats_text(cell.method),
            "rank": rank_text(cell),
        }
        for name in cell.metrics:
            tags[f"metric_direction.{name}"] = "higher" if get_metric(name).higher_is_better else "lower"
        return tags

    def params(self, cell: Cell) -> dict[str, Any]:
        import torch

        runtime = {"device": self.device, "threads": torch.get_num_threads(), "cell_hash": cell.hash}
        return {**cell.params(), **self._runtime, **runtime}

    def log_result(self, run_id: str, cell: Cell, result: Any, out_dir: Path, seconds: float) -> None:
        from ptqbench.analysis import layer_error_summary

        metrics: dict[str, float | None] = {}
        tags: dict[str, str] = {}
        for name, m in result.metrics.items():
            if m.status == "ok" and m.value is not None:
                metrics[name] = m.value
                metrics[f"{name}_n"] = m.n
            else:
                tags[f"metric_status.{name}"] = f"not_computed: {m.reason}"
        metrics.update(bits_per_weight=result.bits_per_weight, model_bytes=result.model_bytes)
        metrics.update(layer_error_summary(result.layer_errors))
        for stage, value in result.timings.items():
            metrics[f"seconds_{stage}"] = value
        metrics.setdefault("seconds_total", seconds)
        self.tracker.log_metrics(run_id, metrics)
        if tags:
            self.tracker.set_tags(run_id, tags)
        self.tracker.log_artifacts(run_id, write_artifacts(cell, result, out_dir / "artifacts", self.params(cell)))


# ============================================================================ helpers


def _model_key(entry: Any) -> tuple[Any, ...]:
    return (entry.name, entry.path, entry.dtype)


def _by_model(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells grouped by model (name, path, dtype), in first-appearance order."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_model_key(cell.model), []).append(cell)
    return list(groups.values())


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
    return {"versions": versions, "git_commit": git_commit()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_artifacts(cell: Cell, result: Any, folder: Path, params: Mapping[str, Any]) -> Path:
    """config.yaml, layer_errors.csv, patch_report.json, grid.png and samples/ in ``folder``."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "cell_hash": cell.hash, "label": cell.label, "suite": cell.suite, "origin": cell.origin,
        "config": _jsonable(cell.config),
        "runtime": _jsonable({k: params[k] for k in ("versions", "git_commit", "device", "threads") if k in params}),
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if result.layer_errors is not None:
        result.layer_errors.to_csv(folder / "layer_errors.csv", index=False)
    report = {"quantized": list(result.quantized), "skipped": dict(result.skipped)}
    (folder / "patch_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    entries = _samples(Path(result.images_dir), folder / "samples")
    if entries:
        sample_grid([folder / "samples" / e["file"] for e in entries], [e["prompt"] for e in entries]).save(
            folder / "grid.png"
        )
    return folder


def _samples(images_dir: Path, target: Path) -> list[dict[str, Any]]:
    """The first SAMPLES images as samples/NNN.png with samples/index.json."""
    index_file = images_dir / "index.json"
    if not index_file.is_file():
        return []
    entries = sorted(json.loads(index_file.read_text(encoding="utf-8")), key=lambda e: e["index"])[:SAMPLES]
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for i, e in enumerate(entries):
        name = f"{i:03d}.png"
        shutil.copyfile(images_dir / e["file"], target / name)
        out.append({"index": e["index"], "prompt": e["prompt"], "seed": e["seed"], "file": name})
    (target / "index.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def sample_grid(files: Sequence[Path], captions: Sequence[str], columns: int = GRID_COLUMNS, tile: int = 256) -> Any:
    """A grid of images, each scaled to ``tile`` pixels wide with its prompt underneath."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines_per_caption, line_h = 3, 12
    cap_h = lines_per_caption * line_h + 6
    images = [Image.open(f).convert("RGB") for f in files]
    tiles = []
    for img in images:
        h = max(1, round(img.height * tile / img.width))
        tiles.append(img.resize((tile, h), Image.NEAREST if img.width < tile else Image.BICUBIC))
    rows = math.ceil(len(tiles) / columns)
    cell_h = max(t.height for t in tiles) + cap_h
    grid = Image.new("RGB", (columns * tile, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, tile // 6)
    for i, (t, caption) in enumerate(zip(tiles, captions, strict=True)):
        x, y = (i % columns) * tile, (i // columns) * cell_h
        grid.paste(t, (x, y))
        wrapped = textwrap.wrap(caption, chars)[:lines_per_caption]
        for j, line in enumerate(wrapped):
            draw.text((x + 3, y + t.height + 3 + j * line_h), line, fill="black", font=font)
    return grid
