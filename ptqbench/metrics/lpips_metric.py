"""LPIPS (AlexNet, v0.1) against the 16-bit reference image of the same seed.

The ``lpips`` package ships the v0.1 linear layers; the AlexNet backbone is torchvision's
ImageNet checkpoint ``alexnet-owt-7be5be79.pth``, found by :mod:`ptqbench.metrics.weights`
(``$PTQBENCH_LPIPS_ALEX``, ``$PTQBENCH_WEIGHTS``, the torch hub checkpoints folder) and checked
against its SHA-256 prefix. It is never downloaded: the network is built with a random-init
trunk and the located weights are loaded into it, so no code path reaches download.pytorch.org.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, ClassVar

import torch

from ptqbench.metrics import weights
from ptqbench.metrics.base import Metric, MetricInputs, MetricResult, Need, image_floats, register_metric
from ptqbench.metrics.pixel import paired_problem
from ptqbench.metrics.weights import Missing

if TYPE_CHECKING:
    import lpips

CHUNK = 8


def alexnet_state() -> dict[str, torch.Tensor] | Missing:
    """torchvision's AlexNet ImageNet state dict from the located file, or why it is missing."""
    found = weights.locate(weights.ALEXNET)
    if isinstance(found, Missing):
        return found
    return torch.load(found, map_location="cpu", weights_only=True)


def build_lpips(alexnet: dict[str, torch.Tensor]) -> lpips.LPIPS:
    """The LPIPS v0.1 AlexNet network with the given torchvision AlexNet weights as its trunk."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits alexnet.features into slices that keep the feature indices: slice2.3.weight = features.3.weight.
    trunk = {}
    for key in net.net.state_dict():
        _, index, param = key.split(".")
        source = f"features.{index}.{param}"
        if source not in alexnet:
            raise KeyError(f"not a torchvision AlexNet state dict: no {source!r}")
        trunk[key] = alexnet[source]
    net.net.load_state_dict(trunk, strict=True)
    return net.eval().requires_grad_(False)


@register_metric
class LPIPS(Metric):
    """LPIPS (AlexNet, v0.1) vs the 16-bit image of the same seed, inputs [0,1] scaled to [-1,1], then mean."""

    name = "lpips"
    higher_is_better = False
    needs: ClassVar[frozenset[Need]] = frozenset({"reference"})
    weight_files: ClassVar[tuple[weights.WeightSpec, ...]] = (weights.ALEXNET,)

    def __init__(self) -> None:
        self._nets: dict[str, lpips.LPIPS] = {}

    def network(self, device: str) -> lpips.LPIPS | Missing:
        if device not in self._nets:
            state = alexnet_state()
            if isinstance(state, Missing):
                return state
            try:
                self._nets[device] = build_lpips(state).to(device)
            except (KeyError, RuntimeError) as err:
                return Missing(f"{weights.ALEXNET.filename} did not load into LPIPS's AlexNet: {err}")
        return self._nets[device]

    def compute(self, inputs: MetricInputs) -> MetricResult:
        problem = paired_problem(inputs)
        if problem:
            return MetricResult.missing(self, f"{self.name}: {problem}")
        net = self.network(inputs.device)
        if isinstance(net, Missing):
            return MetricResult.missing(self, f"{self.name}: {net.reason}")
        images, reference = inputs.stored(), inputs.stored("reference")
        assert reference is not None
        values = []
        with torch.inference_mode():
            for i in range(0, inputs.n, CHUNK):
                a = image_floats(images[i : i + CHUNK], inputs.device)
                b = image_floats(reference[i : i + CHUNK], inputs.device)
                values.append(net(a, b, normalize=True).flatten().double().cpu())
        return MetricResult.of_images(self, torch.cat(values))
