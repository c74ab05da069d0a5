"""Catalog of built-in metrics: importing a module registers its metrics.

Heavy libraries (lpips, clean-fid, ImageReward, EfficientNet) are imported only when a metric
computes, so listing metrics stays fast and an optional package never breaks the install.
"""

from ptqbench.metrics import fid, fmnist_metrics, image_reward, kid, lpips_metric, pixel  # noqa: F401
