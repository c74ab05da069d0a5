"""Suites: a YAML file validated into a typed :class:`Suite`, then expanded into :class:`Cell`\\ s.

Schema (``suites/*.yaml`` are commented examples)::

    name: equal_memory              # MLflow experiment; required
    description: ...
    defaults: {steps, guidance, resolution, batch_size, dtype}   # for every model
    models:                         # required; a name or a mapping with overrides
      - pixart-sigma
      - {name: sana-1.6b, path: /local/diffusers/folder, dtype: bf16, steps: 20, resolution: 1024}
    prompts: {set: mjhq, n: 5000, path: meta_data.json, real: ${MJHQ_IMAGES}}   # or a list of them
    calibration: {set: mjhq-calib, n: 64, steps, guidance, resolution, seed: 0, rows: 256, path}
    metrics: [fid, image_reward, lpips, psnr]   # or {name: fid, min_n: 1000}; not in the cell hash
    uncertainty: {level: 0.95, resamples: 2000, set_resamples: 200, seed: 0, method: bca, test: bootstrap}
    replicates: 3                   # re-draw the method's seeds k times (also per method entry)
    layers: {include: ["*"], exclude: ["*.ff.net.2"]}   # on top of each model's default skips
    budget:                         # for `rank: budget` (equal memory)
      reference: {method: svdquant, rank: 32, branch: bf16}   # main formats follow the candidate
      per_layer: false              # one rank model-wide, or one per layer
      multiple: 1                   # solved ranks are multiples of this
    methods:                        # required: the grid
      - method: loraq               # any registered method and any of its fields
        format: [int4_g64, mxfp4]   # a list is an axis: the entry expands to the Cartesian product
        rank: budget
        variants:                   # one more axis whose items set several fields together
          - {branch: mxfp8_e4m3}
          - {branch_format: mxfp4, branch_act_format: mxfp8_e4m3}
        layers: {exclude: [...]}    # per-entry layer selection

``format: X`` sets ``weight_format`` and ``act_format``; ``branch: X`` sets ``branch_format`` and
``branch_act_format``. ``rank: budget`` gets the largest rank whose exact bits fit the ``budget``
reference on each model's real layer shapes (built on the meta device, so no weights are needed).
Paths are relative to the suite file; ``~`` and ``$VAR`` expand (``real`` naming an unset variable
means no real images: metrics that need them are recorded as not computed). Each model gets a
16-bit reference cell per prompt set, and every cell a hash (:func:`ptqbench.cache.cache_key`) of
what changes its images (model, method, formats, rank, layers, prompts, sampling, calibration;
not the metric list nor the batch size, :data:`NOT_HASHED`). Metric options and ``uncertainty``
(how confidence intervals and paired tests are computed: :class:`ptqbench.uncertainty.Bootstrap`)
do not change the images either, so they are not in the hash. ``replicates: k`` (top level or per
method entry) re-draws the stochastic parts of a method k times, each replicate a cell of its own:
replicate ``r`` adds ``r`` to the method's ``seed`` (random rotation, randomized SVD) and to the
calibration's ``seed`` (sampled rows and calibration noise) when the method calibrates; replicate 0
is the cell without replicates (same hash), and all k share its hash as ``replicate_group``. A
method with nothing to re-draw (no ``seed`` field, no calibration) stays one cell. Every error
names the file, the line and the field, and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptqbench import schema
from ptqbench.cache import cache_key
from ptqbench.calibration import CalibConfig
from ptqbench.errors import UserError
from ptqbench.labels import describe
from ptqbench.memory import model_bits, solve_rank
from ptqbench.method import METHODS, LowRankMethod, Method
from ptqbench.models.base import GenSettings, ModelSpec
from ptqbench.patching import LayerPlan
from ptqbench.shapes import ModelShapes, ShapeCache, ShapesFn
from ptqbench.uncertainty import DEFAULT as DEFAULT_BOOTSTRAP
from ptqbench.uncertainty import Bootstrap

YamlPath = tuple[str | int, ...]
BUDGET = "budget"
SETTINGS = ("steps", "guidance", "resolution", "batch_size")
DTYPES = ("fp16", "bf16", "fp32")
SHORTHANDS = {"format": ("weight_format", "act_format"), "branch": ("branch_format", "branch_act_format")}
ENTRY_KEYS = ("method", "variants", "layers", "replicates")
# what a cell's config holds but its hash leaves out: none of them changes an image
NOT_HASHED = ("budget", "metrics", schema.GEN + "batch_size")
REPLICATE = "replicate"  # the config key of replicate r > 0 (replicate 0 keeps the plain hash)
# the suite's calibration keys -> CalibConfig's fields (the keys are also what the cell hash holds)
CALIBRATION_KEYS = {
    "set": "prompt_set", "n": "n_prompts", "path": "path", "steps": "steps", "guidance": "guidance",
    "resolution": "resolution", "seed": "seed", "rows": "rows",
}
EXCLUDED = "excluded by pattern"


# ============================================================================ YAML with lines


def dotted(path: YamlPath) -> str:
    """``("methods", 2, "rank")`` -> ``methods[2].rank``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@dataclass(frozen=True)
class Source:
    """A suite file's name and the line of every node, to point errors at the right place."""

    file: str
    lines: Mapping[YamlPath, int] = field(default_factory=dict, repr=False)

    def line(self, path: YamlPath) -> int | None:
        for i in range(len(path), -1, -1):
            if path[:i] in self.lines:
                return self.lines[path[:i]]
        return None

    def where(self, path: YamlPath) -> str:
        line = self.line(path)
        return f"{self.file}:{line}" if line else self.file

    def error(self, path: YamlPath, message: str) -> UserError:
        field_name = f" {dotted(path)}:" if path else ""
        return UserError(f"{self.where(path)}:{field_name} {message}")


def _convert(node: yaml.Node, loader: yaml.SafeLoader, path: YamlPath, lines: dict, file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, (str, int, float, bool)):
                raise UserError(f"{file}:{key_node.start_mark.line + 1}: {dotted(path)}: keys must be plain names")
            key = str(key)
            if key in out:
                raise UserError(
                    f"{file}:{key_node.start_mark.line + 1}: {dotted((*path, key))}: duplicate key "
                    f"(first set on line {lines[(*path, key)]})"
                )
            out[key] = _convert(value_node, loader, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, loader, (*path, i), lines, file) for i, v in enumerate(node.value)]
    return loader.construct_object(node)


def load_yaml(path: str | Path) -> tuple[Any, Source]:
    """Parse a YAML file keeping each node's line; syntax errors name the line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: suite file not found" + ("" if path.suffix else " (expected a .yaml file)"))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the suite file ({exc})") from None
    loader = yaml.SafeLoader(text)
    lines: dict[YamlPath, int] = {}
    try:
        node = loader.get_single_node()
        data = {} if node is None else _convert(node, loader, (), lines, str(path))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{at}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML error: {exc}") from None
    finally:
        loader.dispose()
    return data, Source(str(path), lines)


# ============================================================================ field validation


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


def _mapping(src: Source, path: YamlPath, value: Any, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
    if not isinstance(value, dict):
        raise src.error(path, f"expected a mapping with keys {', '.join(allowed)}, got {_type_name(value)}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise src.error((*path, key), f"unknown key {key!r}{hint} (valid: {', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise src.error(path, f"missing required key {key!r}")
    return value


def _int(src: Source, path: YamlPath, value: Any, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise src.error(path, f"expected an integer >= {low}, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f"{low}..{high}" if high is not None else f">= {low}"
        raise src.error(path, f"{value} is out of range (valid: {valid})")
    return value


def _float(src: Source, path: YamlPath, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise src.error(path, f"expected a number >= {low}, got {value!r}")
    if value < low:
        raise src.error(path, f"{value} is out of range (valid: >= {low})")
    return float(value)


def _str(src: Source, path: YamlPath, value: Any, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise src.error(path, f"expected a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise src.error(path, f"{value!r} is not valid (valid: {', '.join(choices)})")
    return value


def _bool(src: Source, path: YamlPath, value: Any) -> bool:
    if not isinstance(value, bool):
        raise src.error(path, f"expected true or false, got {value!r}")
    return value


def _str_list(src: Source, path: YamlPath, value: Any, allow_empty: bool = True) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise src.error(path, f"expected a string or a list of strings, got {_type_name(value)}")
    if not items and not allow_empty:
        raise src.error(path, "the list is empty (give at least one entry)")
    return tuple(_str(src, (*path, i), v) for i, v in enumerate(items))


_ENV_VAR = re.compile(r"\$\{?(\w+)\}?")


def _unset_vars(text: str) -> list[str]:
    return [m for m in _ENV_VAR.findall(text) if m not in os.environ]


def _file(src: Source, path: YamlPath, value: Any) -> str:
    """A path that must exist (``~`` and ``$VAR`` expanded; relative to the suite file's folder)."""
    text = _str(src, path, value)
    unset = _unset_vars(text)
    if unset:
        raise src.error(path, f"{text}: environment variable {unset[0]} is not set")
    p = Path(os.path.expandvars(text)).expanduser()
    if not p.is_absolute():
        p = Path(src.file).parent / p
    if not p.exists():
        raise src.error(path, f"{text}: no such file or folder (looked for {p})")
    return str(p)


def _real_dir(src: Source, path: YamlPath, value: Any) -> tuple[str | None, str]:
    """A folder of real images: (path, "") or, when it names an unset variable, (None, why)."""
    text = _str(src, path, value)
    unset = _unset_vars(text)
    if unset:
        return None, f"{dotted(path)}: ${unset[0]} is not set, so metrics on real images are not computed"
    found = _file(src, path, text)
    if not Path(found).is_dir():
        raise src.error(path, f"{text}: not a folder (expected a folder of real images, e.g. MJHQ-30K's)")
    return found, ""


# ============================================================================ typed sections


@dataclass(frozen=True)
class ModelEntry:
    """A model of the suite with its sampling settings resolved (model defaults < suite defaults < entry)."""

    name: str
    settings: GenSettings
    path: str | None = None
    dtype: str | None = None
    line: int | None = None

    def key(self) -> dict[str, Any]:
        """What identifies the model in a cell's hash (not ``path``, which differs across machines)."""
        out: dict[str, Any] = {"model": self.name}
        if self.dtype:
            out["dtype"] = self.dtype
        return out


@dataclass(frozen=True)
class PromptsEntry:
    """An evaluation prompt set: a registered name, how many prompts, an optional data path, and
    an optional folder of real images (for FID); ``note`` says why a named folder is not used."""

    set: str
    n: int | None = None
    path: str | None = None
    real: str | None = None
    note: str = ""


def calibration_key(calib: CalibConfig) -> dict[str, Any]:
    """What of the calibration identifies a cell (under the suite's key names; not ``path``)."""
    return {key: getattr(calib, name) for key, name in CALIBRATION_KEYS.items() if key != "path"}


def user_plan(include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> LayerPlan:
    """The user's layer selection, before a model adds its default skips (``ModelShapes.plan``)."""
    return LayerPlan(tuple(include), dict.fromkeys(exclude, EXCLUDED))


def layers_key(plan: LayerPlan) -> dict[str, list[str]]:
    """What of the user's layer selection identifies a cell."""
    return {"include": list(plan.include), "exclude": list(plan.exclude)}


@dataclass(frozen=True)
class GridPoint:
    """One expanded method configuration (``rank`` may still be ``"budget"``)."""

    method: str
    fields: tuple[tuple[str, Any], ...]
    layers: LayerPlan  # the user's globs (no model's default skips yet)
    origin: YamlPath  # the method entry, for error lines
    field_paths: tuple[tuple[str, YamlPath], ...] = ()
    replicates: int | None = None  # the entry's replicates (None: the suite's)

    @property
    def solves_rank(self) -> bool:
        return dict(self.fields).get("rank") == BUDGET

    def path_of(self, name: str) -> YamlPath:
        return dict(self.field_paths).get(name, self.origin)

    def build(self, rank: int | None = None) -> Method:
        """The method (with ``rank`` replacing a ``budget`` placeholder)."""
        fields = dict(self.fields)
        if fields.get("rank") == BUDGET:
            fields["rank"] = 0 if rank is None else rank
        return METHODS.get(self.method)(**fields)


@dataclass(frozen=True)
class Budget:
    """Equal memory: candidates get the largest rank whose exact bits fit the reference's."""

    method: str
    fields: tuple[tuple[str, Any], ...]
    per_layer: bool = False
    multiple: int = 1
    path: YamlPath = ("budget",)

    def reference(self, candidate: Method) -> Method:
        """The reference method; main formats not given follow the candidate's."""
        fields = dict(self.fields)
        for name in ("weight_format", "act_format"):
            fields.setdefault(name, getattr(candidate, name))
        return METHODS.get(self.method)(**fields)

    def key(self, candidate: Method) -> dict[str, Any]:
        return {"reference": self.reference(candidate).params(), "per_layer": self.per_layer, "multiple": self.multiple}


@dataclass(frozen=True)
class Suite:
    """A validated suite: every name checked, every method grid point built once."""

    name: str
    description: str
    source: Source
    models: tuple[ModelEntry, ...]
    prompts: tuple[PromptsEntry, ...]
    calibration: CalibConfig
    metrics: tuple[str, ...]
    layers: LayerPlan
    grid: tuple[GridPoint, ...]
    budget: Budget | None = None
    replicates: int = 1
    uncertainty: Bootstrap = DEFAULT_BOOTSTRAP  # intervals and paired tests (not in any cell hash)
    metric_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by name, for get_metric

    @property
    def file(self) -> str:
        return self.source.file


TOP_KEYS = (
    "name", "description", "defaults", "models", "prompts", "calibration", "metrics", "layers", "methods", "budget",
    "replicates",
    "uncertainty",
)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file (raises :class:`UserError` naming file, line and field)."""
    data, src = load_yaml(path)
    data = _mapping(src, (), data, TOP_KEYS, required=("name", "models", "methods"))
    name = _str(src, ("name",), data["name"])
    models = _models(src, data["models"], _defaults(src, data.get("defaults", {})))
    prompts = _prompts(src, data.get("prompts", {"set": "builtin"}))
    calibration = _calibration(src, data.get("calibration", {}))
    metrics, metric_options = _metrics(src, data.get("metrics", []))
    layers = _layers(src, ("layers",), data.get("layers", {}))
    budget = _budget(src, data["budget"]) if data.get("budget") is not None else None
    return Suite(
        name=name,
        description=str(data.get("description", "") or "").strip(),
        source=src,
        models=models,
        prompts=prompts,
        calibration=calibration,
        metrics=metrics,
        layers=layers,
        grid=_grid(src, data["methods"], layers, budget),
        budget=budget,
        replicates=_int(src, ("replicates",), data["replicates"], low=1) if "replicates" in data else 1,
        uncertainty=_uncertainty(src, data.get("uncertainty") or {}),
        metric_options=metric_options,
    )


# ---------------------------------------------------------------------------- sections


def _defaults(src: Source, value: Any) -> dict[str, Any]:
    value = _mapping(src, ("defaults",), value or {}, (*SETTINGS, "dtype"))
    return _settings(src, ("defaults",), value) | (
        {"dtype": _str(src, ("defaults", "dtype"), value["dtype"], DTYPES)} if "dtype" in value else {}
    )


def _settings(src: Source, path: YamlPath, value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SETTINGS:
        if key in value:
            v = value[key]
            out[key] = _float(src, (*path, key), v) if key == "guidance" else _int(src, (*path, key), v, low=1)
    return out


def _models(src: Source, value: Any, defaults: Mapping[str, Any]) -> tuple[ModelEntry, ...]:
    from ptqbench.models.base import MODELS

    if not isinstance(value, list) or not value:
        raise src.error(("models",), f"expected a non-empty list of model names or mappings, got {value!r}")
    out = []
    for i, item in enumerate(value):
        path: YamlPath = ("models", i)
        item = {"name": item} if isinstance(item, str) else item
        item = _mapping(src, path, item, ("name", "path", "dtype", *SETTINGS), required=("name",))
        name = _str(src, (*path, "name"), item["name"])
        if name not in MODELS:
            raise src.error((*path, "name"), str(MODELS.unknown(name)))
        spec: ModelSpec = MODELS.get(name)
        settings = dataclasses.replace(spec.defaults, **{**_pick(defaults, SETTINGS), **_settings(src, path, item)})
        dtype = _str(src, (*path, "dtype"), item["dtype"], DTYPES) if "dtype" in item else defaults.get("dtype")
        model_path = _file(src, (*path, "path"), item["path"]) if item.get("path") is not None else None
        out.append(ModelEntry(name, settings, model_path, dtype, src.line(path)))
    return tuple(out)


def _pick(d: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def _check_prompt_set(src: Source, path: YamlPath, name: str) -> str:
    from ptqbench.prompts import PROMPT_SETS

    if name not in PROMPT_SETS:
        close = difflib.get_close_matches(name, PROMPT_SETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise src.error(path, f"unknown prompt set {name!r}{hint} (valid: {', '.join(PROMPT_SETS)})")
    return name


def _prompts(src: Source, value: Any) -> tuple[PromptsEntry, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise src.error(("prompts",), "the list is empty (give at least one prompt set)")
    out = []
    for i, item in enumerate(items):
        path: YamlPath = ("prompts", i) if isinstance(value, list) else ("prompts",)
        item = {"set": item} if isinstance(item, str) else item
        item = _mapping(src, path, item, ("set", "n", "path", "real"), required=("set",))
        n = _int(src, (*path, "n"), item["n"], low=1) if item.get("n") is not None else None
        p = _file(src, (*path, "path"), item["path"]) if item.get("path") is not None else None
        real, note = _real_dir(src, (*path, "real"), item["real"]) if item.get("real") is not None else (None, "")
        name = _check_prompt_set(src, (*path, "set"), _str(src, (*path, "set"), item["set"]))
        out.append(PromptsEntry(name, n, p, real, note))
    if len({(e.set, e.n) for e in out}) != len(out):
        raise src.error(("prompts",), "the same prompt set is listed twice")
    return tuple(out)


def _calibration(src: Source, value: Any) -> CalibConfig:
    path: YamlPath = ("calibration",)
    value = _mapping(src, path, value or {}, list(CALIBRATION_KEYS))
    out: dict[str, Any] = {}
    for key, v in value.items():
        p = (*path, key)
        if v is None and key in ("path", "steps", "guidance", "resolution"):
            out[key] = None
        elif key == "set":
            out[key] = _check_prompt_set(src, p, _str(src, p, v))
        elif key == "path":
            out[key] = _file(src, p, v)
        elif key == "guidance":
            out[key] = _float(src, p, v)
        else:
            out[key] = _int(src, p, v, low=0 if key in ("seed", "rows") else 1)
    return CalibConfig(**{CALIBRATION_KEYS[k]: v for k, v in out.items()})


def _metrics(src: Source, value: Any) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """Metric names, and the options of those given as ``{name: fid, min_n: 1000}`` (checked by building them)."""
    from ptqbench.metrics.base import METRICS, get_metric

    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise src.error(("metrics",), f"expected a list of metric names or {{name: ..., option: ...}}, "
                        f"got {_type_name(value)}")
    names: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(items):
        path: YamlPath = ("metrics", i)
        opts = {}
        if isinstance(item, dict):
            if "name" not in item:
                raise src.error(path, "a metric with options needs its name, e.g. {name: fid, min_n: 1000}")
            opts = {k: v for k, v in item.items() if k != "name"}
            item = item["name"]
        name = _str(src, path, item)
        if name not in METRICS:
            raise src.error(path, str(METRICS.unknown(name)))
        if opts:
            try:
                get_metric(name, **opts)
            except UserError as exc:
                raise src.error(path, str(exc)) from None
            options[name] = opts
        names.append(name)
    if len(set(names)) != len(names):
        raise src.error(("metrics",), "a metric is listed twice")
    return tuple(names), options


def _uncertainty(src: Source, value: Any) -> Bootstrap:
    """The ``uncertainty`` block: how intervals and paired tests are computed (defaults for what it omits)."""
    block = _mapping(src, ("uncertainty",), value, [f.name for f in dataclasses.fields(Bootstrap)])
    out: dict[str, Any] = {}
    for key, v in block.items():
        path = ("uncertainty", key)
        if key == "level":
            level = _float(src, path, v, low=0.5)
            if level >= 1:
                raise src.error(path, f"{v} is out of range (valid: 0.5 <= level < 1, e.g. 0.95)")
            out[key] = level
        elif key in ("resamples", "set_resamples"):
            out[key] = _int(src, path, v, low=20, high=1_000_000)
        elif key == "seed":
            out[key] = _int(src, path, v, low=0)
        else:
            out[key] = _str(src, path, v, {"method": ("bca", "percentile"), "test": ("bootstrap", "wilcoxon")}[key])
    return Bootstrap(**out)


def _layers(src: Source, path: YamlPath, value: Any) -> LayerPlan:
    value = _mapping(src, path, value or {}, ("include", "exclude"))
    include = _str_list(src, (*path, "include"), value["include"], allow_empty=False) if "include" in value else ("*",)
    exclude = _str_list(src, (*path, "exclude"), value["exclude"]) if "exclude" in value else ()
    return user_plan(include, exclude)


# ---------------------------------------------------------------------------- methods


def _method_class(src: Source, path: YamlPath, name: Any) -> type[Method]:
    name = _str(src, path, name)
    if name not in METHODS:
        raise src.error(path, str(METHODS.unknown(name)))
    return METHODS.get(name)


def _sequence_fields(cls: type[Method]) -> set[str]:
    """Fields whose type is a list or tuple (a list value sets them; a list of lists sweeps them)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    out = set()
    for name, hint in hints.items():
        origin = typing.get_origin(hint) or hint
        text = str(hint)
        if origin in (list, tuple) or text.startswith(("tuple", "list", "Sequence", "typing.Sequence")):
            out.add(name)
    return out


def _expand_fields(src: Source, path: YamlPath, raw: Mapping[str, Any], cls: type[Method]) -> list[dict[str, Any]]:
    """Shorthands applied, then the Cartesian product of the list-valued fields.

    Each result maps a field name to ``(value, yaml path)``.
    """
    valid = [f.name for f in dataclasses.fields(cls)]
    seq = _sequence_fields(cls)
    axes: list[list[tuple[tuple[str, ...], Any, YamlPath]]] = []
    seen: dict[str, YamlPath] = {}
    for key, value in raw.items():
        kpath = (*path, key)
        targets = SHORTHANDS.get(key, (key,))
        for t in targets:
            if t not in valid:
                close = difflib.get_close_matches(t, [*valid, *SHORTHANDS, *ENTRY_KEYS], n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise src.error(kpath, f"method {cls.name} has no field {key!r}{hint} (valid: {', '.join(valid)})")
            if t in seen:
                raise src.error(kpath, f"{t} is set twice (also by {dotted(seen[t])})")
            seen[t] = kpath
        is_axis = isinstance(value, list) and (key not in seq or all(isinstance(v, list) for v in value))
        if is_axis and not value:
            raise src.error(kpath, "empty list: an axis with no values expands to no cells")
        values = [(v, (*kpath, i)) for i, v in enumerate(value)] if is_axis else [(value, kpath)]
        axes.append([(targets, v, p) for v, p in values])
    out = []
    for combo in itertools.product(*axes):
        point: dict[str, Any] = {}
        for targets, v, p in combo:
            for t in targets:
                point[t] = (tuple(v) if isinstance(v, list) else v, p)
        out.append(point)
    return out


def _grid(src: Source, value: Any, layers: LayerPlan, budget: Budget | None) -> tuple[GridPoint, ...]:
    if not isinstance(value, list) or not value:
        raise src.error(
            ("methods",), "the method grid is empty (valid: a list of entries like {method: rtn, format: mxfp4})"
        )
    points: list[GridPoint] = []
    for i, entry in enumerate(value):
        points.extend(_entry_points(src, ("methods", i), entry, layers, budget))
    return tuple(points)


def _entry_points(src: Source, path: YamlPath, entry: Any, layers: LayerPlan, budget: Budget | None) -> list[GridPoint]:
    if not isinstance(entry, dict) or "method" not in entry:
        raise src.error(path, f"expected a mapping with a 'method' key (registered: {', '.join(METHODS.names())})")
    cls = _method_class(src, (*path, "method"), entry["method"])
    entry_layers = _layers(src, (*path, "layers"), entry["layers"]) if "layers" in entry else layers
    base = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    replicates = _int(src, (*path, "replicates"), entry["replicates"], low=1) if "replicates" in entry else None
    variants = entry.get("variants", [{}])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise src.error((*path, "variants"), "expected a non-empty list of mappings (fields set together)")
    points = []
    for j, variant in enumerate(variants):
        vpath = (*path, "variants", j) if "variants" in entry else path
        clash = sorted(set(variant) & set(base))
        if clash:
            raise src.error((*vpath, clash[0]), f"{clash[0]} is set both in the entry and in this variant")
        for fixed in _expand_fields(src, path, base, cls):
            for extra in _expand_fields(src, vpath, variant, cls):
                both = {**fixed, **extra}
                clash2 = sorted(set(fixed) & set(extra))
                if clash2:
                    raise src.error(extra[clash2[0]][1], f"{clash2[0]} is set both in the entry and in this variant")
                point = _grid_point(src, path, cls, both, entry_layers, budget)
                points.append(dataclasses.replace(point, replicates=replicates))
    return points


def _grid_point(
    src: Source, path: YamlPath, cls: type[Method], fields: Mapping[str, tuple[Any, YamlPath]], layers: LayerPlan,
    budget: Budget | None,
) -> GridPoint:
    values = {k: v for k, (v, _) in fields.items()}
    paths = {k: p for k, (_, p) in fields.items()}
    if values.get("rank") == BUDGET:
        if not issubclass(cls, LowRankMethod):
            raise src.error(paths["rank"], f"rank: budget needs a low-rank method, and {cls.name} has no branch")
        if budget is None:
            raise src.error(paths["rank"], "rank: budget needs a top-level 'budget' section with the reference method")
    elif "rank" in values and (isinstance(values["rank"], bool) or not isinstance(values["rank"], int)
                               or values["rank"] < 0):
        raise src.error(paths["rank"], f"rank must be an integer >= 0 or 'budget', got {values['rank']!r}")
    point = GridPoint(cls.name, tuple(sorted(values.items())), layers, path, tuple(sorted(paths.items())))
    try:
        point.build()
    except (UserError, TypeError, ValueError) as exc:
        raise _field_error(src, path, cls, values, paths, exc) from None
    return point


def _field_error(
    src: Source, path: YamlPath, cls: type[Method], values: Mapping[str, Any], paths: Mapping[str, YamlPath],
    exc: Exception,
) -> UserError:
    """A method that would not build: point at the field at fault (a bad format, or the field the
    message names), else at the entry."""
    from ptqbench.formats import get_format

    for f in dataclasses.fields(cls):
        if f.metadata.get("format") and f.name in values:
            try:
                get_format(values[f.name])
            except UserError as fmt_exc:
                return src.error(paths[f.name], str(fmt_exc))
    message = str(exc) if isinstance(exc, UserError) else f"method {cls.name}: {exc}"
    for name in sorted(paths, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
            return src.error(paths[name], message)
    return src.error(path, message)


def _budget(src: Source, value: Any) -> Budget:
    path: YamlPath = ("budget",)
    value = _mapping(src, path, value, ("reference", "per_layer", "multiple"), required=("reference",))
    ref = value["reference"]
    rpath = (*path, "reference")
    if not isinstance(ref, dict) or "method" not in ref:
        raise src.error(rpath, "expected a method mapping, e.g. {method: svdquant, rank: 32, branch: bf16}")
    cls = _method_class(src, (*rpath, "method"), ref["method"])
    raw = {k: v for k, v in ref.items() if k != "method"}
    expanded = _expand_fields(src, rpath, raw, cls)
    if len(expanded) != 1:
        raise src.error(rpath, "the budget reference must be one configuration (no lists)")
    fields = {k: v for k, (v, _) in expanded[0].items()}
    if fields.get("rank") == BUDGET:
        raise src.error((*rpath, "rank"), "the reference needs a fixed rank")
    budget = Budget(
        cls.name,
        tuple(sorted(fields.items())),
        _bool(src, (*path, "per_layer"), value["per_layer"]) if "per_layer" in value else False,
        _int(src, (*path, "multiple"), value["multiple"], low=1) if "multiple" in value else 1,
        path,
    )
    try:
        METHODS.get(cls.name)(**fields)
    except (UserError, TypeError, ValueError) as exc:
        paths = {k: p for k, (_, p) in expanded[0].items()}
        raise _field_error(src, rpath, cls, fields, paths, exc) from None
    return budget


# ============================================================================ cells


@dataclass(frozen=True)
class Cell:
    """One run: a model, a prompt set and a method (None: the 16-bit reference), fully resolved,
    with the runtime types :func:`ptqbench.evaluate.evaluate` takes (calibration, layer plan)."""

    suite: str
    model: ModelEntry
    prompts: PromptsEntry
    method: Method | None
    calibration: CalibConfig
    plan: LayerPlan  # the model's default skips plus the user's globs
    metrics: tuple[str, ...]
    config: Mapping[str, Any]  # the resolved configuration (hashed, logged, written as config.yaml)
    hash: str
    label: str
    ranks: Mapping[str, int] | None = None  # per-layer ranks when the budget is solved per layer
    bits: int = 0  # exact bits of the quantized layers
    bits_per_weight: float = 16.0
    model_bytes: int = 0
    origin: str = ""  # file:line of the grid entry
    replicate: int = 0  # which re-draw of the method's seeds (see ``replicates``)
    replicate_group: str = ""  # the hash of replicate 0, when the suite asks for replicates

    @property
    def is_reference(self) -> bool:
        return self.method is None

    @property
    def method_name(self) -> str:
        return schema.REFERENCE_METHOD if self.method is None else self.method.name

    @property
    def rank(self) -> int | None:
        return getattr(self.method, "rank", None)

    def params(self) -> dict[str, Any]:
        """The configuration for MLflow params: per-layer ranks summarized (the full map is in config.yaml)."""
        out = {k: v for k, v in self.config.items() if k != schema.RANK_PER_LAYER}
        if self.ranks:
            values = list(self.ranks.values())
            out[schema.RANK_PER_LAYER] = {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
        out[schema.BITS_PER_WEIGHT] = self.bits_per_weight
        out[schema.MODEL_BYTES] = self.model_bytes
        return out


def expand(suite: Suite, shapes: ShapesFn | None = None) -> list[Cell]:
    """Every cell of the suite: per model and prompt set, the 16-bit reference then the grid.

    ``shapes`` gives each model's layer plan and shapes (default: built on the meta device); they
    solve ``rank: budget`` and give every cell its exact bits.
    """
    shapes = shapes or ShapeCache()
    cells: list[Cell] = []
    for entry in suite.models:
        for prompts in suite.prompts:
            cells.append(_reference_cell(suite, entry, prompts, shapes))
            for point in suite.grid:
                cells.extend(_replicates(suite, entry, prompts, point, shapes))
    _check_unique(suite, cells)
    return cells


def _model_label(suite: Suite, entry: ModelEntry) -> str:
    twins = [m for m in suite.models if m.name == entry.name]
    if len(twins) == 1:
        return entry.name
    differs = [
        f"{k}={getattr(entry.settings, k)}" for k in SETTINGS
        if len({getattr(t.settings, k) for t in twins}) > 1
    ]
    if len({t.dtype for t in twins}) > 1:
        differs.append(f"dtype={entry.dtype}")
    return f"{entry.name}[{','.join(differs)}]"


def _base_config(suite: Suite, entry: ModelEntry, prompts: PromptsEntry) -> dict[str, Any]:
    config = entry.key()
    config.update(prompt_set=prompts.set, n_prompts=prompts.n)
    # generation settings are namespaced: a method may have fields of the same name (loraq's steps)
    config.update({schema.gen_param(k): v for k, v in dataclasses.asdict(entry.settings).items()})
    config["metrics"] = list(suite.metrics)
    return config


def cell_hash(config: Mapping[str, Any]) -> str:
    """The hash of a cell: its configuration without :data:`NOT_HASHED` (what changes no image)."""
    return cache_key({k: v for k, v in config.items() if k not in NOT_HASHED})


def _cell(
    suite: Suite, entry: ModelEntry, prompts: PromptsEntry, method: Method | None, shapes: ModelShapes,
    config: dict[str, Any], ranks: Mapping[str, int] | None, origin: str, calibration: CalibConfig | None = None,
) -> Cell:
    """The cell of ``method`` on a model's shapes: hashed (:func:`cell_hash`) and sized exactly."""
    rank_list = [ranks[s.name] for s in shapes.layers] if ranks else None
    where = f" @{prompts.set}" if len(suite.prompts) > 1 else ""
    return Cell(
        suite.name, entry, prompts, method, calibration or suite.calibration, shapes.plan, suite.metrics, config,
        hash=cell_hash(config),
        label=f"{_model_label(suite, entry)}{where} {describe(method, ranks)}",
        ranks=ranks,
        bits=model_bits(method, shapes.layers, rank_list),
        bits_per_weight=shapes.bits_per_weight(method, rank_list),
        model_bytes=shapes.model_bytes(method, rank_list),
        origin=origin,
    )


def _reference_cell(suite: Suite, entry: ModelEntry, prompts: PromptsEntry, shapes: ShapesFn) -> Cell:
    config = {**_base_config(suite, entry, prompts), "method": schema.REFERENCE_METHOD}
    origin = f"{suite.file}:{entry.line}" if entry.line else suite.file
    return _cell(suite, entry, prompts, None, shapes(entry, suite.layers), config, None, origin)


def _reseeded(method: Method) -> bool:
    return any(f.name == "seed" for f in dataclasses.fields(method))


def _replicates(
    suite: Suite, entry: ModelEntry, prompts: PromptsEntry, point: GridPoint, shapes: ShapesFn
) -> list[Cell]:
    """The cells of a grid point: one, or k replicates when asked for and something can be re-drawn."""
    first = _method_cell(suite, entry, prompts, point, shapes)
    k = point.replicates or suite.replicates
    assert first.method is not None
    if k == 1 or not (_reseeded(first.method) or "calibration" in first.config):
        return [first]
    group = first.hash
    return [dataclasses.replace(first, replicate_group=group)] + [
        _method_cell(suite, entry, prompts, point, shapes, r, group) for r in range(1, k)
    ]


def _method_cell(
    suite: Suite, entry: ModelEntry, prompts: PromptsEntry, point: GridPoint, shapes: ShapesFn,
    replicate: int = 0, group: str = "",
) -> Cell:
    src = suite.source
    model_shapes = shapes(entry, point.layers)
    if not model_shapes.layers:
        raise src.error(("layers",), f"selects no quantizable layer of {entry.name} (check include/exclude globs)")
    method, ranks, budget_key = _resolve_rank(suite, entry, point, model_shapes)
    calibration = suite.calibration
    if replicate:
        if _reseeded(method):
            method = dataclasses.replace(method, seed=method.seed + replicate)  # type: ignore[attr-defined]
        calibration = dataclasses.replace(calibration, seed=calibration.seed + replicate)
    config = _base_config(suite, entry, prompts)
    if not method.stats_spec().empty:
        config["calibration"] = calibration_key(calibration)
    config["layers"] = layers_key(point.layers)
    config.update(method.params())
    if ranks:
        config[schema.RANK_PER_LAYER] = dict(ranks)
    if budget_key:
        config["budget"] = budget_key
    if replicate:
        config[REPLICATE] = replicate
    cell = _cell(suite, entry, prompts, method, model_shapes, config, ranks, src.where(point.origin), calibration)
    return dataclasses.replace(cell, replicate=replicate, replicate_group=group) if replicate else cell


def _resolve_rank(
    suite: Suite, entry: ModelEntry, point: GridPoint, shapes: ModelShapes
) -> tuple[Method, dict[str, int] | None, dict[str, Any] | None]:
    """The method with its rank: as given (checked against the layer dims) or solved for equal memory."""
    src = suite.source
    smallest = min(shapes.layers, key=lambda s: min(s.out_features, s.in_features))
    limit = min(smallest.out_features, smallest.in_features)
    if not point.solves_rank:
        method = point.build()
        rank = getattr(method, "rank", None)
        if rank is not None and rank > limit:
            raise src.error(
                point.path_of("rank"),
                f"rank {rank} exceeds the smallest selected layer of {entry.name} ({smallest.name}: "
                f"{smallest.out_features}x{smallest.in_features}) (valid: 0..{limit})",
            )
        return method, None, None
    assert suite.budget is not None
    candidate = point.build(rank=0)
    reference = suite.budget.reference(candidate)
    try:
        solved = solve_rank(reference, candidate, shapes.layers, suite.budget.multiple, suite.budget.per_layer)
    except UserError as exc:
        where = src.where(suite.budget.path)
        raise src.error(point.path_of("rank"), f"{entry.name}: {exc} (budget at {where})") from None
    budget_key = suite.budget.key(candidate)
    if isinstance(solved, list):
        ranks = {s.name: r for s, r in zip(shapes.layers, solved, strict=True)}
        return dataclasses.replace(candidate, rank=max(solved)), ranks, budget_key
    return dataclasses.replace(candidate, rank=solved), None, budget_key


def _check_unique(suite: Suite, cells: Sequence[Cell]) -> None:
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.hash in seen:
            first = seen[cell.hash]
            raise UserError(
                f"{cell.origin}: duplicate cell {cell.label!r}: the same configuration as the cell from "
                f"{first.origin} (each configuration may appear once; remove one or change a field)"
            )
        seen[cell.hash] = cell
