"""Paired pixel metrics against the 16-bit reference image with the same index (same prompt, same seed).

Both are computed per image in float64 on ``MetricInputs.device``, in chunks, then averaged;
``n`` is the number of image pairs and the per-image values are kept (``MetricResult.per_image``).
Images are ``[N, 3, H, W]`` in [0, 1] (data range 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F

from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, image_floats, register_metric

MAX_PSNR_DB = 100.0
"""PSNR of an image identical to its reference (MSE 0, +inf) is reported as this cap (MSE floor 1e-10),
so means stay finite. Real 8-bit differences never come near it (one grey level everywhere is 48.1 dB)."""

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CHUNK = 8


def paired_problem(inputs: MetricInputs) -> str | None:
    """Why images and reference cannot be paired index by index, or None."""
    a, b = inputs.stored(), inputs.stored("reference")
    if b is None:
        return "no reference images"
    if a.shape != b.shape:
        return f"images {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape; pairs need equal shapes"
    if a.ndim != 4 or a.shape[0] == 0:
        return f"images must be a non-empty [N, C, H, W] batch, got {tuple(a.shape)}"
    return None


def _chunks(inputs: MetricInputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images, reference = inputs.stored(), inputs.stored("reference")
    assert reference is not None
    for i in range(0, inputs.n, CHUNK):
        yield (
            image_floats(images[i : i + CHUNK], inputs.device, torch.float64),
            image_floats(reference[i : i + CHUNK], inputs.device, torch.float64),
        )


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image ``[N, C, H, W]`` (data range 1), capped at :data:`MAX_PSNR_DB`."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(10.0 ** (-MAX_PSNR_DB / 10.0)))


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


def blur_valid_torch(t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable correlation of ``[N, C, H, W]`` with ``window`` on both axes, valid region only (conv2d)."""
    n, c, h, w = t.shape
    k = window.numel()
    flat = t.reshape(n * c, 1, h, w)
    out = F.conv2d(F.conv2d(flat, window.view(1, 1, k, 1)), window.view(1, 1, 1, k))
    return out.reshape(n, c, h - k + 1, w - k + 1)


def blur_valid_scipy(t: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The same as :func:`blur_valid_torch` through ``scipy.ndimage`` (several times faster in float64 on a CPU)."""
    from scipy.ndimage import correlate1d

    r = window.numel() // 2
    wn = window.cpu().numpy()
    out = correlate1d(correlate1d(t.numpy(), wn, axis=-2, mode="reflect"), wn, axis=-1, mode="reflect")
    return torch.from_numpy(out[..., r:-r, r:-r].copy())


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each image ``[N, C, H, W]`` (data range 1), averaged over channels.

    Wang et al. (2004): Gaussian window sigma 1.5 (11x11, truncated at 3.5 sigma), K1 0.01, K2 0.03,
    population covariances, and the mean over the valid region (borders of 5 px dropped). This is
    exactly ``skimage.metrics.structural_similarity(..., channel_axis=0, data_range=1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` per image.
    """
    x, y = images.double(), reference.double()
    w = _gaussian_window(x.dtype, x.device)
    k = w.numel()
    if min(x.shape[-2:]) < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels, got {tuple(x.shape[-2:])}")
    valid = blur_valid_scipy if x.device.type == "cpu" else blur_valid_torch

    def blur(t: torch.Tensor) -> torch.Tensor:
        return valid(t, w)

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


class _PairedMetric(Metric):
    needs: ClassVar[frozenset[Need]] = frozenset({"reference"})
    per_image: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    def compute(self, inputs: MetricInputs) -> MetricResult:
        problem = paired_problem(inputs)
        if problem:
            return MetricResult.missing(self, f"{self.name}: {problem}")
        try:
            with torch.inference_mode():
                values = torch.cat([self.per_image(a, b).cpu() for a, b in _chunks(inputs)])
        except ValueError as err:
            return MetricResult.missing(self, f"{self.name}: {err}")
        return MetricResult.of_images(self, values)


@register_metric
class PSNR(_PairedMetric):
    """PSNR (dB) vs the 16-bit image of the same seed, per image, data range [0,1], then mean; capped at 100 dB."""

    name = "psnr"
    higher_is_better = True
    per_image = staticmethod(psnr_per_image)


@register_metric
class SSIM(_PairedMetric):
    """SSIM vs the 16-bit image of the same seed (Gaussian 11x11 window, sigma 1.5, RGB mean), then mean."""

    name = "ssim"
    higher_is_better = True
    per_image = staticmethod(ssim_per_image)
