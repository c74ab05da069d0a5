"""ImageReward-v1.0 (optional): the mean reward of each image for its prompt.

The ``image-reward`` 1.5 package does not import next to ptqbench's main stack (it needs
transformers < 4.47 APIs, huggingface-hub < 1, diffusers < 0.32, timm 0.6.13, fairscale, the
``clip`` module and ``pkg_resources``), so it is never a dependency. This metric computes only when
``import ImageReward`` works in the running environment and its files are local: the checkpoint
``ImageReward.pt`` and ``med_config.json`` (found by :mod:`ptqbench.metrics.weights`:
``$PTQBENCH_IMAGEREWARD`` / ``$PTQBENCH_IMAGEREWARD_MED_CONFIG``, ``$PTQBENCH_WEIGHTS``,
``~/.cache/ImageReward``) and the ``bert-base-uncased`` tokenizer in the Hugging Face cache.
Nothing is downloaded. Otherwise it is recorded as not computed with the reason.

In a separate environment where the package imports (see :data:`INSTALL_HINT`), the saved
images of a run can be scored with ``python -m ptqbench.metrics.image_reward IMAGES_DIR``
(reads ``index.json``, prints ``{"image_reward": mean, "n": n}``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from PIL import Image

from ptqbench.metrics import weights
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, register_metric
from ptqbench.metrics.weights import Missing

BERT_REPO = "bert-base-uncased"
BERT_VOCAB = 30522
INSTALL_HINT = (
    "image-reward 1.5 cannot share an environment with transformers 5 / diffusers 0.42 / huggingface-hub 1; "
    "in a separate environment: pip install torch torchvision image-reward==1.5 transformers==4.46.3 "
    "'tokenizers<0.21' 'huggingface-hub<1' diffusers==0.31.0 'datasets<4' timm==0.6.13 fairscale==0.4.13 "
    "openai-clip ftfy 'setuptools<81', install ptqbench there with --no-deps, and score a run's images with "
    "python -m ptqbench.metrics.image_reward IMAGES_DIR"
)


def import_image_reward() -> ModuleType | Missing:
    """The ``ImageReward`` module, or why it does not import here."""
    try:
        import ImageReward
    except Exception as err:  # a broken install raises ImportError, AttributeError, ... at import time
        return Missing(f"the optional package image-reward does not import ({type(err).__name__}: {err}); "
                       + INSTALL_HINT)
    return ImageReward


def bert_tokenizer_problem() -> str | None:
    """Why the BLIP text tokenizer (``bert-base-uncased``) is not usable offline, or None."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(BERT_REPO, "vocab.txt"), str):
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"the {BERT_REPO} tokenizer (vocab.txt) is not in the Hugging Face cache {HF_HUB_CACHE}; "
        f"to provide it, run once online: python -c \"from transformers import BertTokenizer; "
        f"BertTokenizer.from_pretrained('{BERT_REPO}')\""
    )


def load_image_reward(device: str) -> Any:
    """The ImageReward-v1.0 model from local files on ``device``, or a :class:`Missing`."""
    rm = import_image_reward()
    if isinstance(rm, Missing):
        return rm
    checkpoint = weights.locate(weights.IMAGEREWARD)
    if isinstance(checkpoint, Missing):
        return checkpoint
    med_config = weights.locate(weights.IMAGEREWARD_MED_CONFIG)
    if isinstance(med_config, Missing):
        return med_config
    problem = bert_tokenizer_problem()
    if problem:
        return Missing(problem)
    model = rm.load(str(checkpoint), device=device, med_config=str(med_config))
    size = len(model.blip.tokenizer)
    if size < BERT_VOCAB:  # an offline fallback tokenizer would score garbage
        return Missing(f"the {BERT_REPO} tokenizer loaded with {size} tokens, expected >= {BERT_VOCAB}")
    return model.eval()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images ``[N, 3, H, W]`` (uint8, or float in [0, 1]) as the RGB PIL images their PNGs hold."""
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    u8 = images.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in u8]


def score(model: Any, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
    """ImageReward of each (prompt, image) pair."""
    with torch.inference_mode():
        return [float(model.score(p, im)) for p, im in zip(prompts, images, strict=True)]


@register_metric
class ImageRewardMetric(Metric):
    """ImageReward-v1.0 of each image for its prompt, then mean (optional: needs the image-reward package)."""

    name = "image_reward"
    higher_is_better = True
    needs: ClassVar[frozenset[Need]] = frozenset({"prompts"})

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}

    def compute(self, inputs: MetricInputs) -> MetricResult:
        assert inputs.prompts is not None
        n = inputs.n
        if len(inputs.prompts) != n:
            return MetricResult.missing(self, f"{self.name}: {len(inputs.prompts)} prompts for {n} images")
        if inputs.device not in self._models:
            model = load_image_reward(inputs.device)
            if isinstance(model, Missing):
                return MetricResult.missing(self, f"{self.name}: {model.reason}")
            self._models[inputs.device] = model
        model = self._models[inputs.device]
        rewards = []
        for i in range(0, n, 16):
            rewards += score(model, inputs.prompts[i : i + 16], to_pil(inputs.stored()[i : i + 16]))
        return MetricResult(self.name, sum(rewards) / n, n, higher_is_better=True)


def score_images_dir(images_dir: Path, device: str) -> dict[str, Any]:
    """Mean ImageReward of a run's saved images (``index.json`` with ``prompt`` and ``file`` per image)."""
    model = load_image_reward(device)
    if isinstance(model, Missing):
        raise SystemExit(f"image_reward: {model.reason}")
    index = json.loads((images_dir / "index.json").read_text())
    if not index:
        raise SystemExit(f"image_reward: {images_dir / 'index.json'} lists no images")
    rewards = []
    for entry in index:
        with Image.open(images_dir / entry["file"]) as im:
            rewards += score(model, [entry["prompt"]], [im.convert("RGB")])
    return {"image_reward": sum(rewards) / len(rewards), "n": len(rewards)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ImageReward-v1.0 of a ptqbench images folder (index.json)")
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(score_images_dir(args.images_dir, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
