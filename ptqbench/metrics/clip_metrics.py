"""CLIP score and CLIP-IQA, as torchmetrics defines them and deepcompressor calls them.

Both run transformers' ``CLIPModel`` and ``CLIPProcessor`` of ``openai/clip-vit-large-patch14``
(torchmetrics' default for CLIP score, and the model deepcompressor passes to both), located by
:mod:`ptqbench.metrics.weights` (``$PTQBENCH_CLIP``, ``$PTQBENCH_WEIGHTS/clip-vit-large-patch14``,
the hub cache), never downloaded. torchmetrics itself is not a dependency (its 1.9 expects
``get_*_features`` to return tensors, which transformers 5 no longer does); its formulas are:

- ``clip_score``: per image ``100 * cos(E_image, E_prompt)``; the images go to the processor as
  uint8 ``[3, H, W]`` tensors (deepcompressor's), the prompts padded to the longest and then cut
  to the text model's 77 positions (torchmetrics' truncation, after tokenizing). The value is
  torchmetrics' ``max(mean, 0)``; the per-image values are the unclamped cosines times 100.
- ``clip_iqa``: per image ``softmax(100 * [cos(E_image, E_good), cos(E_image, E_bad)])[0]`` with
  the prompt pair ("Good photo.", "Bad photo."); the images go to the processor as float32
  tensors holding 0..255 (deepcompressor's ``update(images.to(float32))`` at ``data_range=1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ptqbench.metrics import weights
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, register_metric
from ptqbench.metrics.weights import Missing, WeightSpec

BATCH = 16
IQA_PROMPTS = ("Good photo.", "Bad photo.")


@dataclass(frozen=True)
class Clip:
    """A CLIP model and its processor on ``device``."""

    model: Any
    processor: Any
    device: str


def load_clip(folder: Path, device: str) -> Clip:
    """CLIP model and processor from a local model folder (no network)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    return Clip(model, CLIPProcessor.from_pretrained(str(folder), local_files_only=True), device)


def _unit(features: Any) -> torch.Tensor:
    """Projected embeddings (a tensor, or transformers 5's output's ``pooler_output``), L2-normalized."""
    x = features.pooler_output if hasattr(features, "pooler_output") else features
    return x / x.norm(p=2, dim=-1, keepdim=True)


def image_embeddings(clip: Clip, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Unit CLIP embeddings ``[N, E]`` of ``[3, H, W]`` images, given to the processor as they are."""
    pixels = clip.processor(images=[im.cpu() for im in images], return_tensors="pt", padding=True)["pixel_values"]
    return _unit(clip.model.get_image_features(pixel_values=pixels.to(clip.device)))


def text_embeddings(clip: Clip, texts: Sequence[str]) -> torch.Tensor:
    """Unit CLIP embeddings ``[N, E]`` of texts: padded to the longest, cut to the model's positions."""
    tokens = clip.processor(text=list(texts), return_tensors="pt", padding=True)
    limit = clip.model.config.text_config.max_position_embeddings
    ids, mask = tokens["input_ids"][..., :limit], tokens["attention_mask"][..., :limit]
    return _unit(clip.model.get_text_features(input_ids=ids.to(clip.device), attention_mask=mask.to(clip.device)))


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``[N, 3 or 1, H, W]`` as the RGB uint8 their PNGs hold (floats in [0, 1] rounded)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def clip_scores(clip: Clip, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``100 * cos`` of each (uint8 image, prompt) pair, float64 ``[N]``."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), BATCH):
            img = image_embeddings(clip, list(as_uint8(images[i : i + BATCH])))
            txt = text_embeddings(clip, prompts[i : i + BATCH])
            out.append((100 * (img * txt).sum(-1)).double().cpu())
    return torch.cat(out)


def clip_iqa_scores(clip: Clip, images: torch.Tensor, prompts: Sequence[str] = IQA_PROMPTS) -> torch.Tensor:
    """Probability of the positive prompt of the pair for each image, float64 ``[N]``."""
    out = []
    with torch.inference_mode():
        anchors = text_embeddings(clip, prompts)
        for i in range(0, images.shape[0], BATCH):
            img = image_embeddings(clip, list(as_uint8(images[i : i + BATCH]).float()))
            logits = 100 * img @ anchors.T
            out.append(logits.reshape(logits.shape[0], -1, 2).softmax(-1)[:, 0, 0].double().cpu())
    return torch.cat(out)


class _ClipMetric(Metric):
    """A per-image CLIP metric: loads CLIP once per device, reports missing weights as not computed."""

    higher_is_better = True
    weight_files: ClassVar[tuple[WeightSpec, ...]] = (weights.CLIP_L14,)

    def __init__(self) -> None:
        self._clips: dict[str, Clip] = {}

    def clip(self, device: str) -> Clip | Missing:
        if device not in self._clips:
            folder = weights.locate_dir(weights.CLIP_L14)
            if isinstance(folder, Missing):
                return folder
            try:
                self._clips[device] = load_clip(folder, device)
            except (OSError, ValueError, RuntimeError) as err:
                return Missing(f"{folder} did not load as a CLIP model and processor: {err}")
        return self._clips[device]

    def scores(self, clip: Clip, inputs: MetricInputs) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, inputs: MetricInputs) -> MetricResult:
        if inputs.prompts is not None and len(inputs.prompts) != inputs.n:
            return MetricResult.missing(self, f"{self.name}: {len(inputs.prompts)} prompts for {inputs.n} images")
        clip = self.clip(inputs.device)
        if isinstance(clip, Missing):
            return MetricResult.missing(self, f"{self.name}: {clip.reason}")
        return MetricResult.of_images(self, self.scores(clip, inputs))


@register_metric
class ClipScore(_ClipMetric):
    """CLIP score (torchmetrics, CLIP ViT-L/14): 100 x cosine of each image and its prompt, then mean."""

    name = "clip_score"
    needs: ClassVar[frozenset[Need]] = frozenset({"prompts"})

    def scores(self, clip: Clip, inputs: MetricInputs) -> torch.Tensor:
        assert inputs.prompts is not None
        return clip_scores(clip, inputs.stored(), inputs.prompts)

    def compute(self, inputs: MetricInputs) -> MetricResult:
        result = super().compute(inputs)  # torchmetrics reports max(mean, 0)
        return result if result.value is None else replace(result, value=max(result.value, 0.0))


@register_metric
class ClipIQA(_ClipMetric):
    """CLIP-IQA (torchmetrics, CLIP ViT-L/14, "Good photo." vs "Bad photo."): P(good) per image, then mean."""

    name = "clip_iqa"

    def scores(self, clip: Clip, inputs: MetricInputs) -> torch.Tensor:
        return clip_iqa_scores(clip, inputs.stored())
