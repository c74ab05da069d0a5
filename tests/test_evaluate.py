"""evaluate() end to end on the tiny pipelines: 16-bit identity, W4A4 below W8A8, cached references,
calibration for methods with statistics, held-out per-layer output errors, memory accounting,
restore, metrics and progress."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from ptqbench.cache import Cache
from ptqbench.calibration import CalibConfig
from ptqbench.errors import UserError
from ptqbench.evaluate import HELDOUT_ROWS, EvalResult, evaluate
from ptqbench.generation import generate_images, load_images, read_index, reference_key
from ptqbench.layers import QuantLinear
from ptqbench.method import get_method
from ptqbench.methods.rtn import RTN
from ptqbench.metrics.base import METRICS, Metric, MetricInputs, MetricResult
from ptqbench.models import GenSettings, get_model
from ptqbench.models.diffusers_models import build_transformer
from ptqbench.patching import select_layers
from ptqbench.prompts import get_prompt_set, seed_for
from ptqbench.schema import layer_error_summary
from ptqbench.shapes import model_bytes, other_elements
from ptqbench.stats import LayerStats, StatsCollector, StatsSpec

SETTINGS = GenSettings(steps=4, guidance=4.5, resolution=32, batch_size=4)
PROMPTS = get_prompt_set("builtin", 6)
CALIB = CalibConfig(n_prompts=2, rows=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add overhead


@pytest.fixture(scope="module")
def pixart():
    return get_model("tiny-pixart").load("cpu")


@pytest.fixture(scope="module")
def sana():
    return get_model("tiny-sana").load("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return Cache(tmp_path_factory.mktemp("cache"))


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((images - reference) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def run(pipe, method, cache, out_dir, **kw) -> EvalResult:
    return evaluate(pipe, method, PROMPTS, metrics=kw.pop("metrics", []), settings=SETTINGS, calibration=CALIB,
                    cache=cache, out_dir=out_dir, **kw)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def param_elements(model):
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("name", ["pixart", "sana"])
def test_reference_cell_and_16bit_identity(name, request, cache, tmp_path):
    pipe = request.getfixturevalue(name)
    before = state(pipe.transformer)
    ref = run(pipe, None, cache, tmp_path / "ref")
    reference = load_images(ref.images_dir)
    assert reference.shape == (6, 3, 32, 32)
    assert ref.images_dir == cache.path("reference", reference_key(pipe, PROMPTS, SETTINGS))
    assert ref.quantized == [] and ref.layer_errors.empty
    assert ref.model_bytes == 2 * param_elements(pipe.transformer)
    shapes = select_layers(pipe.transformer).shapes()
    assert ref.weights == sum(s.weights for s in shapes)
    assert ref.bits == 16 * (ref.weights + sum(s.out_features for s in shapes if s.bias))  # biases count too
    assert ref.bits_per_weight == ref.bits / ref.weights

    fp32 = get_method("rtn", weight_format="fp32", act_format="fp32")
    same = run(pipe, fp32, cache, tmp_path / "fp32")
    assert torch.equal(load_images(same.images_dir), reference)
    assert same.images_dir == tmp_path / "fp32" / "images"
    assert (same.layer_errors.rel_weight_error == 0).all() and len(same.layer_errors) == len(same.quantized)
    # restored: the same modules and weights as before, nothing quantized left behind
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    after = state(pipe.transformer)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_w4a4_is_worse_than_w8a8(pixart, cache, tmp_path):
    reference = load_images(run(pixart, None, cache, tmp_path / "ref").images_dir)
    w8 = run(pixart, get_method("rtn", weight_format="int8_pc", act_format="int8_pc"), cache, tmp_path / "w8")
    w4 = run(pixart, get_method("rtn", weight_format="int4_g64", act_format="int4_g64"), cache, tmp_path / "w4")
    p8, p4 = psnr(load_images(w8.images_dir), reference), psnr(load_images(w4.images_dir), reference)
    assert math.isfinite(p8) and math.isfinite(p4) and 20 < p4 < p8
    assert w4.bits_per_weight < w8.bits_per_weight < 16
    assert w4.layer_errors.rel_weight_error.mean() > w8.layer_errors.rel_weight_error.mean() > 0
    # RTN uses no statistics, yet gets its output error on the held-out calibration rows; no in-sample one
    errors = w4.layer_errors
    assert errors.rel_output_error.notna().all() and (errors.rel_output_error > 0).all()
    assert errors.insample_output_error.isna().all()
    assert (w8.layer_errors.rel_output_error < errors.rel_output_error).all()
    summary = layer_error_summary(errors)
    assert summary["layer_heldout_output_error_mean"] == pytest.approx(errors.rel_output_error.mean())
    assert summary["layer_heldout_output_error_max"] == errors.rel_output_error.max()
    assert "layer_insample_output_error_mean" not in summary and "layer_rel_output_error_mean" not in summary
    # model bytes: the quantized layers at their exact bits, everything else at 16 bits
    layers = select_layers(pixart.transformer).layers
    method = get_method("rtn", weight_format="int4_g64", act_format="int4_g64")
    exact = sum(method.layer_bits(*layer.weight.shape[:2], layer.bias is not None) for layer in layers.values())
    assert w4.bits == exact
    assert w4.model_bytes == math.ceil((16 * (param_elements(pixart.transformer) - sum(
        layer.weight.numel() + layer.bias.numel() for layer in layers.values())) + exact) / 8)
    assert w4.model_bytes == model_bytes(exact, other_elements(pixart.transformer, layers))


def test_reference_images_are_generated_once(pixart, cache, tmp_path, monkeypatch):
    run(pixart, None, cache, tmp_path / "a")
    calls = []
    original = pixart.generate
    monkeypatch.setattr(pixart, "generate", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
    again = run(pixart, get_method("rtn", weight_format="int8_pc", act_format="int8_pc"), cache, tmp_path / "b")
    # only the quantized images (batches of 4), the reference came from the cache; the calibration run for
    # RTN's held-out rows (2 prompts) too, unless an earlier test cached it
    assert calls in ([4, 2], [2, 4, 2])
    assert again.timings["reference"] < again.timings["generate"]
    other = reference_key(pixart, get_prompt_set("builtin", 5), SETTINGS)
    assert other != reference_key(pixart, PROMPTS, SETTINGS)
    assert reference_key(pixart, PROMPTS, GenSettings(4, 4.5, 32, batch_size=1)) == reference_key(
        pixart, PROMPTS, SETTINGS)


@dataclass(frozen=True)
class StatsRTN(RTN):
    """RTN that asks for statistics (records what it got), to exercise calibration inside evaluate."""

    seen: ClassVar[dict[str, LayerStats | None]] = {}

    def stats_spec(self) -> StatsSpec:
        return StatsSpec(absmax=True, rows=8)

    def quantize_layer(self, layer, stats=None):
        StatsRTN.seen[id(layer)] = stats
        return super().quantize_layer(layer, stats)


def test_method_with_statistics_is_calibrated(pixart, cache, tmp_path):
    StatsRTN.seen.clear()
    result = run(pixart, StatsRTN(weight_format="int8_pc", act_format="int8_pc"), cache, tmp_path / "s")
    layers = select_layers(pixart.transformer).layers
    assert len(StatsRTN.seen) == len(layers)
    for layer in layers.values():
        got = StatsRTN.seen[id(layer)]
        assert got is not None and got.absmax.shape == (layer.in_features,)
        assert got.rows.shape[0] == 32  # calibration rows (32) >= the method's 8
        assert got.heldout is None  # held-out rows never reach the method
    errors = result.layer_errors
    assert errors.rel_output_error.notna().all() and (errors.rel_output_error > 0).all()
    assert errors.insample_output_error.notna().all() and (errors.insample_output_error > 0).all()
    assert (errors.seconds >= 0).all() and result.timings["calibrate"] > 0


def test_heldout_rows_are_disjoint_and_leave_the_sample_unchanged():
    """The held-out rows rank next after the method's sample by the same keys: the sample is the one
    drawn without them, the two are disjoint, and together they are a uniform sample of the input."""
    layer = torch.nn.Linear(8, 4)
    batches = [torch.randn(n, 8) for n in (50, 7, 120, 33)]  # distinct rows (continuous values)
    got = {}
    for heldout in (0, 40):
        with StatsCollector({"l": layer}, StatsSpec(absmax=True, rows=16, heldout=heldout), seed=3) as c:
            for x in batches:
                c.update("l", x)
        got[heldout] = c.result()["l"]
    plain, split = got[0], got[40]
    assert plain.heldout is None and torch.equal(split.rows, plain.rows) and split.heldout.shape == (40, 8)
    everything = torch.cat(batches)
    index = {tuple(r.tolist()): i for i, r in enumerate(everything)}
    taken = [index[tuple(r.tolist())] for r in split.rows]
    held = [index[tuple(r.tolist())] for r in split.heldout]
    assert not set(taken) & set(held) and held == sorted(held)  # disjoint, in arrival order
    assert split.count == plain.count == everything.shape[0]
    assert torch.equal(split.without_heldout().rows, split.rows) and split.without_heldout().heldout is None
    back = LayerStats.from_state(split.state())
    assert torch.equal(back.heldout, split.heldout) and torch.equal(back.rows, split.rows)
    assert StatsSpec(rows=8) | StatsSpec(heldout=5) == StatsSpec(rows=8, heldout=5)
    assert not StatsSpec(heldout=5).empty


def test_stats_free_method_heldout_rows_from_any_calibration_config(pixart, cache, tmp_path):
    """RTN needs no calibration: more prompts than the set has are capped, and a set that cannot be
    loaded (MJHQ offline) leaves its layers without held-out errors instead of failing the cell."""
    rtn = get_method("rtn", weight_format="int8_pc", act_format="int8_pc")
    many = evaluate(pixart, rtn, PROMPTS, metrics=[], settings=SETTINGS, cache=cache, out_dir=tmp_path / "a",
                    calibration=CalibConfig(n_prompts=64, rows=32))  # builtin-calib has 24
    assert many.layer_errors.rel_output_error.notna().all()
    none = evaluate(pixart, rtn, PROMPTS, metrics=[], settings=SETTINGS, cache=cache, out_dir=tmp_path / "b",
                    calibration=CalibConfig(prompt_set="mjhq-calib", path=str(tmp_path / "missing")))
    assert none.layer_errors.rel_output_error.isna().all() and none.layer_errors.rel_weight_error.notna().all()
    with pytest.raises(UserError, match="MJHQ"):
        evaluate(pixart, StatsRTN(), PROMPTS, metrics=[], settings=SETTINGS, cache=cache, out_dir=tmp_path / "c",
                 calibration=CalibConfig(prompt_set="mjhq-calib", path=str(tmp_path / "missing")))


def test_searched_method_heldout_error_differs_from_insample(pixart, cache, tmp_path):
    """SVDQuant chose its smoothing and iterate on its calibration rows: its error there is not the
    held-out one, which every method gets on the same rows (cached calibration gives the same)."""
    svdq = get_method("svdquant", weight_format="int4_g64", act_format="int4_g64", rank=4, num_grids=4, num_iters=3)
    first = run(pixart, svdq, cache, tmp_path / "a").layer_errors
    assert first.rel_output_error.notna().all() and first.insample_output_error.notna().all()
    assert not (first.rel_output_error == first.insample_output_error).any()
    again = run(pixart, svdq, cache, tmp_path / "b").layer_errors  # statistics from the cache
    assert again.rel_output_error.tolist() == first.rel_output_error.tolist()
    summary = layer_error_summary(first)
    assert summary["layer_insample_output_error_mean"] != summary["layer_heldout_output_error_mean"]
    assert HELDOUT_ROWS > 0


def test_restored_even_when_generation_fails(pixart, cache, tmp_path, monkeypatch):
    run(pixart, None, cache, tmp_path / "ref")  # reference cached before the failure

    def boom(*a, **k):
        assert any(isinstance(m, QuantLinear) for m in pixart.transformer.modules())
        raise RuntimeError("generation failed")

    monkeypatch.setattr(pixart, "generate", boom)
    with pytest.raises(RuntimeError, match="generation failed"):
        run(pixart, get_method("rtn", weight_format="int4_g64", act_format="int4_g64"), cache, tmp_path / "x")
    assert not any(isinstance(m, QuantLinear) for m in pixart.transformer.modules())


class MeanAbsDiff(Metric):
    """Test metric: mean |image - reference| (records the prompts it saw)."""

    name: ClassVar[str] = "test-mad"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset] = frozenset({"reference", "prompts"})
    prompts_seen: ClassVar[list] = []

    def compute(self, inputs: MetricInputs) -> MetricResult:
        MeanAbsDiff.prompts_seen[:] = list(inputs.prompts)
        value = float((inputs.images - inputs.reference).abs().mean())
        return MetricResult(self.name, value, len(inputs.images), higher_is_better=False)


@pytest.fixture
def test_metric():
    METRICS.register(MeanAbsDiff.name, MeanAbsDiff)
    yield MeanAbsDiff.name
    METRICS.unregister(MeanAbsDiff.name)


class Recorder:
    def __init__(self):
        self.stages, self.done = [], {}

    def stage(self, name, total=None):
        self.stages.append((name, total))
        self.done[name] = 0

    def advance(self, n=1):
        self.done[self.stages[-1][0]] += n


def test_metrics_and_progress(pixart, cache, tmp_path, test_metric):
    progress = Recorder()
    method = StatsRTN(weight_format="int8_pc", act_format="int8_pc")
    result = run(pixart, method, cache, tmp_path / "m", metrics=[test_metric], progress=progress)
    mad = result.metrics[test_metric]
    assert mad.status == "ok" and mad.n == 6 and 0 < mad.value < 0.05
    assert MeanAbsDiff.prompts_seen == list(PROMPTS.prompts)
    n_layers = len(select_layers(pixart.transformer).layers)
    assert progress.stages == [("reference", 6), ("calibrate", 2), ("quantize", n_layers), ("generate", 6),
                               ("metrics", 1)]
    assert progress.done == {"reference": 6, "calibrate": 2, "quantize": n_layers, "generate": 6, "metrics": 1}
    assert set(result.timings) == {"reference", "calibrate", "quantize", "generate", "metrics", "total"}
    assert result.timings["total"] >= sum(v for k, v in result.timings.items() if k != "total")
    reference = run(pixart, None, cache, tmp_path / "r", metrics=[test_metric]).metrics[test_metric]
    assert reference.status == "not_computed" and reference.value is None  # not scored against itself
    assert reference.reason == "the 16-bit reference is not compared with itself"
    with pytest.raises(UserError, match="unknown metric"):
        run(pixart, None, cache, tmp_path / "u", metrics=["no-such-metric"])


def test_image_folder_and_index(pixart, tmp_path):
    images = generate_images(pixart, PROMPTS, SETTINGS, tmp_path / "imgs").load(uint8=False)
    assert torch.equal(load_images(tmp_path / "imgs"), images)
    assert torch.equal(images, (images * 255).round() / 255)  # exactly the 8-bit values saved
    index = read_index(tmp_path / "imgs")
    assert index == json.loads((tmp_path / "imgs" / "index.json").read_text())
    assert [e["key"] for e in index] == list(PROMPTS.keys) and [e["seed"] for e in index] == [
        seed_for(k) for k in PROMPTS.keys]
    assert {e["file"] for e in index} == {p.name for p in (tmp_path / "imgs").glob("*.png")}
    assert set(index[0]) == {"index", "key", "prompt", "seed", "file", "bytes", "sha256"}
    with pytest.raises(UserError, match=r"index\.json"):
        load_images(tmp_path)


def test_model_bytes_on_meta_full_config():
    """Dry-run accounting on the full PixArt-Sigma transformer (meta device, no weights)."""
    model = build_transformer("pixart-sigma")
    sel = select_layers(model)
    total = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    layer_elems = sum(layer.weight.numel() + layer.bias.numel() for layer in sel.layers.values())
    assert model_bytes(16 * layer_elems, other_elements(model, sel.layers)) == 2 * total
    assert model_bytes(0, other_elements(model, sel.layers)) == 2 * (total - layer_elems)
