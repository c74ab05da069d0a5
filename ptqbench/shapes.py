"""A model's layer shapes for exact accounting without its weights, and whole-model bytes.

:class:`ModelShapes` holds what :mod:`ptqbench.memory` needs of a transformer under a layer
plan: the selected layers' shapes and the element count of everything else (kept 16-bit).
Transformers are built on the meta device when ptqbench knows their config (instant, no memory,
no download); :class:`ShapeCache` builds each one once. :func:`model_bytes` is the one formula
for the bytes of a whole transformer, used by dry runs and by evaluated cells alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ptqbench.memory import LayerShape, bits_per_weight, model_bits
from ptqbench.method import Method

if TYPE_CHECKING:
    from torch import nn

    from ptqbench.patching import LayerPlan

OTHER_BITS = 16  # parameters and buffers outside the quantized layers stay 16-bit


def other_elements(model: nn.Module, layers: Mapping[str, nn.Module]) -> int:
    """Elements of every parameter and buffer of ``model`` except the weights and biases of ``layers``."""
    skip = {id(t) for layer in layers.values() for t in (layer.weight, layer.bias) if t is not None}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def model_bytes(layer_bits: int, other: int) -> int:
    """Bytes of a whole transformer: its targeted layers' exact ``layer_bits`` (see
    :func:`ptqbench.memory.model_bits`) plus ``other`` elements at 16 bits, rounded up."""
    return -(-(layer_bits + OTHER_BITS * other) // 8)


class ModelRef(Protocol):
    """What identifies a model to load: its registered name, local weights and dtype."""

    name: str
    path: str | None
    dtype: str | None


@dataclass(frozen=True)
class ModelShapes:
    """The plan (the model's default skips plus the user's globs) a model's cells run with, the
    shapes of the layers it selects, and the element count of everything else."""

    plan: LayerPlan
    layers: tuple[LayerShape, ...]
    other_elements: int
    skipped: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_module(cls, transformer: Any, layers: LayerPlan) -> ModelShapes:
        """Shapes of a built transformer (real weights or the meta device) under the user's
        ``layers`` selection (include and exclude globs)."""
        from ptqbench.patching import LayerPlan, select_layers

        plan = LayerPlan.for_model(transformer, layers.include, tuple(layers.exclude))
        selection = select_layers(transformer, plan)
        other = other_elements(transformer, selection.layers)
        return cls(plan, tuple(selection.shapes()), other, dict(selection.skipped))

    def model_bytes(self, method: Method | None, ranks: Sequence[int] | None = None) -> int:
        return model_bytes(model_bits(method, self.layers, ranks), self.other_elements)

    def bits_per_weight(self, method: Method | None, ranks: Sequence[int] | None = None) -> float:
        return bits_per_weight(method, self.layers, ranks)


ShapesFn = Callable[[ModelRef, "LayerPlan"], ModelShapes]


def meta_transformer(entry: ModelRef) -> Any | None:
    """The model's transformer built on the meta device (instant, no memory, no download), or None.

    Built from ``path``'s ``transformer/config.json`` when the entry points at a local diffusers
    folder, else from the released config that ships with ptqbench; None for models with neither
    (the tiny in-process ones, plugins), whose pipeline must be loaded.
    """
    import torch

    from ptqbench.models import diffusers_models as dm

    if entry.name not in dm.TRANSFORMER_CONFIGS:
        return None
    config_file = Path(entry.path) / "transformer" / "config.json" if entry.path else None
    if config_file is not None and config_file.is_file():
        import diffusers

        cls = getattr(diffusers, dm.TRANSFORMER_CONFIGS[entry.name][0])
        with torch.device("meta"):
            return cls.from_config(cls.load_config(str(config_file.parent)))
    return dm.build_transformer(entry.name, device="meta")


def load_transformer(entry: ModelRef) -> Any:
    """The transformer of a loaded pipeline (on the CPU), for models that cannot be built on meta."""
    from ptqbench.models.base import get_model

    return get_model(entry.name).load("cpu", entry.path, entry.dtype).transformer


class ShapeCache:
    """Model shapes per (model, layer selection); each transformer is built on the meta device when
    possible, else taken from ``load(entry)`` (default: the pipeline loaded on the CPU)."""

    def __init__(self, load: Callable[[ModelRef], Any] | None = None):
        self._load = load
        self._modules: dict[tuple[str, str | None], Any] = {}
        self._shapes: dict[tuple[Any, ...], ModelShapes] = {}

    def __call__(self, entry: ModelRef, layers: LayerPlan) -> ModelShapes:
        key = (entry.name, entry.path, layers.include, tuple(layers.exclude))
        if key not in self._shapes:
            mkey = (entry.name, entry.path)
            if mkey not in self._modules:
                module = meta_transformer(entry)
                self._modules[mkey] = module if module is not None else (self._load or load_transformer)(entry)
            self._shapes[key] = ModelShapes.from_module(self._modules[mkey], layers)
        return self._shapes[key]
