"""Models: registry entries and adapters, missing-weights message, real loaders on local folders, tiny
pipelines (PixArt, SANA, FLUX), deterministic generation, and tiny FLUX quantized by every method.
Layer selection on the full configs is in test_patching.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ptqbench.errors import UserError
from ptqbench.method import get_method
from ptqbench.models import GenSettings, get_model
from ptqbench.models.adapters import FLUX, PIXART, SANA
from ptqbench.models.diffusers_models import build_transformer, env_var
from ptqbench.patching import quantize_model, restore_model, select_layers
from ptqbench.stats import StatsCollector

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


@pytest.fixture(scope="module")
def tiny_flux():
    return get_model("tiny-flux").load("cpu")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("pixart-sigma", "pixart-sigma-512", "sana-1.6b", "sana-600m", "flux.1-dev"):
        monkeypatch.delenv(env_var(name), raising=False)


# ----------------------------------------------------------------------------- registry


def test_registered_models():
    expected = {
        "pixart-sigma": (PIXART, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "fp16", 1024),
        "pixart-sigma-512": (PIXART, "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "fp16", 512),
        "sana-1.6b": (SANA, "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "bf16", 1024),
        "sana-600m": (SANA, "Efficient-Large-Model/Sana_600M_1024px_diffusers", "bf16", 1024),
    }
    for name, (adapter, hub_id, dtype, res) in expected.items():
        spec = get_model(name)
        assert (spec.adapter, spec.hub_id, spec.dtype, spec.defaults.resolution) == (adapter, hub_id, dtype, res)
        assert (spec.defaults.steps, spec.defaults.guidance) == (20, 4.5)
    flux = get_model("flux.1-dev")  # deepcompressor's protocol fmeuler50-g3.5
    assert (flux.adapter, flux.dtype, flux.defaults.steps, flux.defaults.guidance) == (FLUX, "bf16", 50, 3.5)
    assert [get_model(f"tiny-{n}").adapter for n in ("pixart", "sana", "flux")] == [PIXART, SANA, FLUX]
    assert get_model("fmnist-dit").adapter.layer_rules() == PIXART.layer_rules()
    assert get_model("pixart-sigma").torch_dtype("cpu") == torch.float32
    assert get_model("sana-1.6b").torch_dtype("cuda") == torch.bfloat16


def test_env_var_names():
    assert env_var("pixart-sigma") == "PTQBENCH_MODEL_PIXART_SIGMA"
    assert env_var("sana-1.6b") == "PTQBENCH_MODEL_SANA_1_6B"


# ----------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize("name", ["pixart-sigma", "pixart-sigma-512", "sana-1.6b", "flux.1-dev"])
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


@pytest.mark.parametrize("name", ["tiny-pixart", "tiny-sana", "tiny-flux"])
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


def test_flux_noise_is_packed(tiny_flux):
    """FLUX latents: [1, C, h, w] drawn from the seed, packed 2x2 into tokens as diffusers packs them."""
    from diffusers import FluxPipeline

    noise = tiny_flux.noise(7, 32)
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    assert noise.shape == (1, 64, 16) and tiny_flux.downsample == 4
    assert torch.equal(noise, FluxPipeline._pack_latents(image, 1, 4, 16, 16))
    assert "use_resolution_binning" not in tiny_flux.call_kwargs  # FluxPipeline has no such argument
    with pytest.raises(UserError, match="multiple of 4"):
        tiny_flux.noise(1, 30)


def test_flux_loader_on_a_local_folder(tmp_path, tiny_flux, empty_hub_cache):
    """flux.1-dev loads a diffusers FluxPipeline folder through the adapter's pipeline class."""
    tiny_flux.pipe.save_pretrained(tmp_path / "flux")
    loaded = get_model("flux.1-dev").load("cpu", path=str(tmp_path / "flux"))
    assert type(loaded.pipe).__name__ == "FluxPipeline" and loaded.max_sequence_length == 512
    loaded.max_sequence_length = tiny_flux.max_sequence_length
    torch.testing.assert_close(loaded.generate(PROMPTS[:1], SEEDS[:1], SETTINGS),
                               tiny_flux.generate(PROMPTS[:1], SEEDS[:1], SETTINGS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", [
    get_method("rtn", weight_format="int4_g64", act_format="int4_g64"),
    get_method("smoothquant", weight_format="mxfp4", act_format="mxfp4", alpha=0.5),
    get_method("svdquant", weight_format="mxfp4", act_format="mxfp4", rank=8),
    get_method("loraq", weight_format="mxfp4", act_format="mxfp4", rank=8, steps=5),
], ids=lambda m: m.name)
def test_tiny_flux_quantized_by_each_method(method, tiny_flux, monkeypatch):
    """Calibrate, quantize every selected layer, sample two steps, restore: the FLUX plumbing end to end."""
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")  # eager formats: compiling them for these sizes costs ~30 s
    settings = GenSettings(steps=2, guidance=3.5, resolution=32, batch_size=2)
    transformer = tiny_flux.transformer
    selection = select_layers(transformer)
    spec = dataclasses.replace(method.stats_spec(), rows=32)
    with StatsCollector(selection.layers, spec, seed=0) as collector:
        ref = tiny_flux.generate(PROMPTS[:2], SEEDS[:2], settings)
    report = quantize_model(transformer, method, collector.result())
    try:
        assert set(report.quantized) == set(selection.layers) and len(report.quantized) == 22
        out = tiny_flux.generate(PROMPTS[:2], SEEDS[:2], settings)
    finally:
        restore_model(transformer, report)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < (out - ref).abs().mean() < 0.5
    torch.testing.assert_close(tiny_flux.generate(PROMPTS[:2], SEEDS[:2], settings), ref, atol=1e-6, rtol=0)


def test_unknown_full_config():
    with pytest.raises(UserError, match="unknown model"):
        build_transformer("pixart-alpha")
