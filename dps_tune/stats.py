"""Uncertainty: t-intervals over seeds, bootstrap intervals, Holm, Pareto fronts.

* :func:`t_interval`: the mean of per-seed values with a two-sided Student-t interval,
  mean ± t(1 − (1 − c)/2, n − 1) · s / √n, s the sample standard deviation (ddof 1).
* :func:`bootstrap_interval`: resample the evaluation images with replacement (seeded),
  recompute accuracy and macro-F1 on each resample, and take the percentile interval.
  Macro-F1 is averaged, in each resample, over the labels present in that resample's
  ground truth, as the WILDS metric is on the full split.
* :func:`two_level_bootstrap`: a method's mean accuracy over seeds with an interval that
  counts both seed-to-seed variation and test-set sampling: each resample draws the seeds,
  then the test images (one draw for every seed: the images are crossed with the seeds).
  :func:`paired_two_level_bootstrap` resamples both sides of a difference together.
* :func:`holm`, :func:`holm_family`: Holm's step-down adjustment of a family of comparisons.
* :func:`pareto_front`: the trials no other trial beats on every objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import stats as sps

from dps_tune.metrics import classification_metrics


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    std: float = math.nan

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided t-interval of ``values`` (at least 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {x.size}")
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), std)


def bootstrap_interval(y_true: torch.Tensor, y_pred: torch.Tensor, *, resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, Interval]:
    """Percentile bootstrap intervals of accuracy (``acc``) and macro-F1 (``f1``) over the evaluation images."""
    y_true, y_pred = torch.as_tensor(y_true).long(), torch.as_tensor(y_pred).long()
    n = y_true.numel()
    if n == 0:
        raise ValueError("no evaluation images to resample")
    gen = torch.Generator().manual_seed(seed)
    k = int(max(y_true.max(), y_pred.max())) + 1
    accs, f1s = np.empty(resamples), np.empty(resamples)
    for i in range(resamples):
        idx = torch.randint(n, (n,), generator=gen)
        accs[i], f1s[i] = _acc_f1(y_true[idx], y_pred[idx], k)
    full = classification_metrics("s", y_true, y_pred)
    q = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)
    return {"acc": Interval(full["s_acc"], *np.percentile(accs, q), n=n),
            "f1": Interval(full["s_f1"], *np.percentile(f1s, q), n=n)}


def _acc_f1(y_true: torch.Tensor, y_pred: torch.Tensor, k: int) -> tuple[float, float]:
    """Accuracy and macro-F1 over the labels present in ``y_true``, by counting: O(N + k).

    Per label c: F1 = 2·TP / (2·TP + FP + FN) = 2·TP / (#true c + #predicted c);
    the same figure as :func:`dps_tune.metrics.macro_f1` (tested).
    """
    hit = y_true == y_pred
    tp = torch.bincount(y_true[hit], minlength=k).double()
    true = torch.bincount(y_true, minlength=k).double()
    pred = torch.bincount(y_pred, minlength=k).double()
    present = true > 0
    f1 = 2 * tp[present] / (true[present] + pred[present])
    return float(hit.double().mean()), float(f1.mean())


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated ``points`` (one value per objective; ``modes`` max or min each).

    A point is dominated when another is at least as good on every objective and
    strictly better on one. Points with a NaN are never on the front.
    """
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    p = np.asarray(points, dtype=np.float64) * signs
    ok = ~np.isnan(p).any(axis=1)
    front = []
    for i in range(len(p)):
        if not ok[i]:
            continue
        others = p[ok]
        dominated = ((others >= p[i]).all(axis=1) & (others > p[i]).any(axis=1)).any()
        if not dominated:
            front.append(i)
    return front


# ------------------------------------------------------- seeds and test images together


@dataclass(frozen=True)
class Bootstrap:
    """A statistic (``point``) and its bootstrap draws, from which intervals at any level are read."""

    point: float
    draws: np.ndarray
    seeds: int

    def interval(self, confidence: float = 0.95) -> Interval:
        """The percentile interval; ``std`` is the bootstrap standard error."""
        q = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)
        low, high = np.percentile(self.draws, q)
        return Interval(self.point, float(low), float(high), self.seeds, float(self.draws.std(ddof=1)))

    @property
    def p_value(self) -> float:
        """Two-sided percentile p-value of "the statistic is 0": the smallest 1 − level whose interval excludes 0."""
        r = self.draws.size
        below, above = (np.sum(self.draws <= 0) + 1) / (r + 1), (np.sum(self.draws >= 0) + 1) / (r + 1)
        return float(min(1.0, 2 * min(below, above)))


def _resampled_means(sides: Sequence[np.ndarray], signs: Sequence[float], resamples: int, seed: int,
                     chunk: int = 256) -> np.ndarray:
    """``resamples`` draws of Σ sign · mean(side), seeds and images resampled together.

    Every side is a [seeds, images] matrix over the same images; sides with the same
    number of seeds share each draw of seed indices (the same seeds, paired), a side with
    one row (zero-shot) keeps it. One draw of image indices serves every side and seed:
    the test set is one sample of images, crossed with the seeds (a two-way bootstrap).
    """
    rng = np.random.default_rng(seed)
    n_img = sides[0].shape[1]
    counts = {x.shape[0] for x in sides}
    out = np.empty(resamples)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        img = rng.multinomial(n_img, np.full(n_img, 1.0 / n_img), size=r).T / n_img  # [images, r] weights
        seed_w = {s: rng.multinomial(s, np.full(s, 1.0 / s), size=r) / s for s in counts}  # [r, seeds]
        total = np.zeros(r)
        for x, sign in zip(sides, signs):
            per_seed = x @ img  # [seeds, r]: each seed's accuracy on the resampled images
            total += sign * np.einsum("rs,sr->r", seed_w[x.shape[0]], per_seed)
        out[start:start + r] = total
    return out


def _as_matrix(correct: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    x = np.asarray(correct, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected a [seeds, images] matrix of per-image scores, got shape {x.shape}")
    return x


def two_level_bootstrap(correct: Sequence[Sequence[float]] | np.ndarray, *, resamples: int = 4000, seed: int = 0,
                        ) -> Bootstrap:
    """Mean accuracy over seeds, with an interval that counts seed-to-seed and test-set variation.

    ``correct`` is [seeds, images]: 1 where a seed's model classified the image right
    (any per-image score works). Each resample draws the seeds with replacement, then the
    test images with replacement (the same images for every seed), and averages; the
    interval is the percentile interval of those averages (:meth:`Bootstrap.interval`).
    """
    x = _as_matrix(correct)
    return Bootstrap(float(x.mean()), _resampled_means([x], [1.0], resamples, seed), x.shape[0])


def paired_two_level_bootstrap(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray,
                               *, resamples: int = 4000, seed: int = 0) -> Bootstrap:
    """mean(a) − mean(b), resampling both sides together: the same seeds and the same images.

    ``a`` and ``b`` are [seeds, images] on the same images, row i of each from seed i;
    a side with one row (a deterministic model such as zero-shot) is compared with every
    seed of the other.
    """
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sides were evaluated on different images ({a.shape[1]} and {b.shape[1]})")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"paired sides need the same seeds ({a.shape[0]} and {b.shape[0]} rows)")
    draws = _resampled_means([a, b], [1.0, -1.0], resamples, seed)
    return Bootstrap(float(a.mean() - b.mean()), draws, max(a.shape[0], b.shape[0]))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the k-th of m (1-based) becomes p_(k) · (m − k + 1), made monotone
    by a running maximum and capped at 1. A hypothesis is rejected at level α when its
    adjusted p-value is at most α, which is Holm's procedure: stop at the first p_(k)
    above α / (m − k + 1).
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, p[i] * (m - k)))
        adjusted[i] = running
    return adjusted.tolist()


def holm_levels(p_values: Sequence[float], confidence: float = 0.95) -> list[float]:
    """The confidence level of each comparison's Holm-adjusted interval, in the input order.

    The k-th smallest p-value of m is tested at α / (m − k + 1), so its interval is
    drawn at 1 − α / (m − k + 1): the smallest p-value gets the Bonferroni level, the
    largest the unadjusted one.
    """
    alpha = 1 - confidence
    m = len(p_values)
    levels = [0.0] * m
    for k, i in enumerate(np.argsort(np.asarray(p_values, dtype=np.float64), kind="stable")):
        levels[i] = 1 - alpha / (m - k)
    return levels


@dataclass(frozen=True)
class Verdict:
    """One comparison of a Holm-adjusted family."""

    interval: Interval  # at ``level``
    level: float
    p_value: float
    adjusted_p: float
    differs: bool  # the adjusted test rejects "no difference", so the adjusted interval excludes 0


def holm_family(comparisons: Sequence[Bootstrap], confidence: float = 0.95) -> list[Verdict]:
    """Holm-adjust a family of bootstrap comparisons: adjusted p-values and intervals at Holm's levels.

    A comparison is called a difference only when its adjusted p-value is at most
    1 − ``confidence`` and its adjusted interval excludes 0; otherwise the data cannot tell.
    """
    p = [c.p_value for c in comparisons]
    adjusted, levels = holm(p), holm_levels(p, confidence)
    out = []
    for c, pv, adj, level in zip(comparisons, p, adjusted, levels):
        iv = c.interval(level)
        out.append(Verdict(iv, level, pv, adj, adj <= 1 - confidence and iv.excludes_zero))
    return out


# -------------------------------------------------------------- against a WiSE-FT curve


def curve_ood_at(curve: Sequence[tuple[float, float, float]], id_acc: float) -> float | None:
    """The OOD accuracy of a WiSE-FT curve at ``id_acc``, interpolated linearly along alpha.

    ``curve`` holds ``(alpha, id_acc, ood_acc)`` points. Between each two neighbouring
    alphas the curve is a straight line in (ID, OOD); where it passes ``id_acc`` more than
    once, the highest OOD accuracy (the frontier) counts. None when ``id_acc`` lies outside
    the curve's ID range.
    """
    pts = sorted(curve)
    found = []
    for (_, i0, o0), (_, i1, o1) in zip(pts, pts[1:]):
        if min(i0, i1) <= id_acc <= max(i0, i1):
            found.append(max(o0, o1) if i1 == i0 else o0 + (id_acc - i0) / (i1 - i0) * (o1 - o0))
    if len(pts) == 1 and pts[0][1] == id_acc:
        found.append(pts[0][2])
    return max(found) if found else None


@dataclass(frozen=True)
class FrontierGap:
    """A method's OOD accuracy minus the curve's at the same ID accuracy (None outside the curve's range)."""

    gap: float | None
    interval: Interval | None  # None without per-image predictions, or when resamples leave the curve's range
    curve_resampled: bool  # whether the curve's own points were resampled on the same images too


def wise_frontier_gap(curve: Sequence[tuple[float, float, float]], id_acc: float, ood_acc: float, *,
                      method_correct: tuple[Any, Any] | None = None,
                      curve_correct: Mapping[float, tuple[Any, Any]] | None = None,
                      resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> FrontierGap:
    """``ood_acc`` minus the OOD accuracy of a WiSE-FT ``curve`` (alpha, ID, OOD) at ``id_acc``.

    ``method_correct`` is ``(id, ood)``: [seeds, images] per-image correctness on the ID and
    OOD test splits (one row for one checkpoint); with it, the interval comes from
    resampling the seeds and the images of each split. ``curve_correct`` maps each alpha
    to its ``(id, ood)`` per-image correctness on the same images; with it the curve is
    recomputed on every resample's images (paired), otherwise it is held fixed.
    """
    point = curve_ood_at(curve, id_acc)
    gap = None if point is None else ood_acc - point
    if gap is None or method_correct is None:
        return FrontierGap(gap, None, False)
    rng = np.random.default_rng(seed)
    m_id, m_ood = _as_matrix(method_correct[0]), _as_matrix(method_correct[1])
    alphas = [a for a, _, _ in sorted(curve)]
    paired = curve_correct is not None and all(a in curve_correct for a in alphas)
    if paired:  # [alphas, images] per split
        c_id = np.stack([np.asarray(curve_correct[a][0], dtype=np.float64) for a in alphas])
        c_ood = np.stack([np.asarray(curve_correct[a][1], dtype=np.float64) for a in alphas])
        if c_id.shape[1] != m_id.shape[1] or c_ood.shape[1] != m_ood.shape[1]:
            raise ValueError(f"the curve and the method were evaluated on different images (ID {c_id.shape[1]} "
                             f"and {m_id.shape[1]}, OOD {c_ood.shape[1]} and {m_ood.shape[1]})")
    draws = []
    for _ in range(resamples):
        seeds = rng.integers(0, m_id.shape[0], m_id.shape[0])
        w_id = np.bincount(rng.integers(0, m_id.shape[1], m_id.shape[1]), minlength=m_id.shape[1]) / m_id.shape[1]
        w_ood = np.bincount(rng.integers(0, m_ood.shape[1], m_ood.shape[1]), minlength=m_ood.shape[1]) / m_ood.shape[1]
        mid, mood = float((m_id[seeds] @ w_id).mean()), float((m_ood[seeds] @ w_ood).mean())
        if paired:
            resampled = list(zip(alphas, (c_id @ w_id).tolist(), (c_ood @ w_ood).tolist()))
        else:
            resampled = curve
        at = curve_ood_at(resampled, mid)
        if at is not None:
            draws.append(mood - at)
    if len(draws) < 0.9 * resamples:  # the method's ID often falls outside the curve: no honest interval
        return FrontierGap(gap, None, paired)
    b = Bootstrap(gap, np.asarray(draws), m_id.shape[0])
    return FrontierGap(gap, b.interval(confidence), paired)
