"""``ptqbench layers``: per-layer error study of quantization methods on a model's linear layers.

For each method config (``--method name:field=value,...`` or a YAML file) every selected layer
is quantized and measured: relative weight error, relative output error on sample inputs,
exact bits, seconds. ``--equal-memory REFERENCE`` gives every low-rank method the largest
rank whose exact bits fit the reference's (model-wide over the selected layers, or per layer).

Models: a transformers model directory (calibration and evaluation inputs come from forward
passes of real sentences, split into disjoint calibration and evaluation halves) or a
registered ptqbench model (its transformer; inputs are random Gaussian rows unless
``--inputs calib`` samples them from a short generation). Writes a CSV, prints a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch import nn

from ptqbench.analysis import layer_errors
from ptqbench.errors import UserError
from ptqbench.labels import describe
from ptqbench.layers import QuantLinear, dense_weight
from ptqbench.memory import solve_rank
from ptqbench.method import METHODS, LowRankMethod, Method, get_method
from ptqbench.patching import LayerPlan, Selection, select_layers
from ptqbench.stats import LayerStats, StatsSpec, collect_stats

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Diffusion transformers turn random noise into detailed images one denoising step at a time.",
    "Post-training quantization stores the weights of a network with fewer bits per value.",
    "Paris is the capital of France and has been a centre of art and science for centuries.",
    "She sold seashells by the seashore on a windy afternoon in late September.",
    "Matrix multiplications dominate the cost of running large neural networks.",
    "A low-rank branch can absorb the outliers that make four-bit weights inaccurate.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Astronomers observed a distant galaxy whose light left it ten billion years ago.",
    "He could not remember where he had parked the car after the long concert.",
    "Rain is expected across the northern valleys tomorrow, with snow on higher ground.",
    "The committee postponed its decision until the budget figures were confirmed.",
    "Honeybees communicate the direction of flowers through a waggle dance.",
    "Our train was delayed by forty minutes because of a signal failure at the junction.",
    "The museum's new exhibition traces the history of printing from woodblocks to lasers.",
    "Compilers translate source code into instructions that a processor can execute.",
)
PROMPTS = (
    "a red fox standing in fresh snow at sunrise",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "a lighthouse on a rocky coast during a storm, oil painting",
)
INPUTS = ("auto", "calib", "random")


# ----------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a transformers model directory (with config.json) or a registered model name")
    parser.add_argument(
        "--method", action="append", default=[], metavar="SPEC",
        help="method config name:field=value,... (repeatable), e.g. rtn:weight_format=mxfp4,act_format=mxfp4",
    )
    parser.add_argument(
        "--methods-file", type=Path, metavar="YAML",
        help="YAML list of method configs ({name: ..., label: ..., fields...}) or {methods: [...], equal_memory: ...}",
    )
    parser.add_argument(
        "--equal-memory", metavar="SPEC",
        help="reference method: each low-rank method gets the largest rank whose bits fit the reference's",
    )
    parser.add_argument("--per-layer-rank", action="store_true", help="solve equal-memory ranks per layer")
    parser.add_argument("--rank-multiple", type=int, default=1, help="solved ranks are multiples of this")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="layer name pattern to include")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="layer name pattern to skip")
    parser.add_argument("--max-layers", type=int, help="study only the first N selected layers")
    parser.add_argument(
        "--inputs", choices=INPUTS, default="auto",
        help="calib: real activations (text models: sentences; registered models: a short generation); "
        "random: Gaussian rows, methods get no statistics; auto: calib for text models, else random",
    )
    parser.add_argument("--rows", type=int, default=256, help="evaluation input rows per layer")
    parser.add_argument("--texts", type=Path, help="text file, one sentence a line (default: built-in sentences)")
    parser.add_argument("--model-path", help="local weights for a registered model")
    parser.add_argument("--calib-steps", type=int, default=2, help="sampling steps of the calibration generation")
    parser.add_argument("--resolution", type=int, help="resolution of the calibration generation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("layer_errors.csv"), help="CSV to write")


# ----------------------------------------------------------------------------- method specs


def _coerce(value: str) -> Any:
    text = value.strip()
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if text.startswith("["):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"bad list value {text!r}: {exc}") from None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(text: str, where: str = "--method") -> Method:
    """``name:field=value,field=value``; values may be format spec strings with their own
    options (``weight_format=int4_g64:scale_dtype=bf16``): items split only before a field name."""
    name, _, rest = text.partition(":")
    name = name.strip()
    cls = METHODS.get(name) if name else None
    if cls is None:
        raise UserError(f"{where} {text!r}: missing method name (registered: {', '.join(METHODS.names())})")
    field_names = [f.name for f in dataclasses.fields(cls)]
    pattern = r",\s*(?=(?:" + "|".join(map(re.escape, field_names)) + r")\s*=)"
    fields: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in re.split(pattern, rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"{where} {text!r}: expected field=value, got {item!r} (fields: {', '.join(field_names)})")
        fields[key.strip()] = _coerce(value)
    return _build(name, fields, f"{where} {text!r}")


def _build(name: str, fields: Mapping[str, Any], where: str) -> Method:
    try:
        return get_method(name, **fields)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None


def _method_from_mapping(item: Any, where: str) -> tuple[str | None, Method]:
    if not isinstance(item, Mapping) or "name" not in item:
        raise UserError(f"{where}: expected a mapping with a 'name' field, got {item!r}")
    fields = dict(item)
    name = str(fields.pop("name"))
    label = fields.pop("label", None)
    return (None if label is None else str(label)), _build(name, fields, where)


def load_methods_file(path: Path) -> tuple[list[tuple[str | None, Method]], Method | None]:
    """Methods (with optional labels) and an optional equal-memory reference from YAML."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML ({exc})") from None
    reference = None
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"methods", "equal_memory"})
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(unknown)} (valid: methods, equal_memory)")
        if data.get("equal_memory") is not None:
            ref = data["equal_memory"]
            reference = (
                parse_method_spec(ref, f"{path}: equal_memory") if isinstance(ref, str)
                else _method_from_mapping(ref, f"{path}: equal_memory")[1]
            )
        data = data.get("methods") or []
    if not isinstance(data, list):
        raise UserError(f"{path}: methods must be a list of method configs")
    methods = []
    for i, item in enumerate(data):
        where = f"{path}: methods[{i}]"
        if isinstance(item, str):
            methods.append((None, parse_method_spec(item, where)))
        else:
            methods.append(_method_from_mapping(item, where))
    return methods, reference


def _unique(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


# ----------------------------------------------------------------------------- model and inputs


@dataclasses.dataclass
class Study:
    """A loaded model, its selected layers and how to feed it real inputs."""

    model: nn.Module
    layers: dict[str, nn.Module]
    feed: Callable[[str], Callable[[], object]] | None  # "calib" | "eval" -> a callable running the model


def _is_transformers_dir(model: str) -> bool:
    return (Path(model) / "config.json").is_file()


def load_study(args: argparse.Namespace) -> Study:
    if _is_transformers_dir(args.model):
        model, feed = _load_transformers(args)
    elif "/" in args.model or Path(args.model).exists():
        raise UserError(f"model {args.model!r}: not a transformers model directory (no config.json there)")
    else:
        model, feed = _load_registered(args)
    plan = LayerPlan.for_model(model, tuple(args.include) or ("*",), tuple(args.exclude))
    layers = select_layers(model, plan).layers
    if args.max_layers is not None:
        if args.max_layers < 1:
            raise UserError(f"--max-layers: must be >= 1, got {args.max_layers}")
        layers = dict(list(layers.items())[: args.max_layers])
    if not layers:
        raise UserError(f"model {args.model}: no linear layers selected (include {args.include or ['*']})")
    return Study(model, layers, feed)


def _sentences(args: argparse.Namespace) -> list[str]:
    if args.texts is None:
        return list(SENTENCES)
    try:
        lines = [s.strip() for s in args.texts.read_text().splitlines() if s.strip()]
    except OSError as exc:
        raise UserError(f"--texts {args.texts}: cannot read ({exc.strerror})") from None
    if len(lines) < 2:
        raise UserError(f"--texts {args.texts}: needs at least 2 sentences (calibration and evaluation halves)")
    return lines


def _load_transformers(args: argparse.Namespace) -> tuple[nn.Module, Callable | None]:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"model {args.model}: cannot load with transformers ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        return model, None
    sentences = _sentences(args)
    half = len(sentences) // 2
    parts = {"calib": sentences[:half], "eval": sentences[half:]}

    def feed(part: str) -> Callable[[], object]:
        def run() -> None:
            for text in parts[part]:  # one at a time: no padding tokens in the samples
                enc = tokenizer(text, return_tensors="pt").to(args.device)
                model(**enc)
        return run

    return model, feed


def _load_registered(args: argparse.Namespace) -> tuple[nn.Module, Callable | None]:
    from ptqbench.models import GenSettings, get_model

    spec = get_model(args.model)
    pipeline = spec.load(device=args.device, path=args.model_path)
    defaults = spec.defaults
    settings = GenSettings(
        steps=args.calib_steps, guidance=defaults.guidance,
        resolution=args.resolution or defaults.resolution, batch_size=1,
    )
    parts = {"calib": list(PROMPTS[:2]), "eval": list(PROMPTS[2:])}

    def feed(part: str) -> Callable[[], object]:
        seeds = [args.seed + i + (100 if part == "eval" else 0) for i in range(len(parts[part]))]
        return lambda: pipeline.generate(parts[part], seeds, settings)

    return pipeline.transformer, feed


def random_rows(layers: Mapping[str, nn.Module], n: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded standard-normal rows ``[n, in]`` per layer (CPU, float32)."""
    out = {}
    for name, layer in layers.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        out[name] = torch.randn(n, dense_weight(layer).shape[1], generator=g)
    return out


def study_inputs(
    study: Study, args: argparse.Namespace, spec: StatsSpec
) -> tuple[dict[str, LayerStats] | None, dict[str, torch.Tensor]]:
    """Calibration statistics for the methods and evaluation rows for the output errors."""
    mode = args.inputs
    if mode == "auto":
        mode = "calib" if study.feed is not None and _is_transformers_dir(args.model) else "random"
    if mode == "random":
        return None, random_rows(study.layers, args.rows, args.seed)
    if study.feed is None:
        raise UserError(f"--inputs calib: model {args.model} has no tokenizer or generator to produce real inputs")
    stats = None
    if not spec.empty:
        stats = collect_stats(study.layers, spec, study.feed("calib"), seed=args.seed)
    evaluation = collect_stats(study.layers, StatsSpec(rows=args.rows), study.feed("eval"), seed=args.seed + 1)
    return stats, {name: st.rows for name, st in evaluation.items() if st.rows is not None}


# ----------------------------------------------------------------------------- the study


def resolve_ranks(
    method: Method, reference: Method | None, layers: Mapping[str, nn.Module], per_layer: bool, multiple: int
) -> dict[str, int] | None:
    """Equal-memory ranks per layer for a low-rank method (None: use the method as configured)."""
    if reference is None or not isinstance(method, LowRankMethod):
        return None
    shapes = Selection(dict(layers), {}).shapes()
    ranks = solve_rank(reference, method, shapes, multiple=multiple, per_layer=per_layer)
    if isinstance(ranks, int):
        ranks = [ranks] * len(shapes)
    return {s.name: r for s, r in zip(shapes, ranks, strict=True)}


def run_method(
    method: Method,
    layers: Mapping[str, nn.Module],
    stats: Mapping[str, LayerStats] | None,
    ranks: Mapping[str, int] | None,
) -> tuple[dict[str, QuantLinear], dict[str, float]]:
    """Quantize ``layers`` (grouped by rank so batched methods still batch); seconds per layer
    are each group's wall time divided by its size."""
    groups: dict[int | None, dict[str, nn.Module]] = {}
    for name, layer in layers.items():
        groups.setdefault(None if ranks is None else ranks[name], {})[name] = layer
    quantized: dict[str, QuantLinear] = {}
    seconds: dict[str, float] = {}
    for rank, group in groups.items():
        m = method if rank is None else dataclasses.replace(method, rank=rank)
        start = time.perf_counter()
        quantized.update(m.quantize_layers(group, stats))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        per_layer = (time.perf_counter() - start) / len(group)
        seconds.update(dict.fromkeys(group, per_layer))
    return quantized, seconds


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: layers, ranks, exact bits per weight, mean/max errors, seconds."""
    rows = []
    for label, part in frame.groupby("method", sort=False):
        weights = (part["out_features"] * part["in_features"]).sum()
        rows.append(
            {
                "method": label,
                "layers": len(part),
                "rank": _rank_text(part["rank"]),
                "bits_per_weight": part["bits"].sum() / weights,
                "weight_err_mean": part["rel_weight_error"].mean(),
                "weight_err_max": part["rel_weight_error"].max(),
                "output_err_mean": part["rel_output_error"].mean(),
                "output_err_max": part["rel_output_error"].max(),
                "seconds": part["seconds"].sum(),
            }
        )
    return pd.DataFrame(rows)


def _rank_text(ranks: pd.Series) -> str:
    lo, hi = int(ranks.min()), int(ranks.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def collect_methods(args: argparse.Namespace) -> tuple[list[tuple[str | None, Method]], Method | None]:
    """Method configs with optional user labels, and the equal-memory reference (included first)."""
    entries: list[tuple[str | None, Method]] = []
    reference = None
    if args.methods_file is not None:
        entries, reference = load_methods_file(args.methods_file)
    entries += [(None, parse_method_spec(spec)) for spec in args.method]
    if args.equal_memory:
        reference = parse_method_spec(args.equal_memory, "--equal-memory")
    if reference is not None and all(m != reference for _, m in entries):
        entries.insert(0, (f"reference: {describe(reference)}", reference))
    if not entries:
        raise UserError("no methods: give --method SPEC (repeatable) or --methods-file YAML")
    return entries, reference


def main(args: argparse.Namespace) -> int:
    if args.rows < 1:
        raise UserError(f"--rows: must be >= 1, got {args.rows}")
    if args.rank_multiple < 1:
        raise UserError(f"--rank-multiple: must be >= 1, got {args.rank_multiple}")
    entries, reference = collect_methods(args)
    torch.manual_seed(args.seed)
    study = load_study(args)
    spec = StatsSpec()
    for _, m in entries:
        spec = spec | m.stats_spec()
    stats, inputs = study_inputs(study, args, spec)
    plans = [
        (label, m, resolve_ranks(m, reference, study.layers, args.per_layer_rank, args.rank_multiple))
        for label, m in entries
    ]
    labels = _unique([describe(m, ranks) if label is None else label for label, m, ranks in plans])
    frames = []
    for label, (_, method, ranks) in zip(labels, plans, strict=True):
        quantized, seconds = run_method(method, study.layers, stats, ranks)
        with torch.no_grad():
            frame = layer_errors(study.layers, quantized, inputs, seconds)
        frame.insert(0, "method", label)
        frames.append(frame)
        del quantized
    table = pd.concat(frames, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    summary = summarize(table)
    print(f"{len(study.layers)} layers of {args.model}; {len(entries)} methods; per-layer rows in {args.out}")
    if reference is not None:
        print(f"equal memory with: {reference.label()}")
    print(summary.to_string(index=False, float_format=_fmt))
    return 0


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"
