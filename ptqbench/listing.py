"""``ptqbench list methods|formats|models|metrics``: one entry a line, its name first;
``ptqbench list layers MODEL``: every Linear / Conv2d of the model's transformer, quantized or
skipped (why), with the q/k/v groups that read one input, and a summary per layer kind."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from ptqbench.errors import UserError
from ptqbench.registry import describe

KINDS = ("methods", "formats", "models", "metrics", "layers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which registry to list, or the layers of a model")
    parser.add_argument("model", nargs="?", help="layers: the registered model whose transformer is listed")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="layers: quantize only layers matching a glob (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="layers: also skip layers matching a glob (repeatable)")


def rows(kind: str) -> list[tuple[str, str]]:
    """(name, description) pairs of one registry."""
    if kind == "formats":
        from ptqbench.formats import list_formats

        return list_formats()
    if kind == "methods":
        from ptqbench.method import METHODS

        return [(name, describe(cls)) for name, cls in METHODS.items()]
    if kind == "models":
        from ptqbench.models import MODELS

        return [(name, spec.description) for name, spec in MODELS.items()]
    from ptqbench.metrics import METRICS
    from ptqbench.metrics.weights import availability

    return [
        (name, f"{'higher' if cls.higher_is_better else 'lower'} is better; {describe(cls)}"
               + (f" [{availability(cls.weight_files)}]" if cls.weight_files else ""))
        for name, cls in METRICS.items()
    ]


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerRow:
    """One Linear / Conv2d of a transformer: shape ``[out x in]`` (convs: ``out x in/groups x k x k``
    unless 1x1), ``quantized`` or ``skipped (reason)``, its share group when it has one, and the lower
    bound of the activation its input follows (the adapter's ``activation_floors``) when known."""

    name: str
    kind: str
    shape: str
    weights: int
    quantized: bool
    reason: str = ""
    group: str | None = None
    floor: float | None = None

    @property
    def status(self) -> str:
        return "quantized" if self.quantized else f"skipped ({self.reason})"

    @property
    def role(self) -> str:
        """The name with its block index replaced by ``*`` (one role per block kind)."""
        return re.sub(r"(blocks)\.\d+\.", r"\1.*.", self.name)


def _kind_and_shape(module: nn.Module) -> tuple[str, str]:
    w = module.weight.shape
    if isinstance(module, nn.Linear):
        return "Linear", f"{w[0]}x{w[1]}"
    k = "x".join(map(str, module.kernel_size))
    depthwise = " depthwise" if module.groups > 1 else ""
    shape = f"{w[0]}x{w[1]}" if k == "1x1" and not depthwise else "x".join(map(str, w))
    return f"Conv2d {k}{depthwise}", shape


def transformer_of(name: str) -> nn.Module:
    """The model's transformer: on the meta device from its config (no download, no memory) when
    ptqbench ships one, else from the pipeline loaded on the CPU."""
    from ptqbench.models import get_model
    from ptqbench.models.diffusers_models import TRANSFORMER_CONFIGS, build_transformer

    spec = get_model(name)  # an unknown name is a UserError with suggestions
    if name in TRANSFORMER_CONFIGS:
        return build_transformer(name, device="meta")
    return spec.load("cpu").transformer


def layer_rows(model: nn.Module, include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ()) -> list[LayerRow]:
    """Every candidate layer of ``model`` in module order under its adapter's plan plus the patterns."""
    from ptqbench.models.base import adapter_for
    from ptqbench.patching import LayerPlan, select_layers

    adapter = adapter_for(model)
    selection = select_layers(model, LayerPlan.for_model(model, include, exclude))
    out = []
    for name, module in model.named_modules():
        if name not in selection.layers and name not in selection.skipped:
            continue
        kind, shape = _kind_and_shape(module)
        out.append(LayerRow(
            name, kind, shape, module.weight.numel(), name in selection.layers, selection.skipped.get(name, ""),
            selection.groups.get(name), adapter.activation_floor(name),
        ))
    return out


def summary(model: nn.Module, table: list[LayerRow]) -> list[str]:
    """Counts per role (block kind), then totals: layers per kind, quantized weights, q/k/v groups."""
    roles = Counter((r.quantized, r.role, r.kind, r.shape, r.reason, r.group is not None, r.floor) for r in table)
    lines = []
    for (quantized, role, kind, shape, reason, grouped, floor), n in sorted(roles.items(), key=lambda kv: not kv[0][0]):
        notes = ["shares its input with q/k/v" if grouped else "", f"input >= {floor:.6f}" if floor is not None else ""]
        status = "quantized" if quantized else "skipped"
        lines.append(_columns((status, str(n), role, f"{kind} {shape}", "; ".join(filter(None, notes)) or reason)))
    kept = [r for r in table if r.quantized]
    per_kind = ", ".join(f"{k} {n}" for k, n in sorted(Counter(r.kind for r in kept).items()))
    weights = sum(r.weights for r in kept)
    params = sum(p.numel() for p in model.parameters())
    groups = {r.group for r in kept if r.group is not None}
    lines.append(
        f"quantized: {len(kept)} layers ({per_kind or 'none'}), {weights:,} weights "
        f"({100 * weights / max(params, 1):.1f}% of {params:,} parameters); "
        f"{len(groups)} q/k/v groups share an input"
    )
    skipped = [r for r in table if not r.quantized]
    lines.append(f"skipped: {len(skipped)} layers, {sum(r.weights for r in skipped):,} weights")
    return lines


def _columns(cells: tuple[str, ...], widths: tuple[int, ...] = (9, 4, 48, 32)) -> str:
    parts = [f"{c:<{w}}" if i != 1 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=False))]
    return "  ".join([*parts, *cells[len(widths):]]).rstrip()


def print_layers(args: argparse.Namespace) -> int:
    from ptqbench.models.base import adapter_for

    if not args.model:
        raise UserError("list layers: which model? e.g. `ptqbench list layers pixart-sigma` (`ptqbench list models`)")
    model = transformer_of(args.model)
    table = layer_rows(model, tuple(args.include) or ("*",), tuple(args.exclude))
    width = max((len(r.name) for r in table), default=0)
    for r in table:
        kind = f"{r.kind} {r.shape}"
        group = f"  [{r.group}]" if r.group else ""
        floor = f"  input >= {r.floor:.6f}" if r.floor is not None else ""
        print(f"{r.name:<{width}}  {kind:<32}  {r.status}{group}{floor}")
    print()
    print(f"{args.model}: {type(model).__name__} (adapter {adapter_for(model).name})")
    for line in summary(model, table):
        print(line)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.kind == "layers":
        return print_layers(args)
    if args.model or args.include or args.exclude:
        raise UserError(f"list {args.kind}: takes no model or --include/--exclude (only `list layers` does)")
    entries = rows(args.kind)
    width = max((len(n) for n, _ in entries), default=0)
    for name, text in entries:
        print(f"{name:<{width}}  {text}".rstrip())
    return 0
