"""Wall time and peak memory per stage of one cell on N processes (``torchrun``): calibration
(data-parallel), quantization (layer-parallel), generation (data-parallel), for the 16-bit model,
SVDQuant (its defaults: deepcompressor's INT4 W4A4 with shifted FFN inputs, q/k/v fused, exact
float64 SVD; scoring on ``--rows`` sampled rows per layer) and LoRaQ (W4A4 mxfp4 with the W4A8
branch: mxfp4 weights, mxfp8_e4m3 activations, rank 108), one calibration per method.

The full PixArt-Sigma transformer from its released config with seeded random weights (no
download), 1024 px, 20-step DPM-Solver++ with classifier-free guidance, CUDA graphs for generation
(as the runner generates). Prompt ``i`` is a seeded random caption embedding and seeded latents
(``benchmarks/bench_generation.py``'s sampler); generation stops at the latents (**no text encoder,
no VAE**). Each stage runs the library's own distributed code (:mod:`ptqbench.distributed`): every
rank takes whole batches (``batch_share``), calibration statistics are reduced exactly
(``StatsCollector.result``), quantization is ``patching.quantize_model`` (families of layers
balanced by cost over the ranks, the quantized layers shared with every rank). A stage's seconds
are between barriers. Memory: each rank's peak GPU allocation during the stage
(``torch.cuda.max_memory_allocated`` after a reset) and its process's peak host RSS so far
(``ru_maxrss``). The latents of all prompts are gathered on rank 0 and hashed: the hashes must not
depend on N (the 1-vs-N equivalence).

    python benchmarks/bench_scaling.py --device cuda --out scaling_1.json                      # one GPU
    torchrun --nproc-per-node 2 benchmarks/bench_scaling.py --device cuda --out scaling_2.json
    python benchmarks/bench_scaling.py --compare scaling_1.json scaling_2.json scaling_4.json  # speed-up table
    torchrun --nproc-per-node 2 benchmarks/bench_scaling.py --small --out /tmp/s.json          # CPU (gloo) smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import sample  # the benchmarks' shared sampler

from ptqbench import distributed as dist
from ptqbench.cudagraph import cuda_graphs
from ptqbench.method import Method, get_method
from ptqbench.models import diffusers_models as dm
from ptqbench.patching import quantize_model, restore_model, select_layers
from ptqbench.stats import StatsCollector

METHODS: dict[str, Callable[[dict[str, Any]], Method]] = {  # label -> the method, given overrides
    "svdquant": lambda kw: get_method("svdquant", **kw),
    "loraq-w4a8": lambda kw: get_method(
        "loraq", **{"weight_format": "mxfp4", "act_format": "mxfp4", "rank": 108, "branch_format": "mxfp4",
                    "branch_act_format": "mxfp8_e4m3", **kw},
    ),
}  # fmt: skip
SMALL = {"svdquant": {"rank": 8, "num_grids": 2, "num_iters": 2}, "loraq-w4a8": {"rank": 8, "steps": 3}}  # --small


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="JSON file for the results (rank 0 writes it)")
    parser.add_argument("--compare", type=Path, nargs="+", help="result files of 1, 2, ... processes: print speed-ups")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny-pixart's transformer, ranks 8 (CPU smoke test)")
    parser.add_argument("--prompts", type=int, default=256, help="generated images per variant")
    parser.add_argument("--calib-prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="images per batch (the suites' batch_size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--tokens", type=int, default=300, help="caption tokens")
    parser.add_argument("--rows", type=int, default=256, help="sampled calibration rows per layer")
    parser.add_argument("--variants", nargs="+", default=["16-bit", *METHODS], choices=["16-bit", *METHODS])


def prompt_inputs(model: nn.Module, indices: list[int], tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Latents and ``[uncond; cond]`` caption embeddings of prompts ``indices`` (each seeded by its index)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    latents, conds = [], []
    for i in indices:
        g = torch.Generator().manual_seed(i)
        latents.append(torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g))
        conds.append(torch.randn(1, tokens, cfg.caption_channels, generator=g))
    uncond = torch.randn(len(indices), tokens, cfg.caption_channels, generator=torch.Generator().manual_seed(2**31 - 1))
    captions = torch.cat([uncond, *conds])
    return torch.cat(latents).to(device, dtype), captions.to(device, dtype)


def batches(n: int, batch: int) -> Iterator[list[int]]:
    """This rank's whole batches of prompts ``0..n-1`` (the batches one process would run)."""
    mine = dist.batch_share(n, batch)
    for start in range(0, len(mine), batch):
        yield mine[start : start + batch]


@contextmanager
def stage(record: dict[str, Any], name: str, device: torch.device) -> Iterator[None]:
    """Time a stage between barriers; every rank's peak GPU allocation and peak host RSS."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    mine = {
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    every = dist.all_gather_object(mine)
    record[name] = {"seconds": seconds, **{k: [r[k] for r in every] for k in mine}}


def generate(model: nn.Module, name: str, args: argparse.Namespace, device: torch.device) -> str:
    """Every prompt's latents (this rank's batches, gathered), hashed in prompt order on every rank."""
    mine: dict[int, bytes] = {}
    with cuda_graphs(model, enabled=device.type == "cuda"):
        for batch in batches(args.prompts, args.batch):
            out = sample(model, name, *prompt_inputs(model, batch, args.tokens, device), args.steps, args.guidance)
            for i, lat in zip(batch, out.float().cpu(), strict=True):
                mine[i] = lat.numpy().tobytes()
    every: dict[int, bytes] = {}
    for part in dist.all_gather_object(mine):
        every.update(part)
    return hashlib.sha256(b"".join(every[i] for i in range(args.prompts))).hexdigest()


def calibrate(model: nn.Module, name: str, method: Method, args: argparse.Namespace, device: torch.device) -> dict:
    """The method's statistics over ``--calib-prompts`` prompts (every step), reduced over the ranks."""
    layers = select_layers(model).layers
    spec = method.stats_spec()
    with StatsCollector(layers, spec, seed=0) as collector, torch.no_grad():
        for batch in batches(args.calib_prompts, args.batch):
            collector.begin_batch(batch[0] // args.batch)
            # prompts after the generated ones: calibration never sees a generated prompt
            inputs = prompt_inputs(model, [args.prompts + i for i in batch], args.tokens, device)
            sample(model, name, *inputs, args.steps, args.guidance)
    return collector.result()


def run(args: argparse.Namespace) -> dict[str, Any]:
    world = dist.init(args.device)
    device = torch.device(f"cuda:{world.local_rank}" if args.device == "cuda" else "cpu")
    name = "pixart-sigma"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dm.build_transformer("tiny-pixart" if args.small else name, device, dtype).eval().requires_grad_(False)
    result: dict[str, Any] = {"processes": world.size, "backend": world.backend, "device": str(device),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                              "variants": {}}  # fmt: skip
    for label in args.variants:
        record: dict[str, Any] = {}
        report = None
        if label != "16-bit":
            method = METHODS[label]({"rows": args.rows, **(SMALL[label] if args.small else {})})
            with stage(record, "calibration", device):
                stats = calibrate(model, name, method, args, device)
            with stage(record, "quantization", device):
                report = quantize_model(model, method, stats)
            record["method"] = method.label()
        with stage(record, "generation", device):
            record["latents_sha256"] = generate(model, name, args, device)
        if report is not None:
            restore_model(model, report)
        result["variants"][label] = record
        if dist.is_main():
            print(label, {k: round(v["seconds"], 2) for k, v in record.items() if isinstance(v, dict)}, flush=True)
    return result


def compare(paths: list[Path]) -> list[str]:
    """Seconds, speed-up and efficiency per variant and stage against the run with the fewest
    processes, with the largest per-process peak GPU and host memory; and whether the latents agree."""
    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["processes"])
    base = runs[0]
    heads = " | ".join(f"{r['processes']} proc: s (speed-up, efficiency; peak per process)" for r in runs)
    lines = [f"| variant | stage | {heads} |"]
    lines.append("|---|---|" + "---|" * len(runs))
    for label, stages in base["variants"].items():
        for stage_name, one in stages.items():
            if not isinstance(one, dict):
                continue
            cells = []
            for r in runs:
                got = r["variants"][label][stage_name]
                speed = one["seconds"] / got["seconds"]
                scale = r["processes"] / base["processes"]
                memory = f"host {max(got['host_peak_rss_bytes']) / 2**30:.1f} GiB"
                if got["gpu_peak_bytes"][0] is not None:
                    memory = f"GPU {max(got['gpu_peak_bytes']) / 2**30:.1f} / {memory}"
                cells.append(f"{got['seconds']:.2f} ({speed:.2f}x, {speed / scale:.0%}; {memory})")
            lines.append(f"| {label} | {stage_name} | " + " | ".join(cells) + " |")
    hashes = {v: {r["variants"][v]["latents_sha256"] for r in runs} for v in base["variants"]}
    lines.append(f"latents identical across process counts: {all(len(h) == 1 for h in hashes.values())}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.compare:
        print("\n".join(compare(args.compare)))
        return 0
    if args.out is None:
        parser.error("--out is required (or --compare)")
    result = run(args)
    if dist.is_main():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
