"""Reading sweeps, ensembles and zero-shot metrics into what the figures and tables draw.

Built on the readers of :mod:`dps_tune.sweep.results`: one :class:`ReportedExperiment` per sweep
directory, the WiSE-FT curves and soups of ``dps-tune wise`` and ``dps-tune soup``, and
the points marked on the ID-vs-OOD plot beside each trial's last report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from dps_tune.errors import UserError
from dps_tune.files import read_json_object
from dps_tune.layout import METRICS_FILE
from dps_tune.objectives import best_of
from dps_tune.sweep.results import (Trial, curve_correct, load_trials, method_name, open_sweep, results_table,
                                    trial_status)
from dps_tune.sweep.sweep_file import SweepFile

ZERO_SHOT_FILE = "zero_shot.json"


@dataclass(frozen=True)
class ReportedExperiment:
    """One sweep directory as the report sees it."""

    name: str
    path: Path
    sweep: SweepFile
    trials: list[Trial]
    table: pd.DataFrame
    metric: str
    mode: str

    @property
    def finished(self) -> bool:
        return self.sweep.ended

    def status(self, trial: Trial) -> str:
        return trial_status(trial, self.sweep.max_t, self.finished)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_experiment(exp_dir: str | os.PathLike) -> ReportedExperiment:
    """Read one sweep directory; a missing directory or one without trials is a :class:`UserError`."""
    path, sweep = open_sweep(exp_dir)
    metric, mode = sweep.objective()
    trials = load_trials(path)
    return ReportedExperiment(sweep.name or path.resolve().name, path, sweep, trials,
                              results_table(path, metric, mode), metric, mode)


def load_zero_shot(path: str | os.PathLike) -> dict[str, float]:
    """The ``*_acc`` and ``*_f1`` metrics of a zero-shot JSON file or of a checkpoint directory.

    A directory is read through its ``metrics.json``. The file holds one JSON object
    of metrics (``{"id_val_acc": 0.7, ...}``), optionally nested under ``"metrics"``.
    """
    src = Path(path)
    file = src / METRICS_FILE if src.is_dir() else src
    if not file.is_file():
        what = f"no {METRICS_FILE} in this directory" if src.is_dir() else "no such file or directory"
        raise UserError(f"zero-shot metrics {str(src)!r}: {what}")
    data = read_json_object(file, f"zero-shot metrics {str(file)!r}")
    if isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    metrics = {str(k): float(v) for k, v in data.items() if str(k).endswith(("_acc", "_f1")) and _finite(v)}
    if not metrics:
        raise UserError(f"zero-shot metrics {str(file)!r}: no *_acc or *_f1 metric in it")
    return metrics


def find_zero_shot(exp_dirs: Sequence[str | os.PathLike]) -> Path | None:
    """The first ``zero_shot.json`` next to one of ``exp_dirs`` (in their parent), if any."""
    for exp in exp_dirs:
        candidate = Path(exp).resolve().parent / ZERO_SHOT_FILE
        if candidate.is_file():
            return candidate
    return None



@dataclass(frozen=True)
class _Point:
    trial: Trial
    method: str
    status: str

    def value(self, metric: str) -> float | None:
        v = self.trial.last.get(metric)
        return float(v) if _finite(v) else None


def _points(experiments: Sequence[ReportedExperiment]) -> list[_Point]:
    return [_Point(t, method_name(t.config), e.status(t)) for e in experiments for t in e.trials]


@dataclass(frozen=True)
class _Curve:
    """A WiSE-FT curve of one method: (alpha, metrics) from alpha 0 to 1, and the alpha chosen.

    ``correct`` maps each alpha to its per-image correctness (id_test, ood_test), [images]
    each, from the predictions ``wise`` recorded; None where it recorded none.
    """

    method: str
    points: list[tuple[float, dict[str, float]]]
    chosen: float
    correct: Mapping[float, tuple[np.ndarray, np.ndarray]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class _Soup:
    name: str  # a method, or "mixed"
    ingredients: int
    candidates: int
    metrics: dict[str, float]


def _ensembles(summaries: Sequence[Mapping[str, Any]]) -> tuple[list[_Curve], list[_Soup]]:
    curves, soups = [], []
    for s in summaries:
        if s["kind"] == "wise":
            for method, rec in s.get("methods", {}).items():
                rows = sorted((r for r in s["rows"] if r["method"] == method and r["checkpoint"] == rec["checkpoint"]),
                              key=lambda r: r["alpha"])
                correct = curve_correct(s["path"], rows) if rows and "path" in s else None
                curves.append(_Curve(method, [(float(r["alpha"]), r) for r in rows], float(rec["alpha"]), correct))
        else:
            for name, rec in s.get("soups", {}).items():
                soups.append(_Soup(name, len(rec["ingredients"]), rec["candidates"], rec["metrics"]))
    return curves, soups


@dataclass(frozen=True)
class _Marked:
    """A point that is not a trial's last report: its best checkpoint, or a confirmed mean with its intervals."""

    method: str
    x: float
    y: float
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None
    seeds: int = 0
    # a confirmed mean's [seeds, images] per-image correctness on the x and y metrics' test splits
    # (from the seeds' recorded predictions), when both are test accuracies and every seed kept them
    correct: tuple[Any, Any] | None = field(default=None, compare=False, repr=False)


def best_checkpoints(experiments: Sequence[ReportedExperiment], x_metric: str, y_metric: str) -> list[_Marked]:
    """Each trial's evaluation best by its sweep's metric (the checkpoint Ray keeps), at ``x_metric`` / ``y_metric``."""
    out = []
    for e in experiments:
        for t in e.trials:
            rows = [h for h in t.history if _finite(h.get(e.metric)) and _finite(h.get(x_metric))
                    and _finite(h.get(y_metric))]
            if rows:
                h = best_of(rows, lambda r: r[e.metric], e.mode)
                out.append(_Marked(method_name(t.config), float(h[x_metric]), float(h[y_metric])))
    return out


def confirmed_means(experiments: Sequence[ReportedExperiment], x_metric: str, y_metric: str) -> list[_Marked]:
    """The methods' confirmed means (``dps-tune confirm``'s ``confirm.json``) with their 95% intervals."""
    from dps_tune.sweep.confirm import ZERO_SHOT, finished_seeds, matrix, read_summary

    out = []
    for e in experiments:
        methods = (read_summary(e.path) or {}).get("methods") or {}
        per_image = None  # read once per confirmation, only when a row can use it
        for method, row in methods.items():
            x, y = row.get(x_metric), row.get(y_metric)
            if method == ZERO_SHOT or not x or not y or not _finite(x.get("mean")) or not _finite(y.get("mean")):
                continue
            seeds = [int(s) for s in row.get("seeds", [])]
            correct = None
            if seeds and x_metric.endswith("_test_acc") and y_metric.endswith("_test_acc"):
                if per_image is None:
                    per_image = finished_seeds(e.path)[1]
                mats = [matrix(per_image.get(method, {}), seeds, m) for m in (x_metric, y_metric)]
                correct = (mats[0], mats[1]) if all(m is not None for m in mats) else None
            out.append(_Marked(method, x["mean"], y["mean"], (x.get("low", x["mean"]), x.get("high", x["mean"])),
                               (y.get("low", y["mean"]), y.get("high", y["mean"])), len(seeds), correct))
    return out
