"""Intervals and paired tests (ptqbench.uncertainty) and KID, checked by simulation and float64 re-derivation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ptqbench.errors import UserError
from ptqbench.metrics.frechet import (
    feature_stats,
    frechet_counts_statistic,
    frechet_distance,
    frechet_distance_from_stats,
)
from ptqbench.metrics.kid import kernel_distance, kid_counts_statistic, mmd2_unbiased, within_mean
from ptqbench.uncertainty import (
    Bootstrap,
    compare,
    format_comparisons,
    mean_interval,
    not_worse_than_best,
    overlaps_best,
    paired_difference,
    resample_counts,
    set_interval,
)

FAST = Bootstrap(resamples=1000)


@pytest.mark.parametrize("method", ["bca", "percentile"])
@pytest.mark.parametrize("n", [10, 40])
def test_mean_interval_covers_a_known_mean(method: str, n: int) -> None:
    """>= 90% of 200 seeded repetitions cover the true mean at the 95% level (skewed data included)."""
    config = Bootstrap(resamples=1000, method=method)
    covered = 0
    for rep in range(200):
        x = np.random.default_rng(rep).exponential(2.0, n) + 10.0  # mean 12, heavy right tail
        iv = mean_interval(x, Bootstrap(config.level, config.resamples, seed=rep, method=method))
        covered += iv.lo <= 12.0 <= iv.hi
    assert covered / 200 >= 0.90, covered


@pytest.mark.parametrize(
    ("test", "n", "reps"), [("bootstrap", 10, 1000), ("bootstrap", 40, 1000), ("wilcoxon", 10, 400)]
)
def test_paired_test_of_two_identical_methods_rarely_rejects(test: str, n: int, reps: int) -> None:
    """Two methods with the same per-image distribution (prompt effect shared): the rejection rate at
    alpha 0.05 over seeded repetitions (measured: bootstrap 5.8% at n = 10, 6.1% at n = 40; on the
    first 400 of these the exact paired t-test itself rejects 7.5% at n = 40, hence 1000)."""
    rejected = 0
    for rep in range(reps):
        g = np.random.default_rng(1000 + rep)
        prompt = g.normal(20.0, 4.0, n)  # what the prompt contributes, the same for both methods
        a, b = prompt + g.normal(0, 1, n), prompt + g.normal(0, 1, n)
        rejected += paired_difference(a, b, Bootstrap(resamples=500, seed=rep, test=test)).significant
    assert rejected / reps <= 0.075, rejected


def test_paired_test_finds_a_real_difference_the_unpaired_intervals_miss() -> None:
    g = np.random.default_rng(0)
    prompt = g.normal(20.0, 4.0, 30)
    a, b = prompt + 0.5 + g.normal(0, 0.3, 30), prompt + g.normal(0, 0.3, 30)
    ia, ib = mean_interval(a, FAST), mean_interval(b, FAST)
    assert ia.lo < ib.hi  # the intervals over prompts overlap...
    c = paired_difference(a, b, FAST, "psnr", True)
    assert c.significant and c.lo > 0 and c.verdict == "A better"  # ...the paired difference does not
    assert c.diff == pytest.approx(float(np.mean(a - b)), rel=1e-12)
    assert not_worse_than_best({"a": a, "b": b}, True, FAST) == {"a"}
    assert not_worse_than_best({"a": a, "b": b}, False, FAST) == {"b"}
    assert not_worse_than_best({"a": a, "b": a + g.normal(0, 0.3, 30)}, True, FAST) == {"a", "b"}


def test_p_value_and_interval_agree() -> None:
    """The bootstrap p-value inverts the BCa interval: p < alpha exactly when 0 is outside it."""
    for rep in range(40):
        g = np.random.default_rng(rep)
        d = g.normal(0.25 * (rep % 5), 1.0, 15)
        c = paired_difference(d, np.zeros(15), Bootstrap(resamples=2000, seed=rep))
        if abs(c.p_value - 0.05) > 0.005:  # away from the boundary, where quantile interpolation decides
            assert c.significant == (not c.lo <= 0 <= c.hi), (c.p_value, c.lo, c.hi)


def test_determinism_and_degenerate_inputs() -> None:
    x = np.random.default_rng(5).normal(size=25)
    assert mean_interval(x, Bootstrap(seed=3)) == mean_interval(x, Bootstrap(seed=3))
    assert mean_interval(x, Bootstrap(seed=3)) != mean_interval(x, Bootstrap(seed=4))
    assert paired_difference(x, x * 0.5, Bootstrap(seed=1)) == paired_difference(x, x * 0.5, Bootstrap(seed=1))
    assert np.array_equal(resample_counts(7, 30, 9), resample_counts(7, 30, 9))
    assert resample_counts(7, 30, 9).sum(axis=1).tolist() == [7] * 30
    same = mean_interval([3.0] * 5)
    assert (same.value, same.lo, same.hi) == (3.0, 3.0, 3.0)
    zero = paired_difference(x, x)
    assert (zero.diff, zero.lo, zero.hi, zero.p_value, zero.significant) == (0.0, 0.0, 0.0, 1.0, False)
    shift = paired_difference(x + 1, x)
    assert shift.significant and shift.lo == shift.hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, float("nan")])
    for bad in ({"level": 1.0}, {"resamples": 5}, {"method": "bc"}, {"test": "t"}):
        with pytest.raises(UserError):
            Bootstrap(**bad)


def test_set_bootstrap_has_bounded_cost_and_resamples_exactly() -> None:
    """A set statistic is evaluated set_resamples + 1 times on counts; the Frechet statistic of counts
    equals the Frechet distance of the resampled feature matrix, on both the fixed and paired paths."""
    g = np.random.default_rng(0)
    a = g.standard_normal((60, 12)) * np.linspace(0.2, 3, 12)
    b = a + 0.4 * g.standard_normal((60, 12))
    real = feature_stats(g.standard_normal((400, 12)))
    fixed, paired = frechet_counts_statistic(a, real), frechet_counts_statistic(a, b)
    counts = resample_counts(60, 3, 1)
    for c in counts:
        idx = np.repeat(np.arange(60), c)
        mu, sigma = feature_stats(a[idx])
        assert fixed(c) == pytest.approx(frechet_distance_from_stats(mu, sigma, *real), rel=1e-9)
        assert paired(c) == pytest.approx(frechet_distance(a[idx], b[idx]), rel=1e-9)
    assert paired(np.ones(60, dtype=np.int64)) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    calls = []

    def counted(c: np.ndarray) -> float:
        calls.append(c)
        return fixed(c)

    config = Bootstrap(set_resamples=50, seed=2)
    iv = set_interval(counted, 60, config, floor=0.0)
    assert len(calls) == 51 and iv.lo <= iv.value <= iv.hi and iv.lo >= 0
    assert set_interval(fixed, 60, config, floor=0.0) == set_interval(fixed, 60, config, floor=0.0)


def test_frechet_basic_interval_covers_the_large_n_distance() -> None:
    """Gaussian features with a known Frechet distance to the exact real statistics: the basic interval
    (bias-corrected) covers it in most repetitions even where the plain estimate is biased upwards."""
    d, n, shift = 6, 120, 0.5
    truth = d * shift**2  # N(shift, I) vs N(0, I)
    real = (np.zeros(d), np.eye(d))
    covered, above = 0, 0
    for rep in range(60):
        feats = np.random.default_rng(rep).standard_normal((n, d)) + shift
        iv = set_interval(frechet_counts_statistic(feats, real), n, Bootstrap(set_resamples=200, seed=rep))
        covered += iv.lo <= truth <= iv.hi
        above += iv.value > truth
    assert covered / 60 >= 0.85 and above / 60 > 0.6, (covered, above)


def _kid_loops(x: np.ndarray, y: np.ndarray, paired: bool = False, origin: np.ndarray | None = None) -> float:
    """The KID estimate in plain float64 loops (the independent reference): clean-fid's, or with
    ``paired`` the cross term over i != j; ``origin`` (the original image of each row of a resample)
    keeps only pairs of distinct originals."""
    m, d = len(x), x.shape[1]
    origin = np.arange(m) if origin is None else origin
    pairs = [(i, j) for i in range(m) for j in range(m) if origin[i] != origin[j]]
    within = sum(((x[i] @ x[j]) / d + 1) ** 3 + ((y[i] @ y[j]) / d + 1) ** 3 for i, j in pairs) / len(pairs)
    if paired:
        cross = sum(((x[i] @ y[j]) / d + 1) ** 3 for i, j in pairs) / len(pairs)
    else:
        cross = sum(((x[i] @ y[j]) / d + 1) ** 3 for i in range(m) for j in range(m)) / m**2
    return within - 2 * cross


def test_kid_equals_float64_loops_and_clean_fid() -> None:
    from cleanfid.fid import kernel_distance as clean_fid_kid

    g = np.random.default_rng(0)
    x = g.standard_normal((30, 9)) * 3  # outlier-heavy rows too
    x[0] *= 40
    y = x + g.standard_normal((30, 9))  # y_i depends on x_i: paired
    ours = kernel_distance(x, y)
    assert ours == pytest.approx(_kid_loops(x, y), rel=1e-10)
    assert ours == pytest.approx(clean_fid_kid(x, y), rel=1e-10)  # equal sizes: every subset is the whole set
    assert mmd2_unbiased(x, y) == ours
    paired = kernel_distance(x, y, paired=True)
    # the outlier row's kernel values are ~1e9: differences of such sums carry ~1e-10 relative rounding
    assert paired == pytest.approx(_kid_loops(x, y, paired=True), rel=1e-8) and paired != pytest.approx(ours)
    statistic = kid_counts_statistic(x, y, True)
    assert statistic(np.ones(30, dtype=np.int64)) == pytest.approx(paired, rel=1e-8)
    counts = resample_counts(30, 1, 5)[0]
    origin = np.repeat(np.arange(30), counts)
    assert statistic(counts) == pytest.approx(_kid_loops(x[origin], y[origin], True, origin), rel=1e-8)
    big = g.standard_normal((200, 9))
    k = (big @ big.T / 9 + 1) ** 3
    assert within_mean(big) == pytest.approx((k.sum() - np.trace(k)) / (200 * 199), rel=1e-12)


def test_kid_subsets_are_seeded_and_unbiased() -> None:
    g = np.random.default_rng(1)
    real = g.standard_normal((500, 8))
    same = [kernel_distance(g.standard_normal((20, 8)), real, subsets=20, seed=s) for s in range(100)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(100)  # same distribution: KID is 0 on average
    x = g.standard_normal((20, 8)) + 0.5
    assert kernel_distance(x, real, seed=4) == kernel_distance(x, real, seed=4) > 0
    fixed = kid_counts_statistic(x, real, False)
    mean_cross = float(((x @ real.T / 8 + 1) ** 3).mean())
    kxx = (x @ x.T / 8 + 1) ** 3
    full = (kxx.sum() - np.trace(kxx)) / (20 * 19) + within_mean(real) - 2 * mean_cross
    assert fixed(np.ones(20, dtype=np.int64)) == pytest.approx(full, rel=1e-10)


def test_compare_matches_keys_and_formats_text() -> None:
    g = np.random.default_rng(2)
    keys = [f"k{i}" for i in range(12)]
    base = g.normal(20, 3, 12)
    a = pd.DataFrame({"key": keys, "seed": range(12), "psnr": base + 1.0, "ssim": g.uniform(0.8, 0.9, 12)})
    b = pd.DataFrame({"key": keys[::-1], "seed": list(range(12))[::-1], "psnr": (base + g.normal(0, 0.1, 12))[::-1],
                      "lpips": g.uniform(size=12)})
    (c,) = compare(a, b, {"psnr": True})
    assert c.metric == "psnr" and c.n == 12 and c.significant and c.verdict == "A better"
    assert c.diff == pytest.approx(float(np.mean(a["psnr"] - b["psnr"][::-1].to_numpy())), rel=1e-12)
    text = format_comparisons([c], "rtn W:int4", "svdquant W:int4")
    assert "A = rtn W:int4" in text and "psnr" in text and "A better" in text and "paired bootstrap" in text
    with pytest.raises(UserError, match="different seeds"):
        compare(a, b.assign(seed=0))
    with pytest.raises(UserError, match="share no prompt key"):
        compare(a, b.assign(key=[f"x{i}" for i in range(12)]))


def test_overlaps_best_for_set_metrics() -> None:
    from ptqbench.uncertainty import Interval

    ivs = {"a": Interval(10, 8, 12, 0.95), "b": Interval(11.5, 10.5, 13, 0.95), "c": Interval(20, 15, 25, 0.95)}
    assert overlaps_best(ivs, higher_is_better=False) == {"a", "b"}
    assert overlaps_best(ivs, higher_is_better=True) == {"c"}
