"""Calibration speed of LoRaQ and SVDQuant on PixArt-Sigma's 280 targeted linear layers (GPU).

    PYTHONPATH=. python benchmarks/bench_methods.py --out $OUT/methods.json
    PYTHONPATH=. python benchmarks/bench_methods.py --small --device cpu --out /tmp/methods.json

Layers: the 280 attention/FFN linears PixArt-Sigma quantizes (224 of 1152x1152, 28 of
1152->4608, 28 of 4608->1152) with seeded random bf16 weights (timing does not depend on weight
values), or ``--diffusers``: the real architecture from ``PixArtTransformer2DModel.from_config``
(random init) with ptqbench's default skip list. Calibration statistics for the searches are
synthetic: ``--rows`` Gaussian tokens per layer with a few outlier channels (x20).

Runs (each after a warm-up on a few layers, timed with CUDA synchronization):
- ``loraq``: rank 62, mxfp4 main, mxfp8 branch, default steps, data-free, all layers;
- ``loraq_init``: the same with 0 steps (SVD init + build), so per-step cost = difference / steps;
- ``svdquant_search``: int4_g64 W4A4, rank 32, bf16 branch, 39-candidate smoothing search on
  the sampled tokens with branch and activation quantization in place;
- ``svdquant_datafree``: SVD + quantized residual only;
- ``loraq_smoothed`` (``--all``): LoRaQ after the smoothing search.
Prints a table and writes JSON (timings, mean/max relative weight errors, versions, device).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptqbench import get_method
from ptqbench.layers import dense_weight
from ptqbench.methods.loraq import DEFAULT_STEPS
from ptqbench.stats import LayerStats

PIXART_SIGMA = {
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152, "dropout": 0.0,
    "in_channels": 4, "interpolation_scale": 2, "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 128,
    "upcast_attention": False, "use_additional_conditions": False,
}


def synthetic_layers(blocks: int, hidden: int, ffn: int, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """PixArt's per-block targets: self/cross attention q, k, v, out and FFN up/down, seeded."""
    shapes = {}
    for b in range(blocks):
        for attn in ("attn1", "attn2"):
            for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"transformer_blocks.{b}.{attn}.{leaf}"] = (hidden, hidden)
        shapes[f"transformer_blocks.{b}.ff.net.0.proj"] = (ffn, hidden)
        shapes[f"transformer_blocks.{b}.ff.net.2"] = (hidden, ffn)
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name, (out, inp) in shapes.items():
        layer = nn.Linear(inp, out, device="meta")
        layer.weight = nn.Parameter((torch.randn(out, inp, generator=gen) / inp**0.5).to(device, dtype), False)
        layer.bias = nn.Parameter((torch.randn(out, generator=gen) * 0.02).to(device, dtype), False)
        layers[name] = layer
    return layers


def diffusers_layers(device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    from diffusers import PixArtTransformer2DModel

    from ptqbench.patching import select_layers

    model = PixArtTransformer2DModel.from_config(PIXART_SIGMA).to(device, dtype)
    model.requires_grad_(False)
    return select_layers(model).layers


def synthetic_stats(layers: dict[str, nn.Module], rows: int, seed: int = 0) -> dict[str, LayerStats]:
    """``rows`` Gaussian tokens per layer, 1% of channels scaled x20 (activation outliers)."""
    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for name, layer in layers.items():
        n = dense_weight(layer).shape[1]
        x = torch.randn(rows, n, generator=gen)
        outliers = torch.randperm(n, generator=gen)[: max(1, n // 100)]
        x[:, outliers] *= 20.0
        stats[name] = LayerStats(absmax=x.abs().amax(0) * 1.2, rows=x, count=rows * 16)
    return stats


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weight_errors(layers: dict[str, nn.Module], quantized: dict) -> tuple[float, float]:
    errors = []
    with torch.no_grad():
        for name, q in quantized.items():
            w = dense_weight(layers[name]).float()
            errors.append(float(torch.linalg.norm(w - q.effective_weight()) / torch.linalg.norm(w)))
    return statistics.fmean(errors), max(errors)


def timed(method, layers, stats, device: str, repeat: int) -> tuple[float, list[float], dict]:
    times = []
    quantized = {}
    for _ in range(repeat):
        quantized = {}
        sync(device)
        start = time.perf_counter()
        quantized = method.quantize_layers(layers, stats)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, quantized


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="2 tiny blocks (hidden 64, ffn 256): a quick CPU check")
    parser.add_argument("--diffusers", action="store_true", help="layers of the real PixArt-Sigma architecture")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="LoRaQ steps (default: LoRaQ's default)")
    parser.add_argument("--rows", type=int, default=256, help="sampled tokens per layer for the searches")
    parser.add_argument("--repeat", type=int, default=1, help="timed repetitions per run (median reported)")
    parser.add_argument("--all", action="store_true", help="also LoRaQ after the smoothing search")
    args = parser.parse_args(argv)

    dtype = torch.bfloat16
    if args.small:
        layers = synthetic_layers(2, 64, 256, args.device, dtype)
        lowrank = {"loraq": 8, "svdquant": 4}
    elif args.diffusers:
        layers = diffusers_layers(args.device, dtype)
        lowrank = {"loraq": 62, "svdquant": 32}
    else:
        layers = synthetic_layers(28, 1152, 4608, args.device, dtype)
        lowrank = {"loraq": 62, "svdquant": 32}
    shapes = Counter(f"{dense_weight(m).shape[1]}->{dense_weight(m).shape[0]}" for m in layers.values())
    stats = synthetic_stats(layers, args.rows)
    mx = {"weight_format": "mxfp4", "act_format": "mxfp4", "branch_format": "mxfp8_e4m3",
          "branch_act_format": "mxfp8_e4m3"}
    int4 = {"weight_format": "int4_g64", "act_format": "int4_g64"}
    runs = [
        ("loraq", get_method("loraq", **mx, rank=lowrank["loraq"], steps=args.steps, patience=0), None),
        ("loraq_init", get_method("loraq", **mx, rank=lowrank["loraq"], steps=0), None),
        ("svdquant_search", get_method("svdquant", **int4, rank=lowrank["svdquant"], rows=args.rows), stats),
        ("svdquant_datafree", get_method("svdquant", **int4, rank=lowrank["svdquant"]), None),
    ]
    if args.all:
        runs.append(("loraq_smoothed", get_method("loraq", **mx, rank=lowrank["loraq"], steps=args.steps, patience=0),
                     stats))

    warm = dict(list(layers.items())[:3])
    for _, method, st in runs:  # warm-up: kernels, cuBLAS/cuSOLVER handles, allocator
        method.quantize_layers(warm, None if st is None else {k: st[k] for k in warm})
    sync(args.device)

    results = []
    for name, method, st in runs:
        seconds, times, quantized = timed(method, layers, st, args.device, args.repeat)
        err_mean, err_max = weight_errors(layers, quantized)
        del quantized
        results.append({"run": name, "label": method.label(), "seconds": seconds, "times": times,
                        "layers": len(layers), "rel_weight_error_mean": err_mean, "rel_weight_error_max": err_max,
                        "params": {k: str(v) for k, v in method.params().items()}})
        print(f"{name:18s} {seconds:8.2f} s  weight err mean {err_mean:.4f} max {err_max:.4f}  {method.label()}",
              flush=True)
    by = {r["run"]: r for r in results}
    per_step = (by["loraq"]["seconds"] - by["loraq_init"]["seconds"]) / max(args.steps, 1)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "layers": len(layers),
        "shapes": dict(shapes), "mode": "small" if args.small else ("diffusers" if args.diffusers else "synthetic"),
        "steps": args.steps, "rows": args.rows, "loraq_seconds_per_step": per_step, "runs": results,
    }
    print(f"{len(layers)} layers {dict(shapes)}; LoRaQ {per_step * 1000:.1f} ms per step over all layers")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
