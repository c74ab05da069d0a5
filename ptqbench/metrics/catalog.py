"""Catalog of built-in metrics: importing a module registers its metrics.

Heavy libraries (lpips, clean-fid, transformers' CLIP and BLIP, EfficientNet) are imported only
when a metric computes, so listing metrics stays fast and an optional package never breaks the
install. The papers' metric set (deepcompressor's): against the prompt, ``clip_score``,
``clip_iqa``, ``image_reward``; against real images, ``fid``; against the 16-bit images, ``psnr``,
``ssim``, ``lpips``, ``fid_ref``.
"""

from ptqbench.metrics import clip_metrics, fid, fmnist_metrics, image_reward, kid, lpips_metric, pixel  # noqa: F401
