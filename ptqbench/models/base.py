"""What a model is to ptqbench: a registered :class:`ModelSpec` that loads a :class:`Pipeline`.

A spec carries its architecture's :class:`~ptqbench.models.adapters.ModelAdapter` (skip list,
activation floors, pipeline call arguments, latent layout and dtype).

A pipeline exposes the ``transformer`` to quantize and ``generate(prompts, seeds, settings)``,
which returns images as a float32 tensor ``[N, 3, H, W]`` in [0, 1] on the CPU. Noise is drawn
per prompt from its own seed on the CPU, so batching and device never change an image's noise
(batched and single calls may still differ by float rounding in the network).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptqbench.errors import UserError
from ptqbench.models.adapters import DTYPES, GENERIC, ModelAdapter
from ptqbench.registry import Registry, _resolve

MODELS: Registry[ModelSpec] = Registry(
    "model", group="ptqbench.models", builtins=("ptqbench.models.catalog",)
)


@dataclass(frozen=True)
class GenSettings:
    """Sampling settings that change images (all part of every cache key)."""

    steps: int = 20
    guidance: float = 4.5
    resolution: int = 1024
    batch_size: int = 4


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: where its weights come from, how it samples by default, and its adapter."""

    name: str
    description: str
    loader: str  # "module:function" with signature (spec, path, device, dtype) -> Pipeline
    hub_id: str | None = None
    dtype: str = "fp16"
    defaults: GenSettings = field(default_factory=GenSettings)
    adapter: ModelAdapter = GENERIC

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        """The spec's dtype on a GPU; float32 on the CPU (half matmuls are slow there)."""
        return DTYPES[self.dtype] if torch.device(device).type == "cuda" else torch.float32

    def load(self, device: str = "cpu", path: str | None = None, dtype: str | None = None) -> Pipeline:
        """Load the pipeline (from ``path`` if given, else the hub id or built in-process)."""
        loader: Callable[..., Pipeline] = _resolve(self.loader)
        torch_dtype = DTYPES[dtype] if dtype else self.torch_dtype(device)
        return loader(self, path, torch.device(device), torch_dtype)


class Pipeline:
    """Base class: a loaded model ready to generate."""

    def __init__(self, spec: ModelSpec, transformer: nn.Module, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.transformer = transformer
        self.device = device
        self.dtype = dtype

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        settings: GenSettings,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` float32 in [0, 1] on the CPU, one per (prompt, seed)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"model": self.spec.name, "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device)}


def get_model(name: str) -> ModelSpec:
    return MODELS.get(name)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a transformer, by its class, among the registered models' adapters
    (:data:`GENERIC`, with no rules, for a class no registered model names)."""
    cls = type(model).__name__
    found = {spec.adapter.layer_rules(): spec.adapter for _, spec in MODELS.items()
             if spec.adapter.transformer_class == cls}
    if len(found) > 1:
        names = ", ".join(sorted(a.name for a in found.values()))
        raise UserError(f"{cls}: registered adapters {names} give it different layer rules; pass a LayerPlan")
    return next(iter(found.values()), GENERIC)
