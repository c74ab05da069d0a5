"""Apply a method to a model's layers, chosen by module-name patterns.

:func:`select_layers` walks any torch model and returns the Linear / 1x1 Conv2d layers to
quantize, for every other candidate why it was skipped (an exclude pattern with its reason, or
not a linear map), and which selected layers read one input (q/k/v of a self-attention).
:func:`quantize_model` quantizes the selection and swaps the modules in place. The default skip
list is the model adapter's (:mod:`ptqbench.models.adapters`, deepcompressor's lists).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ptqbench import distributed as dist
from ptqbench.formats import Format
from ptqbench.layers import QuantLinear, dense_weight, is_quantizable
from ptqbench.memory import LayerShape, qkv_group
from ptqbench.method import Method
from ptqbench.models.base import adapter_for
from ptqbench.shifting import quantize_shifted, shifted_formats
from ptqbench.stats import LayerStats


@dataclass(frozen=True)
class LayerPlan:
    """Which layers to quantize: include globs, exclude globs (with reasons)."""

    include: tuple[str, ...] = ("*",)
    exclude: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> LayerPlan:
        """The default skips of the model's adapter plus user patterns."""
        skips = dict(adapter_for(model).skips)
        skips.update({p: "excluded by pattern" for p in exclude})
        return cls(tuple(include), skips)

    def key(self) -> dict[str, object]:
        return {"include": list(self.include), "exclude": dict(sorted(self.exclude.items()))}


@dataclass
class Selection:
    """Layers chosen for quantization, the skipped ones with their reasons, ``groups``:
    selected layer -> its share group (:func:`~ptqbench.memory.qkv_group`) when at least one other
    selected layer reads the same input, and ``floors``: selected layer -> the lower bound of the
    activation its input follows (the model adapter's ``activation_floors``; what methods with
    ``shift_activations`` shift)."""

    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    groups: dict[str, str] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)

    def shapes(self) -> list[LayerShape]:
        out = []
        for name, layer in self.layers.items():
            w = dense_weight(layer)
            bias = layer.bias is not None
            group, floor = self.groups.get(name), self.floors.get(name)
            out.append(LayerShape(name, int(w.shape[0]), int(w.shape[1]), bias, group, floor))
        return out


def _reads_hidden_states_only(model: nn.Module, name: str) -> bool:
    """False for a cross-attention's ``to_q``: it reads the image while its ``to_k`` / ``to_v`` read the text."""
    parent, _, leaf = name.rpartition(".")
    return not (leaf == "to_q" and getattr(model.get_submodule(parent), "is_cross_attention", False))


def shared_inputs(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Layer -> share group for the ``names`` that read one input together with another of ``names``."""
    members: dict[str, list[str]] = defaultdict(list)
    for name in names:
        group = qkv_group(name)
        if group is not None and _reads_hidden_states_only(model, name):
            members[group].append(name)
    return {n: g for g, ns in members.items() if len(ns) > 1 for n in ns}


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def select_layers(model: nn.Module, plan: LayerPlan | None = None) -> Selection:
    """Walk ``model``; quantizable layers that match ``plan`` go to ``layers``, others to ``skipped``."""
    plan = plan or LayerPlan.for_model(model)
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or not _is_candidate(module):
            continue
        reason = next((r for p, r in plan.exclude.items() if fnmatch.fnmatchcase(name, p)), None)
        if reason is None and not any(fnmatch.fnmatchcase(name, p) for p in plan.include):
            reason = "not included"
        if reason is None and not is_quantizable(module):
            k = "x".join(map(str, module.kernel_size))
            kind = "depthwise " if module.groups > 1 else ""
            reason = f"{kind}{k} conv is not a linear map over channels"
        if reason is None:
            layers[name] = module
        else:
            skipped[name] = reason
    return Selection(layers, skipped, shared_inputs(model, list(layers)), input_floors(model, layers))


def input_floors(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Layer -> lower bound of its input by ``model``'s adapter (layers without one are absent)."""
    adapter = adapter_for(model)
    found = {name: adapter.activation_floor(name) for name in layers}
    return {name: bound for name, bound in found.items() if bound is not None}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class PatchReport:
    """What :func:`quantize_model` did: quantized layers by name and skipped ones with reasons."""

    quantized: dict[str, QuantLinear]
    skipped: dict[str, str]
    originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def bits(self) -> int:
        return sum(q.bits() for q in self.quantized.values())

    def weights(self) -> int:
        return sum(q.in_features * q.out_features for q in self.quantized.values())

    def bits_per_weight(self) -> float:
        return self.bits() / max(self.weights(), 1)


def quantize_model(
    model: nn.Module,
    method: Method,
    stats: Mapping[str, LayerStats] | None = None,
    plan: LayerPlan | None = None,
    ranks: Mapping[str, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PatchReport:
    """Quantize the layers ``plan`` selects with ``method`` and swap them into ``model``.

    ``ranks`` optionally gives per-layer branch ranks; the layers ``method`` shifts
    (``shift_activations``, :func:`~ptqbench.shifting.quantize_shifted`) are quantized on shifted
    statistics. Layers are grouped by (rank, shifted format) so batched methods still batch.
    """
    selection = select_layers(model, plan)
    shifted = shifted_formats(method, selection.layers, selection.floors)
    groups: dict[tuple[int | None, Format | None], dict[str, nn.Module]] = {}
    for name, layer in selection.layers.items():
        key = (None if ranks is None else ranks[name], shifted[name][0] if name in shifted else None)
        groups.setdefault(key, {})[name] = layer
    quantized: dict[str, QuantLinear] = {}
    for (rank, fmt), layers in groups.items():
        m = method if rank is None else dataclasses.replace(method, rank=rank)
        if fmt is None:
            quantized.update(quantize_shared(m, layers, stats, progress))
        else:
            sources = {name: shifted[name][1] for name in layers}
            quantized.update(quantize_shifted(m, layers, fmt, stats, progress, sources))
    quantized = {name: quantized[name] for name in selection.layers}
    for name, q in quantized.items():
        replace_module(model, name, q)
    return PatchReport(quantized, selection.skipped, dict(selection.layers))


def batch_families(layers: Mapping[str, nn.Module]) -> list[list[str]]:
    """Layers a method may batch together, as families (in model order): connected by an equal
    weight shape or one :func:`~ptqbench.memory.qkv_group`. A method given whole families forms
    the same batches as when given every layer, so quantizing families apart changes no bit."""
    parent = {name: name for name in layers}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    first: dict[object, str] = {}
    for name, layer in layers.items():
        w = dense_weight(layer)
        for link in (("shape", tuple(w.shape), str(w.device), w.dtype), ("qkv", qkv_group(name))):
            if link[1] is None:
                continue
            if link in first:
                parent[root(name)] = root(first[link])
            else:
                first[link] = name
    families: dict[str, list[str]] = {}
    for name in layers:
        families.setdefault(root(name), []).append(name)
    return list(families.values())


def quantize_shared(
    method: Method,
    layers: Mapping[str, nn.Module],
    stats: Mapping[str, LayerStats] | None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, QuantLinear]:
    """``method.quantize_layers``, layer-parallel across ranks (:mod:`ptqbench.distributed`):
    :func:`batch_families` go to ranks by cost (weights x (rank + 1), longest first), each rank
    quantizes its families, and every rank receives all quantized layers. One process: a plain call."""
    if dist.size() == 1:
        return method.quantize_layers(layers, stats, progress)
    families = batch_families(layers)
    rank = getattr(method, "rank", 0)
    rank = rank if isinstance(rank, int) else 0
    costs = [sum(dense_weight(layers[n]).numel() for n in f) * (rank + 1) for f in families]
    owner = {n: r for f, r in zip(families, dist.assign(costs), strict=True) for n in f}
    mine = {n: layer for n, layer in layers.items() if owner[n] == dist.rank()}
    done = method.quantize_layers(mine, stats, progress) if mine else {}
    device = dense_weight(next(iter(layers.values()))).device
    shared = dist.share_modules(done, device)
    if progress:
        for name in layers:
            if name not in mine:
                progress(name)
    return {name: shared[name] for name in layers}  # type: ignore[misc]


def restore_model(model: nn.Module, report: PatchReport) -> None:
    """Put the original layers back (undo :func:`quantize_model`)."""
    for name, layer in report.originals.items():
        replace_module(model, name, layer)
