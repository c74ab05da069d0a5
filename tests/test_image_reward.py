"""ImageReward on transformers' BLIP components equals the image-reward 1.5 package.

``fixtures/image_reward_tiny.pt`` was made once by ``fixtures/make_image_reward_fixture.py`` in a
side environment where the package imports: the package's own ``ImageReward`` model at tiny
random sizes, its state dict (the official checkpoint's key names), the prompts, PNGs, token ids
and the package's ``score`` / ``inference_rank`` values. Here that state dict is loaded into
:class:`ImageRewardScorer` through the checkpoint key mapping and must give the same rewards.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptqbench.metrics import image_reward as ir
from ptqbench.metrics.base import MetricInputs, get_metric

FIXTURE = Path(__file__).parent / "fixtures" / "image_reward_tiny.pt"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny(fixture, tmp_path_factory):
    """Our scorer with the package's tiny state dict, and the fixture's tokenizer."""
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(fixture["vocab"]) + "\n")
    config = ir.ImageRewardConfig(**fixture["sizes"], vocab_size=len(fixture["vocab"]) + 2)  # + [DEC], [ENC]
    return ir.ImageReward(ir.build_scorer(fixture["state_dict"], config), ir.bert_tokenizer(vocab), "cpu")


def _pils(fixture) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)) for b in fixture["pngs"]]


def test_tokens_match_package(fixture, tiny):
    ids, mask = ir.tokenize(tiny.tokenizer, fixture["prompts"])
    assert torch.equal(ids, fixture["input_ids"]) and torch.equal(mask, fixture["attention_mask"])
    assert ids.shape == (3, ir.MAX_TOKENS) and int(mask[2].sum()) == ir.MAX_TOKENS  # the long prompt is cut


def test_scores_match_package(fixture, tiny):
    pils, prompts = _pils(fixture), fixture["prompts"]
    ours = tiny.score([p for p in prompts for _ in pils], pils * len(prompts)).reshape(len(prompts), len(pils))
    assert (ours - fixture["scores"]).abs().max() < 1e-4  # measured: 7.2e-7
    assert fixture["scores"].std() > 0.05  # the fixture's rewards differ: a wrong layer would show
    assert (ours[1] - fixture["rank_scores"]).abs().max() < 1e-4  # the package's batched inference_rank


def test_checkpoint_mapping(fixture):
    state = fixture["state_dict"]
    mapped = ir.checkpoint_state(state)
    unused = {k for k in state if k.startswith(ir._UNUSED)}
    assert unused == {k for k in state if "_proj." in k} | {"blip.text_encoder.embeddings.position_ids"}
    assert len(mapped) == len(state) - len(unused)
    assert mapped["vision.embeddings.class_embedding"] is state["blip.visual_encoder.cls_token"]
    assert "vision.encoder.layers.1.self_attn.projection.weight" in mapped and "head.7.bias" in mapped
    with pytest.raises(KeyError, match="not an ImageReward checkpoint key"):
        ir.checkpoint_state({"blip.visual_encoder.head.weight": torch.zeros(1)})


def test_metric_per_image_values(fixture, tiny, monkeypatch):
    monkeypatch.setattr(ir, "load_image_reward", lambda device: tiny)
    pils = _pils(fixture)
    images = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((48, 40)))) for im in pils])
    images = images.permute(0, 3, 1, 2).contiguous()
    result = get_metric("image_reward")(MetricInputs(images, prompts=fixture["prompts"]))
    assert result.status == "ok" and result.n == 3
    expected = tiny.score(fixture["prompts"], ir.to_pil(images))
    assert result.per_image == pytest.approx(expected.tolist(), abs=1e-9)
    assert result.value == pytest.approx(float(expected.mean()), abs=1e-9)


def test_not_computed_without_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_IMAGEREWARD", str(tmp_path / "ImageReward.pt"))
    result = get_metric("image_reward")(MetricInputs(torch.zeros(1, 3, 8, 8), prompts=["a cat"]))
    assert result.status == "not_computed" and result.value is None
    assert "ImageReward.pt" in result.reason and "PTQBENCH_IMAGEREWARD" in result.reason


def test_wrong_checkpoint_is_reported(fixture, tmp_path, monkeypatch):
    """The tiny state dict is not ImageReward-v1.0's sizes: a clear reason, not a crash."""
    torch.save(fixture["state_dict"], tmp_path / "ImageReward.pt")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(fixture["vocab"]) + "\n")
    monkeypatch.setenv("PTQBENCH_IMAGEREWARD", str(tmp_path / "ImageReward.pt"))
    monkeypatch.setenv("PTQBENCH_BERT_TOKENIZER", str(bert))
    found = ir.load_image_reward("cpu")
    assert isinstance(found, ir.Missing) and "did not load as the ImageReward-v1.0 checkpoint" in found.reason


def test_official_checkpoint_layout_loads_strictly():
    """Every key and shape of the package's full-size model (so of ``ImageReward.pt``) maps onto the
    default scorer's parameters, none left over and none missing."""
    shapes = json.loads((FIXTURE.parent / "image_reward_v1_shapes.json").read_text())
    assert len(shapes) == 625
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    mapped = ir.checkpoint_state(state)
    with torch.device("meta"):
        scorer = ir.ImageRewardScorer()
    ours = {k: list(v.shape) for k, v in scorer.state_dict().items()}
    assert {k: list(v.shape) for k, v in mapped.items()} == ours
    assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == [30524, 768]
    assert shapes["blip.visual_encoder.pos_embed"] == [1, 197, 1024]
