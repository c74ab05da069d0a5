"""CLIP score and CLIP-IQA on a tiny random CLIP saved as a local model folder (no hub).

The metric's per-image values are checked against an independent float64 computation of
torchmetrics' formulas from the same model's vision and text towers.
"""

from __future__ import annotations

import pytest
import torch

from ptqbench.metrics.base import MetricInputs, get_metric
from ptqbench.metrics.clip_metrics import IQA_PROMPTS

PROMPTS = ["a red cat", "two dogs on a beach at night", "an astronaut riding a horse " * 6]  # last: > 24 tokens


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (byte-level vocabulary, no merges) saved with its processor."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=24, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def clip_env(clip_dir, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CLIP", str(clip_dir))
    return clip_dir


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 40, 48), generator=g, dtype=torch.uint8)


def _reference_embeddings(folder, images, texts, image_dtype):
    """Unit image and text embeddings in float64, through the towers and projections by hand."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder)).double().eval()
    proc = CLIPProcessor.from_pretrained(str(folder))
    pixels = proc(images=[im.to(image_dtype) for im in images], return_tensors="pt")["pixel_values"].double()
    tok = proc(text=texts, padding=True, return_tensors="pt")
    ids, mask = tok["input_ids"][:, :24], tok["attention_mask"][:, :24]  # torchmetrics' cut to the positions
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_clip_score_per_image_matches_float64_formula(clip_env):
    images = _images(3)
    result = get_metric("clip_score")(MetricInputs(images, prompts=PROMPTS))
    assert result.status == "ok", result.reason
    img, txt = _reference_embeddings(clip_env, images, PROMPTS, torch.uint8)
    expected = 100 * (img * txt).sum(-1)
    assert torch.allclose(torch.tensor(result.per_image, dtype=torch.float64), expected, atol=1e-4)
    assert result.value == pytest.approx(max(float(expected.mean()), 0.0), abs=1e-4) and result.n == 3  # max(mean, 0)
    floats = get_metric("clip_score")(MetricInputs(images.float() / 255, prompts=PROMPTS))  # PNG-exact floats
    assert floats.per_image == pytest.approx(result.per_image, abs=1e-6)


def test_clip_iqa_per_image_matches_float64_formula(clip_env):
    images = _images(4, seed=1)
    result = get_metric("clip_iqa")(MetricInputs(images))
    assert result.status == "ok", result.reason
    img, anchors = _reference_embeddings(clip_env, images, list(IQA_PROMPTS), torch.float32)
    expected = torch.softmax(100 * img @ anchors.T, dim=-1)[:, 0]
    assert torch.allclose(torch.tensor(result.per_image, dtype=torch.float64), expected, atol=1e-5)
    assert min(result.per_image) >= 0 and max(result.per_image) <= 1 and result.n == 4
    grey = get_metric("clip_iqa")(MetricInputs(images[:, :1]))  # grey images are scored as RGB
    assert grey.status == "ok" and grey.n == 4


def test_clip_metrics_not_computed_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CLIP", str(tmp_path))
    for name in ("clip_score", "clip_iqa"):
        result = get_metric(name)(MetricInputs(_images(2), prompts=PROMPTS[:2]))
        assert result.status == "not_computed" and result.value is None
        assert "openai/clip-vit-large-patch14" in result.reason and "PTQBENCH_CLIP" in result.reason
        assert "config.json" in result.reason


def test_clip_score_prompt_count_mismatch(clip_env):
    result = get_metric("clip_score")(MetricInputs(_images(3), prompts=PROMPTS[:2]))
    assert result.status == "not_computed" and "2 prompts for 3 images" in result.reason
