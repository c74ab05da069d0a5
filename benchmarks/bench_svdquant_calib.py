"""SVDQuant calibration time on the full PixArt-Sigma layer shapes, against its FLOP floor.

The quantized layers of the model's transformer (its config on the meta device, deepcompressor's
skip list: cross-attention ``to_k``/``to_v`` stay 16-bit) get random weights and synthetic
calibration rows (heavy-tailed channel scales; post-GELU rows for the FFN down-projections).
Each transformer block is calibrated as the runner would (``quantize_layers`` on the block's
layers: same-shape units batched, q/k/v fused) with all ``--rows`` rows, then with each
``--subsample`` size (a seeded subset of the rows; abs-max still from all rows, as calibration
computes it), and the script prints:

- the FLOP floor of the matrix products the search and the refinement must do on the rows: per
  unit (``M`` outputs, ``n`` inputs, rank ``r``, ``N`` rows), ``x W^T`` once (``2 N n M``) and,
  per candidate and per evaluated iterate, ``Qa(x/s) Q1^T`` (``2 N n M``) plus the branch
  (``2 N r (n + M)``); SVDs and quantization are not counted. Converted to seconds at
  ``--tflops`` (default: H200 dense bf16, 989 TFLOP/s);
- the measured time and the ratio to the floor;
- per subsample size, the fraction of layers whose chosen (alpha, beta) pair, refinement
  iterate, and both, equal the all-rows choice;
- the seconds of one SVD per unit shape (SVDs are outside the floor; the search does one per
  candidate and per evaluated iterate). The report is printed (and ``--out`` written) after
  every run (one block at one size), so a run cut short still leaves its numbers.

  GPU (the native size: 128 calibration samples x 4096 tokens = 524288 rows):
      python benchmarks/bench_svdquant_calib.py --device cuda --out svdq_calib.json
  CPU smoke test (tiny PixArt config):
      python benchmarks/bench_svdquant_calib.py --small --device cpu --rows 512 --subsample 64 256
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ptqbench import get_method
from ptqbench.layers import dense_weight
from ptqbench.memory import qkv_group
from ptqbench.patching import LayerPlan, select_layers
from ptqbench.stats import LayerStats

NATIVE_ROWS = 128 * 4096  # deepcompressor: 128 cached transformer calls (quant.calib.num_samples) x 4096 tokens
DEEPCOMPRESSOR_SKIPS = ("*attn2.to_k", "*attn2.to_v")  # cross-attention k/v are its "attn_add" (skipped)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pixart-sigma")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="the model's dtype")
    p.add_argument("--rows", type=int, default=NATIVE_ROWS, help="calibration rows per layer input (all rows)")
    p.add_argument("--subsample", type=int, nargs="*", default=[256, 1024, 4096, 16384, 65536])
    p.add_argument("--layers", type=int, default=0, help="calibrate only the first L quantized layers (0: all)")
    p.add_argument("--format", default="int4_g64", help="main weight and activation format")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--num-grids", type=int, default=20)
    p.add_argument("--num-iters", type=int, default=100)
    p.add_argument("--svd", default="exact", choices=("exact", "randomized", "auto"))
    p.add_argument("--tflops", type=float, default=989.0, help="GPU dense bf16 rate for the floor (TFLOP/s)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (changes rounding)")
    p.add_argument("--small", action="store_true", help="tiny PixArt config (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def model_layers(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Name -> (out, in) of the layers SVDQuant quantizes, from the config on the meta device."""
    import diffusers

    from ptqbench.models.diffusers_models import TINY_PIXART, build_transformer

    if args.small:
        with torch.device("meta"):
            model = diffusers.PixArtTransformer2DModel.from_config(TINY_PIXART["transformer"])
    else:
        model = build_transformer(args.model, "meta")
    selection = select_layers(model, LayerPlan.for_model(model, exclude=DEEPCOMPRESSOR_SKIPS))
    shapes = {name: tuple(int(d) for d in dense_weight(layer).shape) for name, layer in selection.layers.items()}
    names = list(shapes)[: args.layers or None]
    return {name: shapes[name] for name in names}


def blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Layers by transformer block (``transformer_blocks.<i>``), in model order."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(".".join(name.split(".")[:2]), []).append(name)
    return out


def synthetic_block(
    shapes: dict[str, tuple[int, int]], names: list[str], args: argparse.Namespace, dtype: torch.dtype, index: int
) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """Random layers and calibration rows of one block; layers of one q/k/v group share their rows."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + index)
    layers, rows = {}, {}
    for name in names:
        m, n = shapes[name]
        col = torch.exp(0.5 * torch.randn(n, generator=g, device=device))
        layer = nn.Linear(n, m, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(m, n, generator=g, device=device) * col / n**0.5)
        layers[name] = layer
        key = qkv_group(name) or name
        if key not in rows:
            scale = torch.exp(1.5 * torch.randn(n, generator=g, device=device))
            x = torch.randn(args.rows, n, generator=g, device=device) * scale
            x = nn.functional.gelu(x) if name.endswith("ff.net.2") else x
            rows[key] = x.to(dtype).float()
    return layers, {name: rows[qkv_group(name) or name] for name in names}


def calibrate(method, layers, rows: dict[str, torch.Tensor], absmax: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """SVDQuant on one block; (info per layer, seconds)."""
    stats, seen = {}, {}
    for name, x in rows.items():
        key = id(x)
        if key not in seen:  # one LayerStats per input, so fused q/k/v are recognized as one input
            seen[key] = LayerStats(absmax=absmax[name], rows=x, count=x.shape[0])
        stats[name] = seen[key]
    sync(layers)
    start = time.perf_counter()
    out = method.quantize_layers(layers, stats)
    sync(layers)
    return {name: q.info for name, q in out.items()}, time.perf_counter() - start


def sync(layers: dict[str, nn.Module]) -> None:
    sync_device(next(iter(layers.values())).weight)


def floor_flops(shapes: dict[str, tuple[int, int]], names: list[str], info: dict, args, n_rows: int) -> float:
    """Matrix-product FLOPs on the rows the search and refinement must do (see the module docstring)."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(qkv_group(name) or name, []).append(name)
    total = 0.0
    candidates = 2 * args.num_grids - 1
    for members in units.values():
        n = shapes[members[0]][1]
        m = sum(shapes[k][0] for k in members)
        best = int(info[members[0]]["best_iteration"])
        iterates = min(best + 1, args.num_iters)  # early stop evaluates one iterate past the best
        per_score = 2 * n_rows * n * m + 2 * n_rows * args.rank * (n + m)
        total += 2 * n_rows * n * m + (candidates + iterates) * per_score
    return total


def run(args: argparse.Namespace) -> dict:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = model_layers(args)
    method = get_method(
        "svdquant", weight_format=args.format, act_format=args.format, rank=args.rank,
        num_grids=args.num_grids, num_iters=args.num_iters, svd=args.svd, rows="all",
    )
    sizes = [k for k in args.subsample if k < args.rows]
    results = {"all": {"seconds": 0.0, "flops": 0.0}} | {k: {"seconds": 0.0, "flops": 0.0} for k in sizes}
    choices: dict[object, dict[str, tuple]] = {key: {} for key in results}
    svd_seconds = svd_probe(shapes, list(shapes), args)
    out: dict = {}
    for index, names in enumerate(blocks(list(shapes)).values()):
        layers, rows = synthetic_block(shapes, names, args, dtype, index)
        absmax = {name: x.abs().amax(0) for name, x in rows.items()}
        perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(args.seed + index))
        if index == 0:  # warm-up (kernel compilation, allocator), not timed
            few = {id(x): x[: min(64, args.rows)] for x in rows.values()}
            calibrate(method, layers, {name: few[id(x)] for name, x in rows.items()}, absmax)
        for key in results:
            if key == "all":
                picked, n_rows = rows, args.rows
            else:
                keep = perm[:key].to(args.device)
                subsets = {id(x): x[keep] for x in rows.values()}
                picked, n_rows = {name: subsets[id(x)] for name, x in rows.items()}, key
            info, seconds = calibrate(method, layers, picked, absmax)
            results[key]["seconds"] += seconds
            results[key]["flops"] += floor_flops(shapes, names, info, args, n_rows)
            choices[key].update({name: (i["smooth_pair"], i["best_iteration"]) for name, i in info.items()})
            out = summarize(results, choices, args, len(choices["all"]))
            out["svd_seconds_per_call"] = svd_seconds
            print(f"block {index}, rows {n_rows}: {seconds:.2f} s\n{report(out)}", flush=True)
            if args.out:  # after every run, so that a run cut short still leaves its numbers
                args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def svd_probe(shapes: dict[str, tuple[int, int]], names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one SVD (the method's kind and precision) per unit shape: SVDs are not in the floor."""
    from ptqbench.lowrank import resolve_svd, truncated_svd

    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(qkv_group(name) or name, []).append(name)
    out = {}
    for members in units.values():
        m, n = sum(shapes[k][0] for k in members), shapes[members[0]][1]
        if f"{m}x{n}" in out:
            continue
        w = torch.randn(1, m, n, device=args.device)
        kind = resolve_svd(args.svd, args.rank, (1, m, n), w.device)
        precision = torch.float64 if args.svd == "exact" else torch.float32
        truncated_svd(w, args.rank, kind, dtype=precision)  # warm-up
        sync_device(w)
        start = time.perf_counter()
        truncated_svd(w, args.rank, kind, dtype=precision)
        sync_device(w)
        out[f"{m}x{n}"] = time.perf_counter() - start
    return out


def sync_device(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def summarize(results: dict, choices: dict, args: argparse.Namespace, n_layers: int) -> dict:
    native = choices["all"]
    out = {"model": "tiny-pixart" if args.small else args.model, "layers": n_layers, "rows": args.rows,
           "device": args.device, "format": args.format, "svd": args.svd, "tflops": args.tflops, "runs": []}
    for key, res in results.items():
        floor = res["flops"] / (args.tflops * 1e12)
        row = {"rows": args.rows if key == "all" else key, "seconds": res["seconds"], "floor_flops": res["flops"],
               "floor_seconds": floor, "ratio": res["seconds"] / floor if floor else float("nan")}
        if key != "all" and choices[key]:
            same = [(native[n][0] == c[0], native[n][1] == c[1]) for n, c in choices[key].items()]
            row["same_pair"] = sum(p for p, _ in same) / len(same)
            row["same_iterate"] = sum(i for _, i in same) / len(same)
            row["same_both"] = sum(p and i for p, i in same) / len(same)
        out["runs"].append(row)
    return out


def report(out: dict) -> str:
    lines = [f"SVDQuant calibration: {out['model']}, {out['layers']} layers, {out['format']}, svd {out['svd']}, "
             f"{out['device']}; floor at {out['tflops']:g} TFLOP/s",
             f"{'rows':>9} {'seconds':>10} {'floor s':>10} {'ratio':>8} {'pair':>6} {'iterate':>8} {'both':>6}"]
    for r in out["runs"]:
        agree = "".join(f" {r[k]:>{w}.3f}" for k, w in (("same_pair", 6), ("same_iterate", 8), ("same_both", 6))
                        ) if "same_pair" in r else ""
        lines.append(f"{r['rows']:>9} {r['seconds']:>10.2f} {r['floor_seconds']:>10.3f} {r['ratio']:>8.1f}{agree}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
