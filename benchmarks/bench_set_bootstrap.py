"""Cost of the set-metric bootstraps (Frechet distance, KID) at Inception's size, per resample.

    PYTHONPATH=. python benchmarks/bench_set_bootstrap.py --device cuda --out $OUT/set_bootstrap.json
    PYTHONPATH=. python benchmarks/bench_set_bootstrap.py --device cpu --n 1000 --resamples 2

Features are seeded Gaussians ``[n, 2048]`` (the cost does not depend on their values); the real
side is fixed statistics (FID against real images) or paired features (``fid_ref``). Times the
setup (``R_b = S_b^{1/2}``, kernel matrices) and the mean seconds per resample, and checks that
the all-ones resample equals the plain Frechet distance. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ptqbench.metrics.frechet import feature_stats, frechet_counts_statistic, frechet_distance_from_stats
from ptqbench.metrics.kid import kid_counts_statistic
from ptqbench.uncertainty import resample_counts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_statistic(make, counts: np.ndarray, device: str) -> dict[str, float]:
    start = time.perf_counter()
    statistic = make()
    _sync(device)
    setup = time.perf_counter() - start
    statistic(counts[0])  # warm-up
    start = time.perf_counter()
    for c in counts:
        statistic(c)
    _sync(device)
    return {"setup_s": setup, "per_resample_s": (time.perf_counter() - start) / len(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--resamples", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for n in args.n:
        g = np.random.default_rng(n)
        a = g.standard_normal((n, args.dim)) * np.linspace(0.1, 2, args.dim)
        b = a + 0.3 * g.standard_normal((n, args.dim))
        real = feature_stats(g.standard_normal((max(n, args.dim + 1), args.dim)))
        counts = resample_counts(n, args.resamples, 0)
        fixed = frechet_counts_statistic(a, real, args.device)
        exact = frechet_distance_from_stats(*feature_stats(a), *real)
        row = {"n": n, "dim": args.dim, "device": args.device,
               "fixed_rel_error": abs(fixed(np.ones(n, dtype=np.int64)) - exact) / exact}
        row["fid"] = time_statistic(lambda a=a, real=real: frechet_counts_statistic(a, real, args.device),
                                    counts, args.device)
        row["fid_ref"] = time_statistic(lambda a=a, b=b: frechet_counts_statistic(a, b, args.device),
                                        counts, args.device)
        row["kid_ref"] = time_statistic(lambda a=a, b=b: kid_counts_statistic(a, b, True), counts, "cpu")
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
