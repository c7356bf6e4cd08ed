"""Intervals and fronts against scipy and hand-built cases."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from dps_tune import stats
from dps_tune.metrics import classification_metrics


def test_t_interval_matches_scipy():
    values = [0.61, 0.64, 0.59, 0.66, 0.62]
    got = stats.t_interval(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert got.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.std == pytest.approx(np.std(values, ddof=1))
    with pytest.raises(ValueError):
        stats.t_interval([0.5])


def test_paired_difference_uses_matching_seeds_only():
    a = {0: 0.70, 1: 0.72, 2: 0.68, 7: 0.99}
    b = {0: 0.65, 1: 0.66, 2: 0.64, 5: 0.10}
    got = stats.paired_difference(a, b)
    diffs = [0.05, 0.06, 0.04]
    low, high = sps.t.interval(0.95, 2, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert got.n == 3 and got.mean == pytest.approx(0.05)
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    assert got.excludes_zero
    # unpaired, the seed noise would swamp it; paired on shared seeds, it does not
    noisy_a = {s: v + s * 0.1 for s, v in a.items()}
    noisy_b = {s: v + s * 0.1 for s, v in b.items()}
    assert stats.paired_difference(noisy_a, noisy_b).mean == pytest.approx(0.05)


@pytest.mark.parametrize("seed", range(3))
def test_the_counting_f1_equals_the_metric_and_labels_come_from_each_resample(seed):
    g = torch.Generator().manual_seed(seed)
    y_true = torch.randint(0, 7, (200,), generator=g)
    y_pred = torch.where(torch.rand(200, generator=g) < 0.6, y_true, torch.randint(0, 9, (200,), generator=g))
    for idx in (torch.arange(200), torch.randint(200, (200,), generator=g), torch.arange(10)):
        acc, f1 = stats._acc_f1(y_true[idx], y_pred[idx], 9)
        ref = classification_metrics("s", y_true[idx], y_pred[idx])
        assert acc == pytest.approx(ref["s_acc"], abs=1e-6) and f1 == pytest.approx(ref["s_f1"], abs=1e-12)


def test_bootstrap_is_reproducible_and_brackets_the_point_estimate():
    g = torch.Generator().manual_seed(0)
    y_true = torch.randint(0, 5, (300,), generator=g)
    y_pred = torch.where(torch.rand(300, generator=g) < 0.7, y_true, torch.randint(0, 5, (300,), generator=g))
    one = stats.bootstrap_interval(y_true, y_pred, resamples=300, seed=4)
    two = stats.bootstrap_interval(y_true, y_pred, resamples=300, seed=4)
    other = stats.bootstrap_interval(y_true, y_pred, resamples=300, seed=5)
    assert one == two and one != other
    for key in ("acc", "f1"):
        assert one[key].low < one[key].mean < one[key].high
        assert one[key].high - one[key].low < 0.2
    assert one["acc"].mean == classification_metrics("s", y_true, y_pred)["s_acc"]


def test_pareto_front_by_hand():
    points = [(0.70, 0.40), (0.65, 0.50), (0.60, 0.45), (0.72, 0.30), (0.65, 0.50), (float("nan"), 0.9),
              (0.50, 0.20)]
    assert stats.pareto_front(points, ["max", "max"]) == [0, 1, 3, 4]
    # minimising the second objective turns the front around
    assert stats.pareto_front(points, ["max", "min"]) == [3, 6]
