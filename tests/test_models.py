"""Models: registry entries, missing-weights message, real loaders on local folders, tiny pipelines,
deterministic generation, and layer selection on the full PixArt-Sigma / SANA configs."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

from ptqbench.errors import UserError
from ptqbench.models import GenSettings, get_model
from ptqbench.models.diffusers_models import build_transformer, env_var
from ptqbench.patching import select_layers

SETTINGS = GenSettings(steps=4, guidance=4.5, resolution=32, batch_size=4)
PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a bowl of ramen", "an astronaut riding a horse"]
SEEDS = [11, 22, 33, 44]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def tiny_pixart():
    return get_model("tiny-pixart").load("cpu")


@pytest.fixture(scope="module")
def tiny_sana():
    return get_model("tiny-sana").load("cpu")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("pixart-sigma", "pixart-sigma-512", "sana-1.6b", "sana-600m"):
        monkeypatch.delenv(env_var(name), raising=False)


# ----------------------------------------------------------------------------- registry


def test_registered_models():
    expected = {
        "pixart-sigma": ("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "fp16", 1024),
        "pixart-sigma-512": ("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "fp16", 512),
        "sana-1.6b": ("sana", "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "bf16", 1024),
        "sana-600m": ("sana", "Efficient-Large-Model/Sana_600M_1024px_diffusers", "bf16", 1024),
    }
    for name, (family, hub_id, dtype, res) in expected.items():
        spec = get_model(name)
        assert (spec.family, spec.hub_id, spec.dtype, spec.defaults.resolution) == (family, hub_id, dtype, res)
        assert (spec.defaults.steps, spec.defaults.guidance) == (20, 4.5)
    assert get_model("tiny-pixart").family == "pixart" and get_model("tiny-sana").family == "sana"
    assert get_model("pixart-sigma").torch_dtype("cpu") == torch.float32
    assert get_model("sana-1.6b").torch_dtype("cuda") == torch.bfloat16


def test_env_var_names():
    assert env_var("pixart-sigma") == "PTQBENCH_MODEL_PIXART_SIGMA"
    assert env_var("sana-1.6b") == "PTQBENCH_MODEL_SANA_1_6B"


# ----------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize("name", ["pixart-sigma", "pixart-sigma-512", "sana-1.6b"])
def test_offline_message(name, empty_hub_cache):
    spec = get_model(name)
    with pytest.raises(UserError) as err:
        spec.load("cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert spec.hub_id in msg and env_var(name) in msg and "local copy" in msg and "HF_HUB_OFFLINE" in msg


def test_bad_local_paths(tmp_path, monkeypatch, empty_hub_cache):
    with pytest.raises(UserError, match="is not a folder"):
        get_model("pixart-sigma").load("cpu", path=str(tmp_path / "missing"))
    monkeypatch.setenv(env_var("pixart-sigma"), str(tmp_path))  # an empty folder
    with pytest.raises(UserError, match="cannot load the diffusers folder"):
        get_model("pixart-sigma").load("cpu")
    with pytest.raises(UserError, match="takes no path"):
        get_model("tiny-pixart").load("cpu", path=str(tmp_path))


def test_real_loaders_on_local_folders(tmp_path, monkeypatch, tiny_pixart, tiny_sana, empty_hub_cache):
    """The real loading code (from_pretrained on a diffusers folder) gives back the same model."""
    tiny_pixart.pipe.save_pretrained(tmp_path / "pixart")
    loaded = get_model("pixart-sigma").load("cpu", path=str(tmp_path / "pixart"))
    assert loaded.spec.name == "pixart-sigma" and loaded.info()["weights"].startswith("path:")
    assert loaded.info()["scheduler"] == tiny_pixart.info()["scheduler"]
    # padding to 300 instead of 128 tokens is masked out: same images up to float rounding
    torch.testing.assert_close(loaded.generate(PROMPTS[:2], SEEDS[:2], SETTINGS),
                               tiny_pixart.generate(PROMPTS[:2], SEEDS[:2], SETTINGS), atol=1e-5, rtol=0)

    # a transformer-only checkpoint takes T5 / VAE / scheduler from pixart-sigma (here via its env var)
    tiny_pixart.transformer.save_pretrained(tmp_path / "pixart512" / "transformer")
    monkeypatch.setenv(env_var("pixart-sigma"), str(tmp_path / "pixart"))
    p512 = get_model("pixart-sigma-512").load("cpu", path=str(tmp_path / "pixart512"))
    assert "+path:" in p512.info()["weights"]
    torch.testing.assert_close(p512.generate(PROMPTS[:1], SEEDS[:1], SETTINGS),
                               tiny_pixart.generate(PROMPTS[:1], SEEDS[:1], SETTINGS), atol=1e-5, rtol=0)

    tiny_sana.pipe.save_pretrained(tmp_path / "sana")
    monkeypatch.setenv(env_var("sana-1.6b"), str(tmp_path / "sana"))
    sana = get_model("sana-1.6b").load("cpu")
    assert "complex_human_instruction" not in sana.call_kwargs  # the released pipeline's default prompt prefix
    sana.call_kwargs["complex_human_instruction"] = None
    torch.testing.assert_close(sana.generate(PROMPTS[:1], SEEDS[:1], SETTINGS),
                               tiny_sana.generate(PROMPTS[:1], SEEDS[:1], SETTINGS), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sana"])
def test_tiny_generation(name, request):
    pipe = request.getfixturevalue(name.replace("-", "_"))
    images = pipe.generate(PROMPTS, SEEDS, SETTINGS)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05
    # same seed, same image; another seed or prompt, another image
    again = pipe.generate(PROMPTS[:2], SEEDS[:2], SETTINGS)
    assert torch.equal(again, pipe.generate(PROMPTS[:2], SEEDS[:2], SETTINGS))
    other_seed = pipe.generate(PROMPTS[:1], [99], SETTINGS)
    assert (other_seed - images[:1]).abs().mean() > 0.02
    assert (images[0] - images[1]).abs().mean() > 0.02
    # batching changes no image's noise: batch 1 and batch 4 agree up to float rounding of the kernels
    single = pipe.generate(PROMPTS, SEEDS, dataclasses.replace(SETTINGS, batch_size=1))
    torch.testing.assert_close(single, images, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, images[:2], atol=1e-5, rtol=0)


def test_tiny_weights_are_deterministic(tiny_pixart):
    fresh = get_model("tiny-pixart").load("cpu")
    for (name, a), b in zip(tiny_pixart.pipe.transformer.state_dict().items(),
                            fresh.pipe.transformer.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.info() == tiny_pixart.info()
    assert get_model("tiny-sana").load("cpu").info()["weights"] != fresh.info()["weights"]


def test_noise_rule(tiny_pixart):
    noise = tiny_pixart.noise(123, 32)
    expected = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(123))
    assert torch.equal(noise, expected)
    with pytest.raises(UserError, match="multiple of 4"):
        tiny_pixart.noise(1, 30)


# ----------------------------------------------------------------------------- full configs


def _summary(model):
    sel = select_layers(model)
    shapes = collections.Counter(tuple(layer.weight.shape[:2]) for layer in sel.layers.values())
    kinds = collections.Counter(type(layer).__name__ for layer in sel.layers.values())
    return sel, shapes, kinds


def test_pixart_sigma_full_config_selection():
    model = build_transformer("pixart-sigma")
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == 610_856_096
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 286
    sel, shapes, kinds = _summary(model)
    assert len(sel.layers) == 280 and kinds == {"Linear": 280}
    assert shapes == {(1152, 1152): 224, (4608, 1152): 28, (1152, 4608): 28}
    assert all(".attn1." in n or ".attn2." in n or ".ff." in n for n in sel.layers)
    assert sel.skipped == {
        "pos_embed.proj": "patch embedding",
        "adaln_single.emb.timestep_embedder.linear_1": "timestep modulation (adaLN)",
        "adaln_single.emb.timestep_embedder.linear_2": "timestep modulation (adaLN)",
        "adaln_single.linear": "timestep modulation (adaLN)",
        "caption_projection.linear_1": "caption projection",
        "caption_projection.linear_2": "caption projection",
        "proj_out": "output projection",
    }
    sel512, shapes512, _ = _summary(build_transformer("pixart-sigma-512"))
    assert len(sel512.layers) == 280 and shapes512 == shapes


def test_sana_full_config_selection():
    model = build_transformer("sana-1.6b")
    assert sum(p.numel() for p in model.parameters()) == 1_604_462_752
    sel, shapes, kinds = _summary(model)
    assert len(sel.layers) == 200 and kinds == {"Linear": 160, "Conv2d": 40}
    assert shapes == {(2240, 2240): 160, (11200, 2240): 20, (2240, 5600): 20}
    convs = {n for n, layer in sel.layers.items() if isinstance(layer, torch.nn.Conv2d)}
    assert convs == {f"transformer_blocks.{i}.ff.conv_{k}" for i in range(20) for k in ("inverted", "point")}
    depthwise = {n: r for n, r in sel.skipped.items() if n.endswith("conv_depth")}
    assert len(depthwise) == 20 and set(depthwise.values()) == {"depthwise 3x3 conv is not a linear map over channels"}
    assert set(sel.skipped) - set(depthwise) == {
        "patch_embed.proj", "time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2",
        "time_embed.linear", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out",
    }
    sel600, shapes600, _ = _summary(build_transformer("sana-600m"))
    assert len(sel600.layers) == 280
    assert shapes600 == {(1152, 1152): 224, (5760, 1152): 28, (1152, 2880): 28}


def test_unknown_full_config():
    with pytest.raises(UserError, match="unknown model"):
        build_transformer("pixart-alpha")
