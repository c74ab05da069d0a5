"""Plots of a group of runs, as PNG and PDF (matplotlib Figure objects on Agg, seaborn styling).

- metric vs rank per method and branch format (when a series has several ranks);
- bits per weight vs metric with the Pareto front (the equal-memory picture);
- per-layer relative weight (and output) error per run, from the ``layer_errors.csv`` artifacts;
- an image grid: rows = the 16-bit reference and each run, columns = the same sample prompts;
- LoRaQ's loss curves (relative objective vs Adam step), from the ``loss_curve`` each layer logs
  in its ``info`` (the ``info`` column of ``layer_errors.csv``), or from a convergence study.
A plot whose data is absent is skipped with a note. Output is deterministic (no timestamps).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ptqbench.report.load import Artifacts
from ptqbench.report.tables import METHOD_ORDER, Group, MetricInfo, branch_text, metric_value

SAMPLE_COLUMNS = 8
THUMBNAIL = 192
DPI = 110
PDF_METADATA = {"CreationDate": None, "ModDate": None}
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = "osD^vP*Xph<>"


@dataclass(frozen=True)
class Plot:
    """One written plot: its files and a caption."""

    name: str
    title: str
    caption: str
    png: Path
    pdf: Path


def _style() -> Any:
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.8)}
    rc.update({"pdf.fonttype": 42, "axes.titleweight": "bold"})  # TrueType in PDFs (no Type 3 fonts)
    return mpl.rc_context(rc)


def _save(fig: Figure, out_dir: Path, name: str, title: str, caption: str) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, dpi=DPI)
    fig.savefig(pdf, metadata=PDF_METADATA)
    return Plot(name, title, caption, png, pdf)


def _grid(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    cols = n if n <= 3 else (2 if n == 4 else 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """One color per method, the same in every plot of a report (rtn, smoothquant, svdquant, loraq first)."""
    names = (set(methods) | set(METHOD_ORDER)) - {"none"}
    ordered = sorted(names, key=lambda m: (METHOD_ORDER.get(m, 99), m))
    colors = sns.color_palette("tab10" if len(ordered) <= 10 else "husl", len(ordered))
    return dict(zip(ordered, colors, strict=True))


def series_label(row: dict[str, Any]) -> str:
    text = f"{row['method']} W:{row['weight_format']} A:{row['act_format']} B:{branch_text(row)}"
    return text + (f" ({row['variant']})" if row.get("variant") else "")


def _reference_line(ax: Any, group: Group, metric: MetricInfo) -> None:
    """The 16-bit reference's value as a dotted line (not for metrics that compare with it)."""
    ref = group.reference
    value = None if ref is None or metric.paired else metric_value(ref, metric.name)
    if value is not None and math.isfinite(value):
        ax.axhline(value, ls=":", color="0.35", lw=1.2, label="16-bit reference")


def _with_metric(rows: list[dict[str, Any]], metrics: list[MetricInfo]) -> list[MetricInfo]:
    def has(m: MetricInfo) -> bool:
        return sum(1 for r in rows if (v := metric_value(r, m.name)) is not None and math.isfinite(v)) >= 2

    return [m for m in metrics if has(m)]


def _legend(fig: Figure, axes: list[Any]) -> None:
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=min(3, len(entries)),
                   fontsize="small", frameon=False)


# ----------------------------------------------------------------------------- metric vs rank


def rank_plot(group: Group, out_dir: Path, notes: list[str]) -> Plot | None:
    series: dict[str, list[dict[str, Any]]] = {}
    for r in group.finished(quantized_only=True):
        if r["rank"] > 0:
            series.setdefault(series_label(r), []).append(r)
    series = {k: v for k, v in series.items() if len({r["rank"] for r in v}) >= 2}
    if not series:
        notes.append(f"{group.title}: rank plot skipped (no method and branch format was run at several ranks)")
        return None
    rows = [r for v in series.values() for r in v]
    metrics = _with_metric(rows, group.metrics)
    if not metrics:
        notes.append(f"{group.title}: rank plot skipped (no metric has values at several ranks)")
        return None
    ranks = sorted({r["rank"] for r in rows})
    colors = method_colors([r["method"] for r in rows])
    styles = {}
    for label in sorted(series, key=lambda k: (METHOD_ORDER.get(series[k][0]["method"], 99), k)):
        method = series[label][0]["method"]
        styles[label] = (colors[method], LINESTYLES[sum(1 for s in styles if series[s][0]["method"] == method) % 4])
    with _style():
        fig, axes = _grid(len(metrics), 4.2, 3.3)
        for ax, info in zip(axes, metrics, strict=True):
            for label, (color, style) in styles.items():
                pts = sorted((r["rank"], metric_value(r, info.name)) for r in series[label])
                pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", ms=4, lw=1.4, color=color, ls=style, label=label)
            _reference_line(ax, group, info)
            if ranks[-1] / ranks[0] >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.minorticks_off()
            ax.set_xlabel("rank")
            ax.set_title(info.header)
        _legend(fig, axes)
        fig.suptitle(f"metric vs rank · {group.title}", fontsize="medium")
        caption = (
            "Each line is one method with its main and branch formats; the dotted line is the 16-bit "
            "reference (for metrics not measured against it)."
        )
        return _save(fig, out_dir, f"{group.slug}--rank", "Metric vs rank", caption)


# ----------------------------------------------------------------------------- bits vs metric


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats at equal or fewer bits, sorted by bits."""
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front: list[int] = []
    best = None
    for i in order:
        y = points[i][1]
        if best is None or (y > best if higher_is_better else y < best):
            front.append(i)
            best = y
    return front


def pareto_plot(group: Group, out_dir: Path, notes: list[str]) -> Plot | None:
    rows = [r for r in group.finished(quantized_only=True) if math.isfinite(r["bits_per_weight"])]
    metrics = _with_metric(rows, group.metrics)
    if not metrics:
        notes.append(f"{group.title}: bits-vs-metric plot skipped (fewer than two finished quantized runs with values)")
        return None
    colors = method_colors([r["method"] for r in rows])
    weight_formats = sorted({r["weight_format"] for r in rows})
    markers = {w: MARKERS[i % len(MARKERS)] for i, w in enumerate(weight_formats)}
    with _style():
        fig, axes = _grid(len(metrics), 4.2, 3.3)
        for ax, info in zip(axes, metrics, strict=True):
            pts = [(r, metric_value(r, info.name)) for r in rows]
            pts = [(r, v) for r, v in pts if v is not None and math.isfinite(v)]
            for r, v in pts:
                ax.scatter(r["bits_per_weight"], v, color=colors[r["method"]], marker=markers[r["weight_format"]],
                           s=28, zorder=3, label=f"{r['method']} W:{r['weight_format']}")
                if r["rank"] > 0:
                    ax.annotate(f"r{r['rank_text']}", (r["bits_per_weight"], v), textcoords="offset points",
                                xytext=(4, 3), fontsize=6, color="0.3")
            if info.higher_is_better is None:
                notes.append(f"{group.title}: no direction for metric {info.name}; Pareto front not drawn")
            else:
                xy = [(r["bits_per_weight"], v) for r, v in pts]
                front = [xy[i] for i in pareto_front(xy, info.higher_is_better)]
                ax.plot(*zip(*front, strict=True), drawstyle="steps-post", color="black", lw=1, ls="--", zorder=2,
                        label="Pareto front")
            _reference_line(ax, group, info)
            ax.set_xlabel("bits per weight")
            ax.set_title(info.header)
        _legend(fig, axes)
        fig.suptitle(f"bits per weight vs metric · {group.title}", fontsize="medium")
        return _save(fig, out_dir, f"{group.slug}--pareto", "Bits per weight vs metric",
                     "Equal-memory picture: each point is a finished run (labels give the rank); "
                     "the dashed step line is the Pareto front, the dotted line the 16-bit reference "
                     "(for metrics not measured against it).")


# ----------------------------------------------------------------------------- per-layer errors


def layer_error_plot(group: Group, artifacts: Artifacts, out_dir: Path, notes: list[str]) -> Plot | None:
    frames, missing = [], []
    for r in group.finished(quantized_only=True):
        path = artifacts.get(r["run_id"], "layer_errors.csv")
        if path is None:
            missing.append(r["row_label"])
            continue
        try:
            df = pd.read_csv(path)
        except (ValueError, OSError) as exc:
            notes.append(f"{group.title}: layer_errors.csv of {r['row_label']} unreadable ({exc})")
            continue
        if "rel_weight_error" not in df.columns or df.empty:
            notes.append(f"{group.title}: layer_errors.csv of {r['row_label']} has no rel_weight_error rows")
            continue
        frames.append(df.assign(row=r["row_label"], method=r["method"]))
    if missing:
        notes.append(f"{group.title}: no layer_errors.csv artifact for {', '.join(missing)}")
    if not frames:
        notes.append(f"{group.title}: per-layer error plot skipped (no layer_errors.csv artifacts)")
        return None
    data = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(data["row"]))
    columns = [c for c in ("rel_weight_error", "rel_output_error") if c in data and data[c].notna().any()]
    colors = method_colors(list(data["method"]))
    with _style():
        fig = Figure(figsize=(5.0 * len(columns) + 2.5, 0.32 * len(order) + 1.4), layout="constrained")
        axes = fig.subplots(1, len(columns), squeeze=False, sharey=True).ravel().tolist()
        for ax, col in zip(axes, columns, strict=True):
            part = data[data[col].notna()]
            positive = bool((part[col] > 0).all())
            sns.boxplot(data=part, x=col, y="row", hue="method", order=order, palette=colors, orient="h",
                        log_scale=positive, dodge=False, fliersize=2, linewidth=0.8, legend=False, ax=ax)
            ax.set_xlabel(col.replace("_", " ") + (" (log)" if positive else ""))
            ax.set_ylabel("")
        fig.suptitle(f"per-layer error · {group.title}", fontsize="medium")
        return _save(fig, out_dir, f"{group.slug}--layer-errors", "Per-layer error",
                     "Distribution over the quantized layers of ||W - W_eff|| / ||W|| "
                     "(and of the output error where logged), one box per run.")


# ----------------------------------------------------------------------------- image grid


def _sample_file(entry: dict[str, Any]) -> str:
    name = str(entry.get("file", ""))
    return name if name.startswith("samples/") else f"samples/{Path(name).name}"


def _thumbnail(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = THUMBNAIL / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def _wrap(text: str, width: int, lines: int) -> str:
    parts = textwrap.wrap(text, width) or [""]
    if len(parts) > lines:
        parts = [*parts[: lines - 1], parts[lines - 1][: width - 1] + "…"]
    return "\n".join(parts)


def _mosaic(tiles: list[list[np.ndarray | None]]) -> np.ndarray:
    """Tiles (None = missing, drawn light gray) pasted on a white canvas with a small gap."""
    size, gap = THUMBNAIL, 6
    rows, cols = len(tiles), len(tiles[0])
    canvas = np.full((rows * (size + gap) - gap, cols * (size + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y, x = i * (size + gap), j * (size + gap)
            if tile is None:
                canvas[y : y + size, x : x + size] = 225
                continue
            h, w = tile.shape[:2]
            oy, ox = (size - h) // 2, (size - w) // 2
            canvas[y + oy : y + oy + h, x + ox : x + ox + w] = tile
    return canvas


def image_grid(group: Group, artifacts: Artifacts, out_dir: Path, notes: list[str]) -> Plot | None:
    candidates = ([group.reference] if group.reference else []) + group.finished(quantized_only=True)
    indexed = []
    for r in candidates:
        index = artifacts.json(r["run_id"], "samples/index.json")
        if isinstance(index, list) and index:
            indexed.append((r, {(str(e.get("prompt")), str(e.get("seed"))): e for e in index if isinstance(e, dict)}))
        else:
            notes.append(f"{group.title}: {r['row_label']} has no samples/index.json; left out of the image grid")
    if len(indexed) < 2:
        notes.append(f"{group.title}: image grid skipped (fewer than two runs with sample images)")
        return None
    first = indexed[0][1]
    columns = sorted(first, key=lambda k: (int(first[k].get("index", 0)), k))[:SAMPLE_COLUMNS]
    tiles: list[list[np.ndarray | None]] = []
    for r, index in indexed:
        row: list[np.ndarray | None] = []
        for key in columns:
            path = artifacts.get(r["run_id"], _sample_file(index[key])) if key in index else None
            if path is None:
                notes.append(f"{group.title}: {r['row_label']} has no sample for prompt {key[0]!r} seed {key[1]}")
            row.append(None if path is None else _thumbnail(path))
        tiles.append(row)
    step = THUMBNAIL + 6
    with _style():
        fig = Figure(figsize=(1.45 * len(columns) + 2.6, 1.45 * len(indexed) + 1.0), layout="constrained")
        ax = fig.add_subplot()
        ax.imshow(_mosaic(tiles), interpolation="lanczos")
        ax.grid(False)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_xticks([j * step + THUMBNAIL / 2 for j in range(len(columns))],
                      [_wrap(k[0], 22, 3) for k in columns], fontsize=6.5)
        ax.xaxis.tick_top()
        ax.set_yticks([i * step + THUMBNAIL / 2 for i in range(len(indexed))],
                      [_wrap(r["row_label"], 26, 4) for r, _ in indexed], fontsize=7)
        ax.tick_params(length=0)
        fig.suptitle(f"samples · {group.title}", fontsize="medium")
        return _save(fig, out_dir, f"{group.slug}--samples", "Samples",
                     "Same prompts and seeds in every row: the 16-bit reference first, then each finished run.")


# ----------------------------------------------------------------------------- LoRaQ loss curves


def loss_curve_plot(curves: pd.DataFrame, out_dir: Path, name: str, title: str) -> Plot | None:
    """Relative objective vs step, one panel per ``panel``, one line per ``series`` (the mean over
    its ``layer``s), on log-log axes. ``curves``: columns panel, series, layer, step, rel."""
    if curves.empty:
        return None
    panels = list(dict.fromkeys(curves["panel"]))
    with _style():
        fig, axes = _grid(len(panels), 4.2, 3.2)
        for ax, panel in zip(axes, panels, strict=True):
            part = curves[curves["panel"] == panel]
            series = list(dict.fromkeys(part["series"]))
            palette = sns.color_palette("viridis", len(series))
            for color, label in zip(palette, series, strict=True):
                mean = part[part["series"] == label].groupby("step")["rel"].mean()
                ax.plot(mean.index + 1, mean.to_numpy(), color=color, linewidth=1.2, label=str(label))
                ax.plot(mean.index[-1] + 1, mean.iloc[-1], "o", color=color, markersize=3)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(str(panel), fontsize="small")
            ax.set_xlabel("Adam step + 1")
            ax.set_ylabel("relative objective")
            ax.legend(fontsize="x-small")
        fig.suptitle(f"LoRaQ loss curves · {title}", fontsize="medium")
        return _save(fig, out_dir, name, "LoRaQ loss curves",
                     "sqrt(objective / objective of a zero approximation) per Adam step, mean over the "
                     "layers of each line; a dot marks the last step run (early stop or the step cap).")


def run_loss_curves(group: Group, artifacts: Artifacts) -> pd.DataFrame:
    """Every logged LoRaQ ``loss_curve`` of the group's runs, from the ``info`` column of their
    ``layer_errors.csv`` (panel: main weight format; series: the run)."""
    rows: list[dict[str, Any]] = []
    for r in group.finished(quantized_only=True):
        path = artifacts.get(r["run_id"], "layer_errors.csv") if r["method"] == "loraq" else None
        if path is None:
            continue
        try:
            df = pd.read_csv(path)
        except (ValueError, OSError):
            continue  # layer_error_plot notes unreadable files
        for layer, text in zip(df["layer"], df.get("info", pd.Series(dtype=str)), strict=False):
            try:
                curve = json.loads(text).get("loss_curve") if isinstance(text, str) else None
            except ValueError:
                curve = None
            panel = r.get("weight_format", "")
            rows.extend({"panel": panel, "series": r["row_label"], "layer": layer, "step": int(k), "rel": float(v)}
                        for k, v in curve or [])
    return pd.DataFrame(rows, columns=["panel", "series", "layer", "step", "rel"])


def loraq_curve_plot(group: Group, artifacts: Artifacts, out_dir: Path, notes: list[str]) -> Plot | None:
    if not any(r["method"] == "loraq" for r in group.finished(quantized_only=True)):
        return None
    curves = run_loss_curves(group, artifacts)
    if curves.empty:
        notes.append(f"{group.title}: LoRaQ loss-curve plot skipped (no loss_curve in layer_errors.csv info)")
        return None
    return loss_curve_plot(curves, out_dir, f"{group.slug}--loraq-curves", group.title)


def group_plots(group: Group, artifacts: Artifacts, out_dir: Path, notes: list[str]) -> list[Plot]:
    """Every plot of one group that has data (skips are noted)."""
    made = [
        rank_plot(group, out_dir, notes),
        pareto_plot(group, out_dir, notes),
        layer_error_plot(group, artifacts, out_dir, notes),
        image_grid(group, artifacts, out_dir, notes),
        loraq_curve_plot(group, artifacts, out_dir, notes),
    ]
    return [p for p in made if p is not None]
