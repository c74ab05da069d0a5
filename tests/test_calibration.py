"""Prompt sets (shipped lists, MJHQ subset rule, sDCI, Fashion-MNIST classes, seeds) and calibration
(statistics at every step of both CFG halves, on-disk cache and its key)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from ptqbench.cache import Cache
from ptqbench.calibration import CalibConfig, calibrate, calibration_key, effective_spec, load_stats, save_stats
from ptqbench.errors import UserError
from ptqbench.method import get_method
from ptqbench.models import GenSettings, get_model
from ptqbench.patching import quantize_model, restore_model, select_layers
from ptqbench.prompts import FMNIST_CLASSES, get_prompt_set, load_mjhq, seed_for
from ptqbench.stats import LayerStats, StatsSpec

SETTINGS = GenSettings(steps=3, guidance=4.5, resolution=32, batch_size=2)
CALIB = CalibConfig(prompt_set="builtin-calib", n_prompts=3, rows=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def pipe():
    return get_model("tiny-pixart").load("cpu")


@pytest.fixture
def layers(pipe):
    return select_layers(pipe.transformer).layers


# ----------------------------------------------------------------------------- prompt sets


def test_seed_rule_is_sha256():
    assert seed_for("") == 0xE3B0C442  # SHA-256 of the empty string starts e3b0c442
    assert seed_for("fox-snow") == 1358350369
    assert len({seed_for(k) for k in get_prompt_set("builtin").keys}) == len(get_prompt_set("builtin"))


def test_builtin_sets_are_disjoint_and_varied():
    ev, cal = get_prompt_set("builtin"), get_prompt_set("builtin-calib")
    assert len(ev) >= 40 and len(cal) >= 20
    assert not set(ev.keys) & set(cal.keys) and not set(ev.prompts) & set(cal.prompts)
    assert len(set(ev.prompts)) == len(ev)
    assert get_prompt_set("builtin", 5).keys == ev.keys[:5]
    assert ev.seeds()[:2] == [seed_for(ev.keys[0]), seed_for(ev.keys[1])]
    with pytest.raises(UserError, match=r"valid: 1\.\.48"):
        get_prompt_set("builtin", 1000)
    with pytest.raises(UserError, match="unknown name 'coco'"):
        get_prompt_set("coco")


def test_fmnist_classes_cycle_with_distinct_keys():
    ps = get_prompt_set("fmnist-classes", 23)
    assert ps.prompts[:10] == FMNIST_CLASSES and ps.prompts[10:20] == FMNIST_CLASSES
    assert ps.keys[9] == "ankle boot" and ps.keys[19] == "ankle boot#1" and ps.keys[22] == "pullover#2"
    assert FMNIST_CLASSES[0] == "t-shirt/top" and len(get_prompt_set("fmnist-classes")) == 10
    calib = get_prompt_set("fmnist-calib", 30)
    assert not set(calib.keys) & set(get_prompt_set("fmnist-classes", 1000).keys)
    assert set(calib.prompts) == set(FMNIST_CLASSES)


def _write_mjhq(tmp_path, n=50):
    meta = {f"{i:040x}": {"category": ["people", "animals"][i % 2], "prompt": f"prompt number {i}"} for i in range(n)}
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps(meta))
    return path, list(meta)


def test_mjhq_subset_rule(tmp_path):
    path, keys = _write_mjhq(tmp_path)
    shuffled = list(keys)
    random.Random(0).shuffle(shuffled)
    ps = get_prompt_set("mjhq", 10, path)
    assert list(ps.keys) == sorted(shuffled[:10])
    assert ps.prompts[0] == load_mjhq(path)[ps.keys[0]]
    assert get_prompt_set("mjhq", 10, tmp_path).keys == ps.keys  # a folder holding meta_data.json works too
    calib = get_prompt_set("mjhq-calib", 20, path)
    assert not set(calib.keys) & set(get_prompt_set("mjhq", 30, path).keys)
    assert len(get_prompt_set("mjhq", None, path)) == 50


def test_mjhq_and_sdci_offline_messages(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("PTQBENCH_MJHQ", raising=False)
    monkeypatch.delenv("PTQBENCH_SDCI", raising=False)
    with pytest.raises(UserError, match=r"playgroundai/MJHQ-30K.*PTQBENCH_MJHQ"):
        get_prompt_set("mjhq", 10)
    with pytest.raises(UserError, match=r"mit-han-lab/svdquant-datasets.*PTQBENCH_SDCI"):
        get_prompt_set("sdci", 10)
    with pytest.raises(UserError, match="does not exist"):
        get_prompt_set("mjhq", 10, tmp_path / "nowhere.json")


def test_sdci_yaml(tmp_path, monkeypatch):
    (tmp_path / "sDCI.yaml").write_text("sa_1: a dog on a sofa\nsa_2:\n  prompt: two red apples\n")
    monkeypatch.setenv("PTQBENCH_SDCI", str(tmp_path))
    ps = get_prompt_set("sdci")
    assert ps.keys == ("sa_1", "sa_2") and ps.prompts == ("a dog on a sofa", "two red apples")


# ----------------------------------------------------------------------------- calibration


def test_calibrate_collects_every_step_and_both_cfg_halves(pipe, layers, tmp_path):
    kv = "transformer_blocks.1.attn2.to_k"  # skipped by default; here to count the caption tokens it reads
    layers = {**layers, kv: pipe.transformer.get_submodule(kv)}
    spec = StatsSpec(absmax=True, rows=16, xtx="diag")
    stats = calibrate(pipe, layers, spec, CALIB, SETTINGS, Cache(tmp_path))
    assert set(stats) == set(layers)
    q = stats["transformer_blocks.0.attn1.to_q"]
    # 3 prompts x 3 steps x 2 CFG halves x 64 image tokens (32 px / VAE 2 / patch 2 = 8x8)
    assert q.count == 3 * 3 * 2 * 64
    assert stats["transformer_blocks.1.attn2.to_k"].count == 3 * 3 * 2 * 128  # caption tokens
    assert q.absmax.shape == (64,) and q.rows.shape == (32, 64) and q.xtx.shape == (64,)  # rows: max(16, 32)
    assert q.absmax.dtype == torch.float32 and q.absmax.device.type == "cpu"

    # an independent record of the same forwards: abs-max and sum of squares of every input
    seen = {}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        amax, ss = seen.get("q", (torch.zeros(64), torch.zeros(64)))
        seen["q"] = (torch.maximum(amax, x.abs().amax(0)), ss + (x * x).sum(0))

    handle = layers["transformer_blocks.0.attn1.to_q"].register_forward_pre_hook(hook)
    try:
        prompts = CALIB.prompts()
        pipe.generate(list(prompts.prompts), CALIB.seeds(prompts), SETTINGS)
    finally:
        handle.remove()
    assert torch.equal(q.absmax, seen["q"][0])
    torch.testing.assert_close(q.xtx, seen["q"][1], rtol=1e-5, atol=0)
    assert (q.rows.abs() <= q.absmax).all()


def test_calibration_cache_hit_and_key(pipe, layers, tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    spec = StatsSpec(absmax=True)
    first = calibrate(pipe, layers, spec, CALIB, SETTINGS, cache)
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: pytest.fail("a cache hit must not run the model"))
    second = calibrate(pipe, layers, spec, CALIB, SETTINGS, cache)
    for name in first:
        assert torch.equal(first[name].absmax, second[name].absmax)
        assert torch.equal(first[name].rows, second[name].rows) and first[name].count == second[name].count

    names = list(layers)
    key = calibration_key(pipe, names, spec, CALIB, SETTINGS)
    assert key == calibration_key(pipe, list(reversed(names)), spec, CALIB, SETTINGS)
    assert key == calibration_key(pipe, names, StatsSpec(), CALIB, SETTINGS)  # absmax is always collected
    changed = [
        calibration_key(pipe, names, spec, dataclasses.replace(CALIB, n_prompts=2), SETTINGS),
        calibration_key(pipe, names, spec, dataclasses.replace(CALIB, prompt_set="fmnist-calib"), SETTINGS),
        calibration_key(pipe, names, spec, dataclasses.replace(CALIB, seed=1), SETTINGS),
        calibration_key(pipe, names, spec, dataclasses.replace(CALIB, rows=8), SETTINGS),
        calibration_key(pipe, names, spec, dataclasses.replace(CALIB, steps=5), SETTINGS),
        calibration_key(pipe, names, spec, CALIB, dataclasses.replace(SETTINGS, guidance=3.0)),
        calibration_key(pipe, names, spec, CALIB, dataclasses.replace(SETTINGS, resolution=64)),
        calibration_key(pipe, names[:-1], spec, CALIB, SETTINGS),
        calibration_key(pipe, names, StatsSpec(xtx="full"), CALIB, SETTINGS),
        calibration_key(get_model("tiny-sana").load("cpu"), names, spec, CALIB, SETTINGS),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    # the settings override: None means the evaluation's own
    assert CALIB.settings(SETTINGS) == SETTINGS
    assert dataclasses.replace(CALIB, steps=7, resolution=64).settings(SETTINGS).steps == 7


def test_stats_file_round_trip(tmp_path):
    stats = {
        "a.b": LayerStats(torch.rand(4), torch.rand(3, 4), torch.rand(4, 4), 17),
        "c": LayerStats(torch.rand(2), None, None, 5),
    }
    save_stats(tmp_path / "s.safetensors", stats)
    back = load_stats(tmp_path / "s.safetensors")
    assert list(back) == ["a.b", "c"] and back["a.b"].count == 17 and back["c"].rows is None
    assert torch.equal(back["a.b"].xtx, stats["a.b"].xtx) and torch.equal(back["c"].absmax, stats["c"].absmax)


def test_calibrate_refuses_a_quantized_transformer(pipe, tmp_path):
    report = quantize_model(pipe.transformer, get_method("rtn", weight_format="int8_pc", act_format="int8_pc"))
    try:
        with pytest.raises(RuntimeError, match="16-bit transformer"):
            calibrate(pipe, select_layers(pipe.transformer).layers, StatsSpec(absmax=True), CALIB, SETTINGS,
                      Cache(tmp_path))
    finally:
        restore_model(pipe.transformer, report)


def test_calib_config_validation():
    with pytest.raises(UserError, match="n_prompts"):
        CalibConfig(n_prompts=0)
    with pytest.raises(UserError, match="rows"):
        CalibConfig(rows=-1)
    assert effective_spec(StatsSpec(xtx="full", rows=512), CalibConfig()) == StatsSpec(True, 512, "full")
