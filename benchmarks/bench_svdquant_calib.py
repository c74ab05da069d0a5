"""SVDQuant calibration time on the full PixArt-Sigma layer shapes, against its FLOP floor.

The quantized layers of the model's transformer (its config on the meta device, deepcompressor's
skip list: cross-attention ``to_k``/``to_v`` stay 16-bit) get random weights and synthetic
calibration rows (heavy-tailed channel scales; post-GELU rows for the FFN down-projections).
The selected layers are calibrated as the runner does (``--scope model``, the default: one
``quantize_layers`` call on all of them, so same-shape units of different blocks are batched,
and q/k/v fused), or one block at a time (``--scope block``: smaller batches, the cost of a
block without its neighbours), with all ``--rows`` rows, then with each
``--subsample`` size (a seeded subset of the rows; abs-max still from all rows, as calibration
computes it), and the script prints:

- the FLOP floor of the matrix products the search and the refinement must do on the rows: per
  unit (``M`` outputs, ``n`` inputs, rank ``r``, ``N`` rows), ``x W^T`` once (``2 N n M``) and,
  per candidate and per evaluated iterate, ``Qa(x/s) Q1^T`` (``2 N n M``) plus the branch
  (``2 N r (n + M)``); SVDs and quantization are not counted. Converted to seconds at
  ``--tflops`` (default: H200 dense bf16, 989 TFLOP/s);
- the measured time and the ratio to the floor;
- per subsample size, the fraction of layers whose chosen (alpha, beta) pair, refinement
  iterate, and both, equal the all-rows choice (the issue's criterion), and the better-posed one:
  the output error of the subsample's layer on ``--heldout`` rows it never saw, relative to the
  all-rows layer's (``e/e_nat``: the largest ratio, the fraction within 0.1 % and 1 %), plus
  ``obj gap``: where the pair agrees, how much worse the all-rows objective is at the subsample's
  iterate than at the all-rows best (each layer's ``iterate_errors`` curve is in the JSON);
- with ``--search-rows K``, the same for the smoothing searched on K rows and refined on all of
  them (SVDQuant's ``search_rows``): the refinement scores on the Gram matrices of all rows
  (``--refine-objective gram``, the default), so its iterate follows the all-rows one wherever
  the pair does;
- the seconds of one full SVD per unit shape (SVDs are outside the floor; the search does one
  per candidate and per evaluated iterate: by default their top r by iteration, SVDQuant's
  ``iterative_svd``, with each layer's count of full solves in the JSON; ``--no-iterative-svd``
  solves every one in full). ``--no-fused-scoring`` scores the candidates by the unfused
  products instead of the layer's fused GPU path (SVDQuant's ``fused_scoring``). The report is
  printed (and ``--out`` written) after every run (one block at one size), so a run cut short
  still leaves its numbers.

``--profile`` adds the seconds and calls per stage (transfers, reference outputs, quantization,
products, error sums, SVD, weight quantization; run it with ``--workers 1``: the stages
synchronize the GPU) and the SVD timings of both float64 algorithms on both devices.

The native size: deepcompressor's collect step caches every transformer call of 128 prompts
(20 steps x 2 guidance halves: 5120 files of one sample each, ``collect/calib.py``), and its
calibration loads ``quant.calib.num_samples: 128`` of those files at random
(``DiffusionCalibDataset`` -> ``DiffusionDataset``: shuffle, keep 128), all of whose tokens
(``sample_size: -1``) score the searches: 128 x 4096 = 524288 rows per image-token layer input
at 1024 px, not 128 x 20 x 2 x 4096.

  GPU (the native size), one block:
      python benchmarks/bench_svdquant_calib.py --device cuda --layers 8 --svd gram --subsample 4096 16384 65536 131072
      python benchmarks/bench_svdquant_calib.py --device cuda --layers 8 --svd gram --subsample --search-rows 4096 16384
      python benchmarks/bench_svdquant_calib.py --device cuda --layers 8 --workers 1 --profile --out svdq_calib.json
  CPU smoke test (tiny PixArt config):
      python benchmarks/bench_svdquant_calib.py --small --device cpu --rows 512 --subsample 64 256 --search-rows 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ptqbench import get_method, smoothing
from ptqbench.layers import dense_weight
from ptqbench.memory import qkv_group
from ptqbench.methods import svdquant
from ptqbench.patching import LayerPlan, select_layers
from ptqbench.smoothing import PROFILE
from ptqbench.stats import LayerStats

NATIVE_ROWS = 128 * 4096  # deepcompressor: 128 cached transformer calls (quant.calib.num_samples) x 4096 tokens
DEEPCOMPRESSOR_SKIPS = ("*attn2.to_k", "*attn2.to_v")  # cross-attention k/v are its "attn_add" (skipped)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pixart-sigma")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="the model's dtype")
    p.add_argument("--rows", type=int, default=NATIVE_ROWS, help="calibration rows per layer input (all rows)")
    p.add_argument("--subsample", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--search-rows", type=int, nargs="*", default=[],
                   help="also run with the smoothing searched on this many rows, refined on all (search_rows)")
    p.add_argument("--refine-objective", default="gram", choices=("gram", "rows"))
    p.add_argument("--iterative-svd", action=argparse.BooleanOptionalAction, default=True,
                   help="float64 SVDs solved iteratively for the top r (SVDQuant's iterative_svd)")
    p.add_argument("--fused-scoring", action=argparse.BooleanOptionalAction, default=True,
                   help="candidates scored as the layer's fused GPU path computes them (SVDQuant's fused_scoring)")
    p.add_argument("--layers", type=int, default=0, help="calibrate only the first L quantized layers (0: all)")
    p.add_argument("--scope", default="model", choices=("model", "block"),
                   help="one quantize_layers call on all the layers, as the runner (model), or one per block")
    p.add_argument("--format", default="int4_g64", help="main weight and activation format")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--num-grids", type=int, default=20)
    p.add_argument("--num-iters", type=int, default=100)
    p.add_argument("--svd", default="exact", choices=("exact", "gram", "randomized", "auto"))
    p.add_argument("--stored-dtype", default="float32", choices=("float32", "model"),
                   help="rows kept in float32 (as the runner's statistics) or in the model's dtype (half the memory)")
    p.add_argument("--score-dtype", default="model", choices=("model", "float32"), help="row products' dtype")
    p.add_argument("--profile", action="store_true", help="print seconds per stage (synchronizes the GPU)")
    p.add_argument("--workers", type=int, default=smoothing.GPU_WORKERS, help="batches calibrated at once on a GPU")
    p.add_argument("--heldout", type=int, default=16384, help="held-out rows per layer input (output errors)")
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


def synthetic_blocks(
    shapes: dict[str, tuple[int, int]], groups: list[list[str]], args: argparse.Namespace, dtype: torch.dtype,
    first: int,
) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`synthetic_block` of each block (``first``, ``first + 1``, ...), merged."""
    layers, rows, heldout = {}, {}, {}
    for index, names in enumerate(groups, first):
        parts = synthetic_block(shapes, names, args, dtype, index)
        for merged, part in zip((layers, rows, heldout), parts, strict=True):
            merged.update(part)
    return layers, rows, heldout


def synthetic_block(
    shapes: dict[str, tuple[int, int]], names: list[str], args: argparse.Namespace, dtype: torch.dtype, index: int
) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random layers, calibration and held-out rows of one block; layers of one q/k/v group share their rows."""
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + index)
    layers, rows = {}, {}
    for name in names:
        m, n = shapes[name]
        col = torch.exp(0.5 * torch.randn(n, generator=g, device=device))
        layer = nn.Linear(n, m, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(m, n, generator=g, device=device) * col / n**0.5)
            layer.bias.copy_(0.02 * torch.randn(m, generator=g, device=device))  # seeded too: runs repeat exactly
        layers[name] = layer
        key = qkv_group(name) or name
        if key not in rows:
            scale = torch.exp(1.5 * torch.randn(n, generator=g, device=device))
            x = torch.randn(args.rows + args.heldout, n, generator=g, device=device) * scale
            x = nn.functional.gelu(x) if name.endswith("ff.net.2") else x
            rows[key] = x.to(dtype) if args.stored_dtype == "model" else x.to(dtype).float()
    calib = {key: x[: args.rows] for key, x in rows.items()}
    heldout = {key: x[args.rows :].to(dtype) for key, x in rows.items()}
    pick = {name: qkv_group(name) or name for name in names}
    return layers, {name: calib[k] for name, k in pick.items()}, {name: heldout[k] for name, k in pick.items()}


@torch.no_grad()
def heldout_errors(layers: dict[str, nn.Module], quantized: dict[str, nn.Module], rows: dict[str, torch.Tensor]):
    """Relative squared output error ``||q(x) - layer(x)||^2 / ||layer(x)||^2`` per layer on its held-out rows."""
    out = {}
    for name, q in quantized.items():
        ref = layers[name](rows[name]).float()
        out[name] = float((q(rows[name]).float() - ref).pow(2).sum() / ref.pow(2).sum())
    return out


def calibrate(method, layers, rows: dict[str, torch.Tensor], absmax: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """SVDQuant on one block; (quantized layers, seconds)."""
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
    return out, time.perf_counter() - start


def sync(layers: dict[str, nn.Module]) -> None:
    sync_device(next(iter(layers.values())).weight)


def floor_flops(
    shapes: dict[str, tuple[int, int]], names: list[str], info: dict, args, n_rows: int, searched: int | None = None
) -> float:
    """Matrix-product FLOPs on the rows the search (on ``searched`` of them, default all) and the
    refinement must do scored per row (see the module docstring)."""
    units: dict[str, list[str]] = {}
    for name in names:
        units.setdefault(qkv_group(name) or name, []).append(name)
    total = 0.0
    candidates = 2 * args.num_grids - 1
    for members in units.values():
        n = shapes[members[0]][1]
        m = sum(shapes[k][0] for k in members)
        iterates = len(info[members[0]]["iterate_errors"])  # evaluated iterates
        per_row = 2 * n * m + 2 * args.rank * (n + m)
        total += 2 * n_rows * n * m + (candidates * (searched or n_rows) + iterates * n_rows) * per_row
    return total


def run(args: argparse.Namespace) -> dict:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    shapes = model_layers(args)
    method = get_method(
        "svdquant", weight_format=args.format, act_format=args.format, rank=args.rank,
        num_grids=args.num_grids, num_iters=args.num_iters, svd=args.svd, rows="all", score_dtype=args.score_dtype,
        refine_objective=args.refine_objective, iterative_svd=args.iterative_svd, fused_scoring=args.fused_scoring,
    )
    PROFILE.enabled = args.profile
    svdquant.GPU_WORKERS = args.workers
    sizes: list[int | str] = [k for k in args.subsample if k < args.rows]
    sizes += [f"search {k}" for k in args.search_rows if k < args.rows]
    results = {"all": {"seconds": 0.0, "flops": 0.0}} | {k: {"seconds": 0.0, "flops": 0.0} for k in sizes}
    choices: dict[object, dict[str, dict]] = {key: {} for key in results}
    svd_seconds = svd_probe(shapes, list(shapes), args)
    out: dict = {}
    profiles: dict[str, dict] = {}  # per run, kept across the runs (``out`` is rebuilt after each)
    per_block = list(blocks(list(shapes)).values())
    runs = [[names] for names in per_block] if args.scope == "block" else [per_block]
    for index, groups in enumerate(runs):
        names = [name for group in groups for name in group]
        layers, rows, heldout = synthetic_blocks(shapes, groups, args, dtype, index)
        absmax = {name: x.abs().amax(0).float() for name, x in rows.items()}
        perm = torch.randperm(args.rows, generator=torch.Generator().manual_seed(args.seed + index))
        if index == 0:  # warm-up (kernel compilation, allocator), not timed
            for size in (64, 96):  # two sizes: torch.compile's dynamic-shape graphs too
                few = {id(x): x[: min(size, args.rows)] for x in rows.values()}
                calibrate(method, layers, {name: few[id(x)] for name, x in rows.items()}, absmax)
        for key in results:
            run_method, searched, picked, n_rows = method, None, rows, args.rows
            if isinstance(key, int):  # a subsample of the rows for the search and the refinement
                keep = perm[:key].to(args.device)
                subsets = {id(x): x[keep] for x in rows.values()}
                picked, n_rows = {name: subsets[id(x)] for name, x in rows.items()}, key
            elif key != "all":  # "search K": the search on K rows, the refinement on all
                searched = int(key.split()[1])
                run_method = dataclasses.replace(method, search_rows=searched)
            where = f"block {index}" if args.scope == "block" else f"{len(groups)} blocks"
            label = f"{where}, rows {n_rows if isinstance(key, int) or key == 'all' else key}"
            PROFILE.reset()
            quantized, seconds = calibrate(run_method, layers, picked, absmax)
            info = {name: q.info for name, q in quantized.items()}
            errors = heldout_errors(layers, quantized, heldout)
            results[key]["seconds"] += seconds
            results[key]["flops"] += floor_flops(shapes, names, info, args, n_rows, searched)
            choices[key].update({
                name: {"pair": i["smooth_pair"], "iterate": i["best_iteration"], "heldout_error": errors[name],
                       "iterate_errors": i["iterate_errors"], "full_svds": i["full_svds"],
                       "score_path": i["score_path"]}
                for name, i in info.items()})
            out = summarize(results, choices, args, len(choices["all"]))
            out["svd_seconds_per_call"] = svd_seconds
            print(f"{label}: {seconds:.2f} s\n{report(out)}", flush=True)
            if args.profile:
                profiles[label] = stages = profile_table()
                out["profile"] = profiles
                print("  stages: " + ", ".join(f"{k} {v[0]:.3f} s / {v[1]} calls" for k, v in stages.items()))
            if args.out:  # after every run, so that a run cut short still leaves its numbers
                args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def profile_table() -> dict[str, tuple[float, int]]:
    """(seconds, calls) per stage of the last run, slowest first."""
    return dict(sorted(((k, (v, PROFILE.calls[k])) for k, v in PROFILE.seconds.items()), key=lambda kv: -kv[1][0]))


def svd_probe(shapes: dict[str, tuple[int, int]], names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one SVD per unit shape (SVDs are not in the floor): the method's kind and
    precision on the device, and for comparison the float64 exact SVD and Gram eigendecomposition
    on the device and on the CPU (all its cores), 8 candidates batched."""
    from ptqbench.lowrank import resolve_svd

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
        precision = torch.float64 if args.svd in ("exact", "gram") else torch.float32
        out[f"{m}x{n}"] = time_svd(w, args.rank, kind, precision)
        if args.profile:
            batch = torch.randn(8, m, n, device=args.device)
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)
            for where, x in ((args.device, batch), ("cpu", batch.cpu())):
                for how in ("exact", "gram"):
                    out[f"{m}x{n} {how} float64 {where} per candidate (batched)"] = (
                        time_svd(x, args.rank, how, torch.float64) / len(batch))
            torch.set_num_threads(threads)
    return out


def time_svd(w: torch.Tensor, rank: int, kind: str, precision: torch.dtype) -> float:
    from ptqbench.lowrank import truncated_svd

    truncated_svd(w[:1], rank, kind, dtype=precision)  # warm-up
    sync_device(w)
    start = time.perf_counter()
    truncated_svd(w, rank, kind, dtype=precision)
    sync_device(w)
    return time.perf_counter() - start


def sync_device(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def summarize(results: dict, choices: dict, args: argparse.Namespace, n_layers: int) -> dict:
    native = choices["all"]
    out = {"model": "tiny-pixart" if args.small else args.model, "layers": n_layers, "rows": args.rows,
           "device": args.device, "format": args.format, "svd": args.svd, "iterative_svd": args.iterative_svd,
           "fused_scoring": args.fused_scoring, "scope": args.scope,
           "score_dtype": args.score_dtype, "tflops": args.tflops, "runs": []}
    for key, res in results.items():
        floor = res["flops"] / (args.tflops * 1e12)
        row = {"rows": args.rows if key == "all" else key, "seconds": res["seconds"], "floor_flops": res["flops"],
               "floor_seconds": floor, "ratio": res["seconds"] / floor if floor else float("nan")}
        if key != "all" and choices[key]:
            row |= agreement(native, choices[key])
        out["runs"].append(row)
    out["choices"] = {str(key): c for key, c in choices.items()}
    return out


def agreement(native: dict[str, dict], sub: dict[str, dict]) -> dict:
    """How a subsample's choices compare with the all-rows ones, over the layers both calibrated:
    the issue's criterion (same pair, same iterate, both), the held-out output error of the
    subsample's layer relative to the native layer's (``heldout_ratio``: ``e_sub / e_native``; the
    fraction within 0.1 / 0.5 / 1 %), and, where the pair agrees, the native objective at the
    subsample's iterate relative to the native best (``objective_gap``: the all-rows cost of the
    subsample's iterate; None where the native run stopped before it)."""
    names = [n for n in sub if n in native]
    same = [(native[n]["pair"] == sub[n]["pair"], native[n]["iterate"] == sub[n]["iterate"]) for n in names]
    ratios = [sub[n]["heldout_error"] / native[n]["heldout_error"] for n in names]
    gaps = []
    for n, (pair, _) in zip(names, same, strict=True):
        curve, it = native[n]["iterate_errors"], sub[n]["iterate"]
        if pair and it <= len(curve):
            gaps.append(curve[it - 1] / curve[native[n]["iterate"] - 1] - 1)
    row = {"same_pair": mean(p for p, _ in same), "same_iterate": mean(i for _, i in same),
           "same_both": mean(p and i for p, i in same), "heldout_ratio_max": max(ratios),
           "heldout_ratio_median": sorted(ratios)[len(ratios) // 2]}
    row |= {f"heldout_within_{x:g}%": mean(r <= 1 + x / 100 for r in ratios) for x in (0.1, 0.5, 1.0)}
    row["objective_gap_max"] = max(gaps) if gaps else None
    return row


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report(out: dict) -> str:
    lines = [f"SVDQuant calibration: {out['model']}, {out['layers']} layers, {out['format']}, svd {out['svd']}"
             f"{' (iterative top-r)' if out['iterative_svd'] else ''}, scores in {out['score_dtype']}, "
             f"{'all layers in one call' if out['scope'] == 'model' else 'one block at a time'}, "
             f"{out['device']}; floor at {out['tflops']:g} TFLOP/s",
             f"{'rows':>13} {'seconds':>10} {'floor s':>10} {'ratio':>8} {'pair':>6} {'iterate':>8} {'both':>6}"
             f" {'e/e_nat max':>11} {'<=0.1%':>7} {'<=1%':>6} {'obj gap':>9}"]
    cols = (("same_pair", 6, ".3f"), ("same_iterate", 8, ".3f"), ("same_both", 6, ".3f"),
            ("heldout_ratio_max", 11, ".5f"), ("heldout_within_0.1%", 7, ".3f"), ("heldout_within_1%", 6, ".3f"),
            ("objective_gap_max", 9, ".2e"))
    for r in out["runs"]:
        agree = "".join(f" {r[k]:>{w}{f}}" if r.get(k) is not None else f" {'-':>{w}}" for k, w, f in cols
                        ) if "same_pair" in r else ""
        lines.append(f"{r['rows']:>13} {r['seconds']:>10.2f} {r['floor_seconds']:>10.3f} {r['ratio']:>8.1f}{agree}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
