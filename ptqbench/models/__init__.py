"""Model registry: diffusion pipelines ptqbench can quantize and evaluate."""

from ptqbench.models.base import MODELS, GenSettings, ModelSpec, Pipeline, get_model

__all__ = ["MODELS", "GenSettings", "ModelSpec", "Pipeline", "get_model"]
