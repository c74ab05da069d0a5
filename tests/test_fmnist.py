"""The shipped Fashion-MNIST DiT: data, classifier, training, pipeline, metrics (CPU)."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ptqbench import cli, get_method
from ptqbench.errors import UserError
from ptqbench.generation import to_uint8
from ptqbench.metrics.base import MetricInputs
from ptqbench.metrics.fmnist_metrics import FDFMNIST, ClassAccuracy, FDFMNISTRef, file_sha256
from ptqbench.models import fmnist, fmnist_data, get_model
from ptqbench.models.base import GenSettings
from ptqbench.models.fmnist_train import (
    ClassifierTrainConfig,
    DiTTrainConfig,
    evaluate_classifier,
    train_classifier,
    train_dit,
)
from ptqbench.patching import LayerPlan, quantize_model, restore_model, select_layers

HAVE_DATA = fmnist_data.available()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="Fashion-MNIST is not installed: apt install dataset-fashion-mnist (CI installs it)"
)
# The one condition that guards the tests of the shipped DiT: the weights come from the GPU run.
TINY = fmnist.DiTConfig(hidden=32, layers=1, head_dim=32, caption_channels=16)


def _train_slice(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    images, labels = fmnist_data.load_split("train")
    return images[:n], labels[:n]


@pytest.fixture(scope="module")
def tiny_run() -> object:
    """A tiny DiT trained for 60 steps on real images (shared by the training and pipeline tests)."""
    train = DiTTrainConfig(steps=60, batch_size=16, lr=3e-3, log_every=10, seed=3)
    return train_dit(*_train_slice(), TINY, train, torch.device("cpu"), log=lambda _: None)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((-10 * torch.log10(mse)).mean())


# ----------------------------------------------------------------------------- data


@needs_data
def test_reads_the_real_idx_files() -> None:
    train_x, train_y = fmnist_data.load_split("train")
    test_x, test_y = fmnist_data.load_split("test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    assert train_y[:5].tolist() == [9, 0, 0, 3, 0]  # ankle boot, t-shirt/top, t-shirt/top, dress, t-shirt/top
    assert 0.27 < test_x.mean() / 255 < 0.30 and test_x.max() == 255
    x = fmnist_data.to_model_space(test_x[:3])
    assert x.shape == (3, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., :, -2:] == -1)  # black padding


def _write_idx(path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_reader_and_missing_data_message(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, 2051, compress=True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 2049, compress=False)
    x, y = fmnist_data.load_split("test", tmp_path)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*dataset-fashion-mnist.*--data"):
        fmnist_data.load_split("train", tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 2051, compress=False)  # wrong magic
    with pytest.raises(UserError, match="magic 2051, expected 2049"):
        fmnist_data.load_split("test", tmp_path)
    assert fmnist_data.class_index(" Ankle Boot") == 9
    with pytest.raises(UserError, match="not a Fashion-MNIST class"):
        fmnist_data.class_index("a cat")


# ----------------------------------------------------------------------------- classifier


@needs_data
def test_shipped_classifier_reaches_its_recorded_accuracy() -> None:
    model, info = fmnist.load_classifier()
    assert info["test_accuracy"] >= 0.85 and info["test_n"] == 10000
    test_x, test_y = fmnist_data.load_split("test")
    acc = evaluate_classifier(model, test_x[:1000], test_y[:1000], torch.device("cpu"))
    assert acc >= 0.85 and abs(acc - info["test_accuracy"]) < 0.03
    # The DiT's 32x32 canvas (3 gray channels) classifies like the 28x28 image it pads.
    canvas = (fmnist_data.to_model_space(test_x[:200]) + 1) / 2
    p28, _ = fmnist.classify(model, fmnist_data.to_unit(test_x[:200]))
    p32, _ = fmnist.classify(model, canvas.repeat(1, 3, 1, 1))
    assert torch.equal(p28, p32)


@needs_data
def test_classifier_training_learns() -> None:
    cfg = ClassifierTrainConfig(epochs=1, batch_size=64, width=8, features=32)
    test = tuple(a[:500] for a in fmnist_data.load_split("test"))
    model, info = train_classifier(_train_slice(1500), test, cfg, torch.device("cpu"), log=lambda _: None)
    assert info["test_accuracy"] > 0.55  # 10 classes: chance is 0.1
    assert model.features(torch.rand(3, 1, 28, 28)).shape == (3, 32)


# ----------------------------------------------------------------------------- training


@needs_data
def test_training_is_deterministic_and_lowers_the_loss(tiny_run) -> None:
    losses = [loss for _, loss in tiny_run.loss_curve]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.6 * losses[0], losses
    again = train_dit(*_train_slice(), TINY, tiny_run.train, torch.device("cpu"), log=lambda _: None)
    assert again.loss_curve == tiny_run.loss_curve
    for (name, a), b in zip(tiny_run.transformer.state_dict().items(), again.transformer.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(tiny_run.tokens.table.weight, again.tokens.table.weight)


@needs_data
def test_train_default_command_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["train-default", "--out", str(out), "--steps", "4", "--hidden", "32", "--layers", "1", "--head-dim",
            "32", "--batch-size", "8", "--only", "dit", "--check-samples", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    import json

    log = json.loads((out / "fmnist_dit_train.json").read_text())
    assert log["steps"] == 4 and log["seed"] == 0 and log["config"]["hidden"] == 32
    assert log["loss_curve"][-1][0] == 4 and log["seconds"] > 0 and log["parameters"] > 0
    assert log["sample_check"]["n"] == 3 and 0.0 <= log["sample_check"]["class_accuracy"] <= 1.0
    _, _, config, info = fmnist.load_dit(out)
    assert config.hidden == 32 and info["steps"] == 4
    with safe_open(str(out / fmnist.DIT_FILE), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # noqa: SIM118
    assert cli.main(["train-default", "--out", str(out), "--data", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit")
    fmnist.save_dit(folder / fmnist.DIT_FILE, tiny_run.transformer, tiny_run.tokens, TINY, {"steps": 60})
    return get_model("fmnist-dit").load("cpu", path=str(folder))


@needs_data
def test_pipeline_generates_seeded_images(tiny_pipeline) -> None:
    pipe = tiny_pipeline
    assert pipe.dtype == torch.float32 and pipe.spec.defaults == GenSettings(20, 2.0, 32, 64)
    prompts, seeds = ["ankle boot", "T-shirt/top", "bag"], [11, 12, 11]
    done: list[int] = []
    a = pipe.generate(prompts, seeds, GenSettings(steps=4, guidance=2.0, resolution=32, batch_size=2), done.append)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and done == [2, 1]
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0.05
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])
    b = pipe.generate(prompts, seeds, GenSettings(steps=4, guidance=2.0, resolution=32, batch_size=3))
    assert torch.allclose(a, b, atol=1e-5)  # same seeds, other batching: same images
    assert (a[0] - a[2]).abs().mean() > 1e-3  # same noise, other class
    c = pipe.generate(prompts[:1], [12], GenSettings(steps=4, guidance=2.0, resolution=32, batch_size=2))
    assert (a[0] - c[0]).abs().mean() > 1e-2  # other noise
    with pytest.raises(UserError, match="not a Fashion-MNIST class"):
        pipe.generate(["a cat"], [0], GenSettings(steps=2, guidance=2.0, resolution=32))
    with pytest.raises(UserError, match="resolution 64"):
        pipe.generate(["bag"], [0], GenSettings(steps=2, guidance=2.0, resolution=64))


@needs_data
def test_pixart_layer_plan_applies(tiny_pipeline) -> None:
    transformer = tiny_pipeline.transformer
    sel = select_layers(transformer, LayerPlan.for_model(transformer))
    assert set(sel.layers) == {f"transformer_blocks.0.{n}" for n in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert "attn_add" in sel.skipped["transformer_blocks.0.attn2.to_k"]
    assert "output projection" in sel.skipped["proj_out"] and sel.skipped["caption_projection.linear_1"]
    settings = GenSettings(steps=3, guidance=2.0, resolution=32, batch_size=4)
    ref = tiny_pipeline.generate(["coat", "sandal"], [1, 2], settings)
    report = quantize_model(transformer, get_method("rtn", weight_format="mxfp4", act_format="mxfp4"))
    try:
        q = tiny_pipeline.generate(["coat", "sandal"], [1, 2], settings)
    finally:
        restore_model(transformer, report)
    assert len(report.quantized) == 8 and 0 < (q - ref).abs().mean() < 0.5  # the selection above
    assert torch.equal(tiny_pipeline.generate(["coat", "sandal"], [1, 2], settings), ref)


# ----------------------------------------------------------------------------- metrics


@needs_data
def test_metrics_on_real_images_and_noise() -> None:
    test_x, test_y = fmnist_data.load_split("test")
    real = fmnist_data.to_unit(test_x[:300]).repeat(1, 3, 1, 1)
    prompts = [fmnist_data.FMNIST_CLASSES[i] for i in test_y[:300]]
    acc = ClassAccuracy()(MetricInputs(real, prompts=prompts))
    assert acc.status == "ok" and acc.value >= 0.85 and acc.n == 300 and acc.higher_is_better
    shuffled = ClassAccuracy()(MetricInputs(real, prompts=prompts[1:] + prompts[:1]))
    assert shuffled.value < 0.4
    noise = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fd_real, fd_noise = FDFMNIST()(MetricInputs(real)), FDFMNIST()(MetricInputs(noise))
    assert fd_real.status == fd_noise.status == "ok" and not fd_real.higher_is_better and fd_real.n == 300
    assert math.isfinite(fd_real.value) and 0 <= fd_real.value < 0.2 * fd_noise.value
    other = ClassAccuracy()(MetricInputs(real[:2], prompts=["a red car", "bag"]))
    assert other.status == "not_computed" and "Fashion-MNIST class-name prompts" in other.reason


@needs_data
def test_fd_to_the_reference_images_grows_with_the_distortion() -> None:
    test_x, _ = fmnist_data.load_split("test")
    ref = to_uint8(fmnist_data.to_unit(test_x[:200]).repeat(1, 3, 1, 1))  # uint8, as the runner passes
    same = FDFMNISTRef()(MetricInputs(ref, ref))
    assert same.status == "ok" and abs(same.value) < 1e-3 and same.n == 200 and not same.higher_is_better
    g = torch.Generator().manual_seed(0)
    noisy = [to_uint8(ref / 255 + s * torch.randn(ref.shape, generator=g)) for s in (0.05, 0.3)]
    small, large = (FDFMNISTRef()(MetricInputs(x, ref)).value for x in noisy)
    assert 0.1 < small < large, (small, large)
    # uint8 and float inputs of the same images give the same value
    assert FDFMNIST()(MetricInputs(noisy[0])).value == FDFMNIST()(MetricInputs(noisy[0].float() / 255)).value
    alone = FDFMNISTRef()(MetricInputs(ref))
    assert alone.status == "not_computed" and "reference" in alone.reason


def test_metrics_say_what_is_missing(tmp_path) -> None:
    images = torch.rand(4, 3, 32, 32)
    absent = tmp_path / "absent.safetensors"
    acc = ClassAccuracy(classifier=absent)(MetricInputs(images, prompts=["bag"] * 4))
    assert acc.status == "not_computed" and acc.value is None and str(absent) in acc.reason
    assert "train-default" in acc.reason
    fd = FDFMNIST(classifier=absent)(MetricInputs(images))
    assert fd.status == "not_computed" and str(absent) in fd.reason
    # Another classifier than the shipped statistics were made with, and no data: the data is missing.
    torch.manual_seed(0)
    own = fmnist.save_classifier(tmp_path / "own.safetensors", fmnist.FMNISTClassifier(width=4, features=8), {})
    assert file_sha256(own) != file_sha256(fmnist.ASSETS / fmnist.CLASSIFIER_FILE)
    fd = FDFMNIST(classifier=own, data=tmp_path / "no-data")(MetricInputs(images))
    assert fd.status == "not_computed" and "dataset-fashion-mnist" in fd.reason and "--data" in fd.reason
    assert ClassAccuracy(classifier=own)(MetricInputs(images, prompts=["bag"] * 4)).status == "ok"


@needs_data
def test_feature_stats_of_another_classifier_are_computed_and_cached(tmp_path) -> None:
    torch.manual_seed(0)
    own = fmnist.save_classifier(tmp_path / "own.safetensors", fmnist.FMNISTClassifier(width=4, features=8), {})
    images = torch.rand(6, 3, 32, 32)
    first = FDFMNIST(classifier=own)(MetricInputs(images))
    second = FDFMNIST(classifier=own, data=tmp_path / "no-data")(MetricInputs(images))  # served from the cache
    assert first.status == second.status == "ok" and first.value == second.value and first.value > 0


# ----------------------------------------------------------------------------- the shipped DiT


@pytest.fixture(scope="module")
def shipped():
    """The shipped DiT and its images of two prompts per class at the main job's 8 steps."""
    pipe = get_model("fmnist-dit").load("cpu")
    prompts = [c for c in fmnist_data.FMNIST_CLASSES for _ in range(2)]
    seeds = list(range(len(prompts)))
    settings = GenSettings(steps=8, guidance=2.0, resolution=32, batch_size=len(prompts))
    return pipe, prompts, seeds, settings, pipe.generate(prompts, seeds, settings)


def test_shipped_dit_file() -> None:
    file = fmnist.ASSETS / fmnist.DIT_FILE
    assert file.stat().st_size <= 16_000_000
    transformer, tokens, config, info = fmnist.load_dit()
    assert config == fmnist.DiTConfig() and info["steps"] >= 1000 and info["final_loss"] < 0.2
    n = sum(p.numel() for p in transformer.parameters()) + tokens.table.weight.numel()
    assert n == info["parameters"] and 6.9e6 < n < 7.0e6


def test_shipped_dit_samples_are_recognized(shipped) -> None:
    _, prompts, _, _, images = shipped
    acc = ClassAccuracy()(MetricInputs(images, prompts=prompts))
    assert acc.value >= 0.8, acc


def test_shipped_dit_w8a8_closer_than_w4a4(shipped, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two images (the measured gap is ~25 dB: W8A8 ~52 dB, W4A4 ~27 dB); eager fake-quant, as
    # compiling the two formats for one short generation costs more than it saves.
    monkeypatch.setenv("PTQBENCH_COMPILE", "0")
    pipe, prompts, seeds, settings, images = shipped
    psnr = {}
    for label, fmt in (("w8a8", "int8_pc"), ("w4a4", "mxfp4")):
        report = quantize_model(pipe.transformer, get_method("rtn", weight_format=fmt, act_format=fmt))
        try:
            q = pipe.generate(prompts[:2], seeds[:2], settings)
        finally:
            restore_model(pipe.transformer, report)
        psnr[label] = _psnr(q, images[:2])
    assert psnr["w8a8"] > psnr["w4a4"] + 3.0 and psnr["w4a4"] > 12.0, psnr
