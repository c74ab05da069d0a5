"""What a finished cell leaves as MLflow artifacts: its resolved configuration, its per-image
scores, per-layer errors, what was patched, a few sample images and a captioned grid of them
(names in :mod:`ptqbench.schema`)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptqbench import schema
from ptqbench.errors import UserError
from ptqbench.generation import INDEX

if TYPE_CHECKING:
    from ptqbench.evaluate import EvalResult
    from ptqbench.metrics.base import MetricResult
    from ptqbench.prompts import PromptSet
    from ptqbench.suite import Cell

SAMPLES = 8  # images logged per cell (the same prompts and seeds in every cell of a model)
GRID_COLUMNS = 4
RUNTIME_PARAMS = (schema.VERSIONS, schema.GIT_COMMIT, schema.DEVICE, schema.THREADS)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_artifacts(cell: Cell, result: EvalResult, folder: Path, params: Mapping[str, Any]) -> Path:
    """config.yaml, layer_errors.csv, patch_report.json, grid.png and samples/ in ``folder``."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "cell_hash": cell.hash, "label": cell.label, "suite": cell.suite, "origin": cell.origin,
        "config": _jsonable(cell.config),
        "runtime": _jsonable({k: params[k] for k in RUNTIME_PARAMS if k in params}),
    }
    (folder / schema.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if result.layer_errors is not None:
        result.layer_errors.to_csv(folder / schema.LAYER_ERRORS_FILE, index=False)
    report = {"quantized": list(result.quantized), "skipped": dict(result.skipped)}
    (folder / schema.PATCH_REPORT_FILE).write_text(json.dumps(report, indent=1), encoding="utf-8")
    samples = folder / schema.SAMPLES_DIR
    entries = _samples(Path(result.images_dir), samples)
    if entries:
        sample_grid([samples / e["file"] for e in entries], [e["prompt"] for e in entries]).save(
            folder / schema.GRID_FILE
        )
    return folder


def write_scores(folder: Path, prompts: PromptSet, result: EvalResult) -> Path:
    """``per_image.csv`` in ``folder``: one row per image (prompt key, seed), a column per per-image metric."""
    from ptqbench.metrics.base import write_per_image

    return write_per_image(folder / schema.PER_IMAGE_FILE, prompts.keys, prompts.seeds(), result.metrics)


def merge_scores(
    folder: Path, existing: Path | None, keys: Sequence[str], seeds: Sequence[int],
    results: Mapping[str, MetricResult],
) -> Path | None:
    """``per_image.csv`` in ``folder``: the run's ``existing`` table (its rows and cells kept as they
    are, text for text) with the per-image values of ``results`` (in ``keys`` order) added as
    columns, or replacing a column of the same metric, matched by prompt key; a new table when the
    run has none. None when ``results`` hold no per-image values (nothing to write)."""
    import pandas as pd

    from ptqbench.metrics.base import per_image_frame, write_per_image_frame

    new = per_image_frame(keys, seeds, results)
    if len(new.columns) == 2:  # no per-image values (set metrics, not computed): the table stays as it is
        return None
    if existing is None:
        return write_per_image_frame(folder / schema.PER_IMAGE_FILE, new)
    old = pd.read_csv(existing, dtype=str, keep_default_na=False)
    if list(old.columns[:2]) != ["key", "seed"] or old["key"].duplicated().any():
        raise UserError(f"{existing}: not a per-image table (key, seed, a column per metric); cannot add scores")
    by_key = new.set_index("key")
    mismatch = set(old["key"]) ^ set(by_key.index)
    if mismatch or [str(s) for s in by_key.loc[old["key"], "seed"]] != list(old["seed"]):
        which = sorted(mismatch)[:3] or "seeds"
        raise UserError(f"{existing}: its images are not the scored images ({which} differ); run the cell again")
    merged = old.copy()
    for name in new.columns[2:]:
        merged[name] = by_key.loc[old["key"], name].to_numpy()
    return write_per_image_frame(folder / schema.PER_IMAGE_FILE, merged[["key", "seed", *sorted(merged.columns[2:])]])


def _samples(images_dir: Path, target: Path) -> list[dict[str, Any]]:
    """The first SAMPLES images as samples/NNN.png with samples/index.json."""
    index_file = images_dir / INDEX
    if not index_file.is_file():
        return []
    entries = sorted(json.loads(index_file.read_text(encoding="utf-8")), key=lambda e: e["index"])[:SAMPLES]
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for i, e in enumerate(entries):
        name = f"{i:03d}.png"
        shutil.copyfile(images_dir / e["file"], target / name)
        out.append({"index": e["index"], "prompt": e["prompt"], "seed": e["seed"], "file": name})
    (target / INDEX).write_text(json.dumps(out, indent=1), encoding="utf-8")
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
