"""ImageReward-v1.0: the reward of each image for its prompt, on transformers' BLIP components.

The ``image-reward`` 1.5 package does not import next to ptqbench's stack (transformers < 4.47,
timm 0.6.13, fairscale, ``clip``, ``pkg_resources``), so its scorer is rebuilt here from its
source: BLIP's ViT (``VisionTransformer``, timm-style, LayerNorm eps 1e-6) is transformers'
``BlipVisionModel``; BLIP's ``med.BertModel`` text encoder with cross-attention to the image
tokens (no token-type embeddings) is transformers' ``BlipTextModel`` built with cross-attention
layers and run as an encoder; the head is the package's 5-layer linear MLP; the reward is
``(mlp(text[CLS]) - 0.16717...) / 1.03334...``. Inputs as ``ImageReward.score``: the prompt
tokenized by bert-base-uncased (plus ``[DEC]``, ``[ENC]``) padded to 35 tokens; the PIL image
resized (bicubic, shorter side 224), center-cropped to 224 and normalized with CLIP's mean/std.

:func:`checkpoint_state` maps the official ``ImageReward.pt`` (the package's ``state_dict``) onto
these modules by the package's module names. Equality with the package is tested on a tiny
random model built by the package itself (``tests/fixtures/make_image_reward_fixture.py``).
Files (never downloaded): ``ImageReward.pt`` and the bert-base-uncased ``vocab.txt``, located by
:mod:`ptqbench.metrics.weights`; missing ones make the metric "not computed" with the reason.
``python -m ptqbench.metrics.image_reward IMAGES_DIR`` scores a run's saved images (``index.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ptqbench.metrics import weights
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, register_metric
from ptqbench.metrics.weights import Missing, WeightSpec

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
HEAD_WIDTHS = (1024, 128, 64, 16)
BATCH = 16


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the scorer; the defaults are ImageReward-v1.0's (BLIP ViT-L/16 at 224 px, BERT-base)."""

    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    patch_size: int = 16
    image_size: int = 224
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    max_positions: int = 512
    vocab_size: int = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]


class ImageRewardScorer(nn.Module):
    """BLIP image encoder, cross-attending BERT text encoder and MLP head: rewards ``[N]``."""

    def __init__(self, config: ImageRewardConfig = ImageRewardConfig()):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        c = config
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=c.vision_width, intermediate_size=4 * c.vision_width, num_hidden_layers=c.vision_depth,
            num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size,
            hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0,
        ))
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=c.vocab_size, hidden_size=c.text_width, encoder_hidden_size=c.vision_width,
            intermediate_size=c.text_intermediate, num_hidden_layers=c.text_layers,
            num_attention_heads=c.text_heads, max_position_embeddings=c.max_positions, hidden_act="gelu",
            layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None,
            is_decoder=True,  # builds the cross-attention layers
        ), add_pooling_layer=False)
        widths = (c.text_width, *HEAD_WIDTHS)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers += [nn.Linear(a, b)] + ([nn.Dropout(0.0)] if i < 3 else [])
        self.head = nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                ) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return ((self.head(text[:, 0, :].float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


_VISION_RULES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(\w+)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(\w+)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(\w+)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(\w+)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(\w+)", r"post_layernorm.\1"),
)
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _target(key: str) -> str | None:
    """Our parameter name of a key of the package's ``ImageReward`` state dict (None: unused by scoring)."""
    if key.startswith(_UNUSED):
        return None
    if key.startswith("blip.visual_encoder."):
        name = key.removeprefix("blip.visual_encoder.")
        for pattern, repl in _VISION_RULES:
            if re.fullmatch(pattern, name):
                return "vision." + re.sub(pattern, repl, name)
    elif key.startswith("blip.text_encoder."):
        return "text." + key.removeprefix("blip.text_encoder.")  # BLIP's med names are BlipText's
    elif key.startswith("mlp.layers."):
        return "head." + key.removeprefix("mlp.layers.")
    raise KeyError(f"not an ImageReward checkpoint key: {key!r}")


def checkpoint_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's ``ImageReward`` state dict (``ImageReward.pt``) under :class:`ImageRewardScorer`'s names."""
    out = {}
    for key, value in state.items():
        target = _target(key)
        if target is not None:
            out[target] = value
    return out


def build_scorer(state: Mapping[str, torch.Tensor],
                 config: ImageRewardConfig = ImageRewardConfig()) -> ImageRewardScorer:
    """The scorer at ``config``'s sizes with the package's state dict loaded (every parameter, strictly).

    The modules are built on the meta device and take the checkpoint's tensors (no random init of
    ~470M parameters; a wrong checkpoint fails on its first mismatched shape)."""
    with torch.device("meta"):
        scorer = ImageRewardScorer(config)
    scorer.load_state_dict({k: v.float() for k, v in checkpoint_state(state).items()}, strict=True, assign=True)
    scorer.text.embeddings.position_ids = torch.arange(config.max_positions).expand((1, -1))  # a buffer, not saved
    return scorer.eval().requires_grad_(False)


def bert_tokenizer(vocab_file: Path) -> Any:
    """BLIP's tokenizer: bert-base-uncased's WordPiece with ``[DEC]`` (bos) and ``[ENC]`` added."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, 35]`` as ``ImageReward.score`` makes them."""
    t = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """``[N, 3, size, size]``: bicubic resize of the shorter side, center crop, RGB, CLIP normalization."""
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
        lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return torch.stack([transform(im) for im in images])


@dataclass(frozen=True)
class ImageReward:
    """A loaded scorer, its tokenizer and device."""

    scorer: ImageRewardScorer
    tokenizer: Any
    device: str

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        """Reward of each (prompt, image) pair, float64 ``[N]``."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(prompts), BATCH):
                ids, mask = tokenize(self.tokenizer, prompts[i : i + BATCH])
                pixels = preprocess(images[i : i + BATCH], self.scorer.vision.config.image_size)
                rewards = self.scorer(pixels.to(self.device), ids.to(self.device), mask.to(self.device))
                out.append(rewards.double().cpu())
        return torch.cat(out)


def load_image_reward(device: str) -> ImageReward | Missing:
    """ImageReward-v1.0 from the located checkpoint and tokenizer vocabulary, or why it cannot load."""
    checkpoint = weights.locate(weights.IMAGEREWARD)
    if isinstance(checkpoint, Missing):
        return checkpoint
    vocab = weights.locate_dir(weights.BERT_BASE_UNCASED)
    if isinstance(vocab, Missing):
        return vocab
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        scorer = build_scorer(state)
    except (RuntimeError, KeyError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        return Missing(f"{checkpoint} did not load as the ImageReward-v1.0 checkpoint: {type(err).__name__}: {err}")
    tokenizer = bert_tokenizer(vocab / "vocab.txt")
    if len(tokenizer) != ImageRewardConfig.vocab_size:
        return Missing(f"{vocab / 'vocab.txt'} gives {len(tokenizer)} tokens with [DEC] and [ENC], "
                       f"expected {ImageRewardConfig.vocab_size} (bert-base-uncased's)")
    return ImageReward(scorer.to(device), tokenizer, device)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images ``[N, 3 or 1, H, W]`` (uint8, or float in [0, 1]) as the RGB PIL images their PNGs hold."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]


@register_metric
class ImageRewardMetric(Metric):
    """ImageReward-v1.0 of each image for its prompt (BLIP + MLP reward model), then mean."""

    name = "image_reward"
    higher_is_better = True
    needs: ClassVar[frozenset[Need]] = frozenset({"prompts"})
    weight_files: ClassVar[tuple[WeightSpec, ...]] = (weights.IMAGEREWARD, weights.BERT_BASE_UNCASED)

    def __init__(self) -> None:
        self._models: dict[str, ImageReward] = {}

    def compute(self, inputs: MetricInputs) -> MetricResult:
        assert inputs.prompts is not None
        if len(inputs.prompts) != inputs.n:
            return MetricResult.missing(self, f"{self.name}: {len(inputs.prompts)} prompts for {inputs.n} images")
        if inputs.device not in self._models:
            model = load_image_reward(inputs.device)
            if isinstance(model, Missing):
                return MetricResult.missing(self, f"{self.name}: {model.reason}")
            self._models[inputs.device] = model
        model, images = self._models[inputs.device], inputs.stored()
        rewards = [model.score(inputs.prompts[i : i + BATCH], to_pil(images[i : i + BATCH]))
                   for i in range(0, inputs.n, BATCH)]
        return MetricResult.of_images(self, torch.cat(rewards))


def score_images_dir(images_dir: Path, device: str) -> dict[str, Any]:
    """ImageReward of a run's saved images (``index.json`` with ``prompt`` and ``file`` per image)."""
    model = load_image_reward(device)
    if isinstance(model, Missing):
        raise SystemExit(f"image_reward: {model.reason}")
    index = json.loads((images_dir / "index.json").read_text())
    if not index:
        raise SystemExit(f"image_reward: {images_dir / 'index.json'} lists no images")
    rewards = []
    for entry in index:
        with Image.open(images_dir / entry["file"]) as im:
            rewards.append(float(model.score([entry["prompt"]], [im.convert("RGB")])[0]))
    return {"image_reward": sum(rewards) / len(rewards), "n": len(rewards), "per_image": rewards}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ImageReward-v1.0 of a ptqbench images folder (index.json)")
    parser.add_argument("images_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(score_images_dir(args.images_dir, args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
