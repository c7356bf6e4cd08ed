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


def test_holm_against_a_worked_example():
    # m = 4. Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06.
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # At α = 0.05 Holm rejects 0.005 (≤ 0.05/4) and 0.01 (≤ 0.05/3), stops at 0.03 (> 0.05/2),
    # so 0.04 is not rejected although it is below 0.05.
    assert [a <= 0.05 for a in stats.holm(p)] == [True, False, False, True]
    assert stats.holm_levels(p) == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 1, 1 - 0.05 / 2, 1 - 0.05 / 4])
    assert stats.holm([0.3, 0.02]) == pytest.approx([0.3, 0.04])
    assert stats.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1, then kept monotone


def _crossed_world(rng, seeds, images, sd_seed, sd_image, sd_noise):
    """x[s, i] = a_s + b_i + e_si: the mean's true variance is sd_seed²/S + sd_image²/N + sd_noise²/(S·N)."""
    return (rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_image, (1, images))
            + rng.normal(0, sd_noise, (seeds, images)))


def test_two_level_interval_covers_the_true_mean_at_its_nominal_rate():
    """Seeds and test images both vary; the interval must count both (a seed-only t-interval does not)."""
    S, N, sd = 5, 200, (0.02, 0.4, 0.3)
    true_var = sd[0] ** 2 / S + sd[1] ** 2 / N + sd[2] ** 2 / (S * N)
    rng = np.random.default_rng(0)
    covered = seed_only = 0
    ratios = []
    runs = 250
    for run in range(runs):
        x = _crossed_world(rng, S, N, *sd)
        boot = stats.two_level_bootstrap(x, resamples=300, seed=run)
        iv = boot.interval(0.95)
        covered += iv.low <= 0 <= iv.high  # the true mean is 0
        ratios.append(iv.std ** 2 / true_var)
        t = stats.t_interval(x.mean(axis=1))
        seed_only += t.low <= 0 <= t.high
    assert 0.90 <= covered / runs <= 0.985, covered / runs
    assert 0.8 <= float(np.mean(ratios)) <= 1.3, np.mean(ratios)
    assert seed_only / runs < 0.8  # seed spread alone misses the test set's own sampling error


def test_paired_bootstrap_resamples_both_sides_together():
    rng = np.random.default_rng(1)
    base = _crossed_world(rng, 5, 300, 0.02, 0.4, 0.05)
    better = base + 0.05  # the same images and seeds, shifted: the pairing cancels the image variation
    pair = stats.paired_two_level_bootstrap(better, base, resamples=1000)
    iv = pair.interval()
    assert pair.point == pytest.approx(0.05) and iv.low == pytest.approx(0.05) and iv.high == pytest.approx(0.05)
    alone = stats.two_level_bootstrap(better, resamples=1000).interval()
    assert alone.high - alone.low > 0.05  # unpaired, the image variation would swamp the difference
    zero_shot = base[:1]  # one row, compared with every seed
    assert stats.paired_two_level_bootstrap(better, zero_shot, resamples=200).seeds == 5
    with pytest.raises(ValueError, match="different images"):
        stats.paired_two_level_bootstrap(better, base[:, :10])


def test_holm_family_calls_a_difference_only_when_the_adjusted_interval_excludes_zero():
    rng = np.random.default_rng(2)
    a = (rng.random((3, 400)) < 0.6).astype(float)
    clear = stats.paired_two_level_bootstrap(a, a * 0, resamples=2000, seed=0)  # +0.6
    none = stats.paired_two_level_bootstrap(a, a, resamples=2000, seed=1)  # exactly 0
    verdicts = stats.holm_family([clear, none])
    assert verdicts[0].differs and not verdicts[1].differs
    assert verdicts[0].level == pytest.approx(0.975) and verdicts[1].level == pytest.approx(0.95)
    assert verdicts[0].interval.excludes_zero and not verdicts[1].interval.excludes_zero


def test_wise_frontier_gap_interpolates_along_alpha():
    # alpha: (ID, OOD). ID rises along alpha, OOD peaks at 0.5.
    curve = [(0.0, 0.60, 0.45), (0.5, 0.70, 0.50), (1.0, 0.80, 0.30)]
    assert stats.curve_ood_at(curve, 0.65) == pytest.approx(0.475)  # halfway between alpha 0 and 0.5
    assert stats.curve_ood_at(curve, 0.75) == pytest.approx(0.40)
    assert stats.curve_ood_at(curve, 0.85) is None  # beyond the fine-tuned end
    gap = stats.wise_frontier_gap(curve, 0.75, 0.43)
    assert gap.gap == pytest.approx(0.03) and gap.interval is None
    # with per-image correctness of the method: an interval around the gap, the curve held fixed
    rng = np.random.default_rng(0)
    id_c = (rng.random((3, 400)) < 0.75).astype(float)
    ood_c = (rng.random((3, 400)) < 0.43).astype(float)
    got = stats.wise_frontier_gap(curve, float(id_c.mean()), float(ood_c.mean()), method_correct=(id_c, ood_c),
                                  resamples=500)
    assert got.interval.low < got.gap < got.interval.high and not got.curve_resampled
    assert got.gap == pytest.approx(ood_c.mean() - stats.curve_ood_at(curve, id_c.mean()))
    # a non-monotone curve crossing the ID twice: the frontier (higher OOD) counts
    bent = [(0.0, 0.60, 0.45), (0.5, 0.80, 0.50), (1.0, 0.70, 0.20)]
    assert stats.curve_ood_at(bent, 0.75) == pytest.approx(max(0.45 + 0.75 * 0.05, 0.50 - 0.5 * 0.30))


def _curve_of(correct: dict) -> list[tuple[float, float, float]]:
    return [(a, float(i.mean()), float(o.mean())) for a, (i, o) in sorted(correct.items())]


def test_the_frontier_interval_resamples_the_curve_on_the_method_s_own_images():
    rng = np.random.default_rng(3)
    n = 400
    # CE's curve: ID well apart at each alpha (0.5, 0.7, 0.9), so every resample keeps its order
    curve_correct = {a: ((rng.random(n) < p_id).astype(float), (rng.random(n) < p_ood).astype(float))
                     for a, p_id, p_ood in ((0.0, 0.5, 0.45), (0.5, 0.7, 0.5), (1.0, 0.9, 0.3))}
    curve = _curve_of(curve_correct)
    # A method that is, image for image, the curve's alpha 0.5: on the curve in every resample of
    # the same images, so a paired interval is 0 wide; a fixed (or differently resampled) curve is not.
    same = tuple(v[None, :] for v in curve_correct[0.5])
    paired = stats.wise_frontier_gap(curve, curve[1][1], curve[1][2], method_correct=same,
                                     curve_correct=curve_correct, resamples=500)
    fixed = stats.wise_frontier_gap(curve, curve[1][1], curve[1][2], method_correct=same, resamples=500)
    assert paired.curve_resampled and not fixed.curve_resampled
    assert paired.gap == pytest.approx(0.0, abs=1e-12) and fixed.gap == pytest.approx(0.0, abs=1e-12)
    assert paired.interval.low == pytest.approx(0.0, abs=1e-9) and paired.interval.high == pytest.approx(0.0, abs=1e-9)
    assert fixed.interval.high - fixed.interval.low > 0.05
    # A method independent of the curve: the curve's own test-set noise widens the interval.
    other = tuple((rng.random((1, n)) < p).astype(float) for p in (0.75, 0.43))
    x, y = float(other[0].mean()), float(other[1].mean())
    wide = stats.wise_frontier_gap(curve, x, y, method_correct=other, curve_correct=curve_correct, resamples=1000)
    narrow = stats.wise_frontier_gap(curve, x, y, method_correct=other, resamples=1000)
    assert wide.gap == narrow.gap
    assert wide.interval.std > 1.15 * narrow.interval.std  # here 0.038 against 0.030


def test_a_curve_without_test_set_noise_gives_the_fixed_curve_s_interval():
    # every image right (or wrong) at each alpha: resampling cannot move the curve
    n = 300
    constant = {0.0: (np.zeros(n), np.ones(n)), 1.0: (np.ones(n), np.zeros(n))}
    rng = np.random.default_rng(4)
    method = tuple((rng.random((2, n)) < p).astype(float) for p in (0.6, 0.55))
    x, y = float(method[0].mean()), float(method[1].mean())
    paired = stats.wise_frontier_gap(_curve_of(constant), x, y, method_correct=method, curve_correct=constant,
                                     resamples=400, seed=7)
    fixed = stats.wise_frontier_gap(_curve_of(constant), x, y, method_correct=method, resamples=400, seed=7)
    assert paired.curve_resampled and paired.gap == fixed.gap
    got, want = paired.interval, fixed.interval  # the same draws, up to rounding of the resampled weights' sum
    assert (got.low, got.high, got.std) == pytest.approx((want.low, want.high, want.std), abs=1e-12)


def test_a_curve_on_other_images_is_refused():
    n = 100
    curve_correct = {0.0: (np.zeros(n + 1), np.ones(n)), 1.0: (np.ones(n + 1), np.zeros(n))}  # one ID image more
    method = (np.full((1, n), 0.5), np.full((1, n), 0.5))
    with pytest.raises(ValueError, match="different images"):
        stats.wise_frontier_gap([(0.0, 0.0, 1.0), (1.0, 1.0, 0.0)], 0.5, 0.5, method_correct=method,
                                curve_correct=curve_correct, resamples=10)
