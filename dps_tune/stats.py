"""Uncertainty: t-intervals over seeds, paired differences, bootstrap intervals, Pareto fronts.

* :func:`t_interval`: the mean of per-seed values with a two-sided Student-t interval,
  mean ± t(1 − (1 − c)/2, n − 1) · s / √n, s the sample standard deviation (ddof 1).
* :func:`paired_difference`: the same interval on a − b over the seeds both share, so the
  seed-to-seed variation the two methods have in common cancels.
* :func:`bootstrap_interval`: resample the evaluation images with replacement (seeded),
  recompute accuracy and macro-F1 on each resample, and take the percentile interval.
  Macro-F1 is averaged, in each resample, over the labels present in that resample's
  ground truth, as the WILDS metric is on the full split.
* :func:`pareto_front`: the trials no other trial beats on every objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

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


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Interval:
    """t-interval of a[seed] − b[seed] over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds], confidence)


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
