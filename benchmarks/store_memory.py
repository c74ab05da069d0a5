"""Peak host memory of a cell's images vs the number of prompts: generation streams to disk, metrics read in chunks.

A stand-in pipeline (seeded noise images at ``--resolution``, no model) generates ``n`` images
through :func:`ptqbench.generation.generate_images` into a folder, then PSNR and SSIM are scored
from that folder against a second one (the "reference") through :meth:`MetricInputs.from_folders`.
Prints the peak resident set size above the baseline after imports, for each stage, as JSON::

    python benchmarks/store_memory.py --n 16 --resolution 512      # one measurement
    python benchmarks/store_memory.py --compare 16 64 --resolution 512   # n and 4n in fresh processes

Peak RSS is read from ``/proc/self/status`` (VmHWM), reset between stages (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):  # not every kernel lets a process reset its peak
        Path("/proc/self/clear_refs").write_text("5")


class NoisePipeline:
    """Images of seeded uniform noise: what a pipeline returns, at any size, without a model."""

    def __init__(self) -> None:
        self.transformer = nn.Linear(1, 1)
        self.device = torch.device("cpu")

    def generate(self, prompts, seeds, settings, progress=None):
        r = settings.resolution
        return torch.stack([torch.rand(3, r, r, generator=torch.Generator().manual_seed(s)) for s in seeds])


def measure(n: int, resolution: int, batch_size: int) -> dict[str, float]:
    from ptqbench.generation import generate_images
    from ptqbench.metrics.base import MetricInputs, get_metric
    from ptqbench.models.base import GenSettings
    from ptqbench.prompts import PromptSet

    torch.set_num_threads(1)
    prompts = PromptSet("noise", tuple(f"k{i}" for i in range(n)), tuple(f"prompt {i}" for i in range(n)))
    other = PromptSet("noise", tuple(f"r{i}" for i in range(n)), prompts.prompts)
    settings = GenSettings(steps=1, guidance=1.0, resolution=resolution, batch_size=batch_size)
    pipe = NoisePipeline()
    with tempfile.TemporaryDirectory() as tmp:
        generate_images(pipe, other, settings, Path(tmp) / "ref")
        get_metric("psnr"), get_metric("ssim")  # imports done before the baseline
        _reset_peak()
        base = _peak_kib()
        _reset_peak()
        generate_images(pipe, prompts, settings, Path(tmp) / "img")
        gen = _peak_kib() - base
        _reset_peak()
        inputs = MetricInputs.from_folders(Path(tmp) / "img", Path(tmp) / "ref")
        values = {m: get_metric(m)(inputs).value for m in ("psnr", "ssim")}
        score = _peak_kib() - base
    image_mib = 3 * resolution**2 / 2**20
    return {"n": n, "resolution": resolution, "batch_size": batch_size, "image_mib": image_mib,
            "all_images_uint8_mib": n * image_mib, "generate_peak_mib": gen / 1024, "score_peak_mib": score / 1024,
            "psnr": values["psnr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--compare", type=int, nargs=2, metavar=("N1", "N2"),
                        help="measure both, each in a fresh process")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if not args.compare:
        print(json.dumps(measure(args.n, args.resolution, args.batch_size)))
        return
    rows = []
    for n in args.compare:
        cmd = [sys.executable, __file__, "--n", str(n), "--resolution", str(args.resolution),
               "--batch-size", str(args.batch_size)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
