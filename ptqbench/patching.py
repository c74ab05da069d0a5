"""Apply a method to a model's layers, chosen by module-name patterns.

:func:`select_layers` walks any torch model and returns the Linear / 1x1 Conv2d layers to
quantize and, for every other candidate, why it was skipped (an exclude pattern with its
reason, or not a linear map). :func:`quantize_model` quantizes the selection and swaps the
modules in place. Default skip lists for PixArt-Sigma and SANA follow deepcompressor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ptqbench.layers import QuantLinear, dense_weight, is_quantizable
from ptqbench.memory import LayerShape
from ptqbench.method import Method
from ptqbench.stats import LayerStats

# pattern -> reason; patterns are fnmatch globs on the module's qualified name.
PIXART_SKIPS: dict[str, str] = {
    "pos_embed*": "patch embedding",
    "adaln_single*": "timestep modulation (adaLN)",
    "caption_projection*": "caption projection",
    "proj_in*": "input projection",
    "proj_out*": "output projection",
}
SANA_SKIPS: dict[str, str] = {
    "patch_embed*": "patch embedding",
    "time_embed*": "timestep modulation (adaLN)",
    "caption_projection*": "caption projection",
    "proj_in*": "input projection",
    "proj_out*": "output projection",
}
DEFAULT_SKIPS: dict[str, dict[str, str]] = {"pixart": PIXART_SKIPS, "sana": SANA_SKIPS}


def default_skips(model: nn.Module) -> dict[str, str]:
    """The default skip list for a diffusers transformer, by its class (empty if unknown)."""
    cls = type(model).__name__
    if cls.startswith("PixArt"):
        return PIXART_SKIPS
    if cls.startswith("Sana"):
        return SANA_SKIPS
    return {}


@dataclass(frozen=True)
class LayerPlan:
    """Which layers to quantize: include globs, exclude globs (with reasons)."""

    include: tuple[str, ...] = ("*",)
    exclude: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> LayerPlan:
        """The model's default skips plus user patterns."""
        skips = dict(default_skips(model))
        skips.update({p: "excluded by pattern" for p in exclude})
        return cls(tuple(include), skips)

    def key(self) -> dict[str, object]:
        return {"include": list(self.include), "exclude": dict(sorted(self.exclude.items()))}


@dataclass
class Selection:
    """Layers chosen for quantization and the skipped ones with their reasons."""

    layers: dict[str, nn.Module]
    skipped: dict[str, str]

    def shapes(self) -> list[LayerShape]:
        out = []
        for name, layer in self.layers.items():
            w = dense_weight(layer)
            out.append(LayerShape(name, int(w.shape[0]), int(w.shape[1]), layer.bias is not None))
        return out


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
    return Selection(layers, skipped)


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

    ``ranks`` optionally gives per-layer branch ranks (layers are grouped by rank so batched
    methods still batch).
    """
    selection = select_layers(model, plan)
    groups: dict[int | None, dict[str, nn.Module]] = {}
    for name, layer in selection.layers.items():
        groups.setdefault(None if ranks is None else ranks[name], {})[name] = layer
    quantized: dict[str, QuantLinear] = {}
    for rank, layers in groups.items():
        m = method if rank is None else dataclasses.replace(method, rank=rank)
        quantized.update(m.quantize_layers(layers, stats, progress))
    for name, q in quantized.items():
        replace_module(model, name, q)
    return PatchReport(quantized, selection.skipped, dict(selection.layers))


def restore_model(model: nn.Module, report: PatchReport) -> None:
    """Put the original layers back (undo :func:`quantize_model`)."""
    for name, layer in report.originals.items():
        replace_module(model, name, layer)
