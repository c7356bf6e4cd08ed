"""One self-contained HTML page that summarises one or more finished (or running) sweeps.

Ray-free, like :mod:`dps_tune.results`, whose readers it builds on. The page holds:

* ID against OOD (accuracy and macro-F1) for every trial, coloured by method, with the
  zero-shot model marked: the effective-robustness plot of robust fine-tuning papers;
* the OOD metric against ``dps.masking`` for DPS trials, one panel per suppression arm;
* the sweep metric against epoch for every trial, so ASHA's early stops are visible;
* the best trial per method and the full results table;
* given the output of ``dps-tune wise`` or ``dps-tune soup`` beside the sweeps: WiSE-FT
  curves from the zero-shot star to each fine-tuned model and soups on the ID-vs-OOD
  plots, a table of each method alone, with WiSE-FT and as a soup, and each method's OOD
  test accuracy against CE's WiSE-FT curve at the same ID test accuracy, with an interval
  that resamples the method's and the curve's test images together (:func:`frontier_table`).

Images are PNGs embedded as base64 ``data:`` URIs and the CSS is inline, so the file
opens offline and can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dps_tune.config import DEFAULT_METRIC, SUPPRESS_MODES, best_of, default_mode, scalar_objective
from dps_tune.errors import UserError, first_line
from dps_tune.files import write_text
from dps_tune.sweep.results import (Trial, checkpoints, curve_correct, ended, ensemble_kind, load_trials,
                                    method_name, pareto_objectives, open_experiment, read_ensemble, results_table,
                                    trial_status)

logger = logging.getLogger(__name__)

ZERO_SHOT_FILE = "zero_shot.json"
DPI = 110
SUMMARY_METRICS = ("id_test_acc", "id_test_f1", "ood_test_acc", "ood_test_f1")
CI_COLUMNS = tuple(f"{m} 95% CI" for m in SUMMARY_METRICS)  # seeded bootstrap over the test images
ARM_TITLES = {"top": "most-moved rows suppressed", "bottom": "least-moved rows suppressed (matched)",
              "random": "random rows suppressed (matched control)",
              "random_global": "random rows over all tensors (unmatched)"}
HELD = "dps_params_held_frac"  # the share of all trainable parameters a DPS trial held at θ0
# Fixed colours and markers, so a method looks the same in every plot and every report.
METHOD_STYLE = {
    "ce": ("#1f77b4", "o"),
    "flyp": ("#ff7f0e", "s"),
    "dps (top)": ("#2ca02c", "^"),
    "dps (bottom)": ("#9467bd", "v"),
    "dps (random)": ("#d62728", "D"),
    "dps (random_global)": ("#bcbd22", "p"),
    "dps (masking 1.0)": ("#17becf", "h"),
}
SPARE_STYLES = [("#8c564b", "P"), ("#e377c2", "X"), ("#7f7f7f", "*")]
STATUS_STYLE = {  # line style and end marker of a learning curve
    "completed": ("-", "o"),
    "early-stopped": ("--", "x"),
    "running": (":", ">"),
    "interrupted": (":", ">"),
    "error": (":", "X"),
}
SPLIT_NAMES = {"id_val": "ID val", "id_test": "ID test", "ood_val": "OOD val", "ood_test": "OOD test"}
KIND_NAMES = {"acc": "accuracy", "f1": "macro-F1"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
.caption, .note { color: #555; max-width: 70em; } .note { font-style: italic; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; } .row figure { margin: 0; flex: 1 1 560px; }
figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; white-space: nowrap; }
th { background: #f3f3f3; position: sticky; top: 0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.zero-shot td { background: #fff6d5; font-weight: 600; }
tr.early-stopped td, tr.running td, tr.interrupted td { color: #777; } tr.error td { color: #a00; }
"""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Experiment:
    """One sweep directory as the report sees it."""

    name: str
    path: Path
    meta: dict[str, Any]
    trials: list[Trial]
    table: pd.DataFrame
    metric: str
    mode: str

    @property
    def finished(self) -> bool:
        return ended(self.meta)

    def status(self, trial: Trial) -> str:
        return trial_status(trial, self.meta.get("max_t"), self.finished)


def _method_order(methods: Iterable[str]) -> list[str]:
    known = list(METHOD_STYLE)
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


def _styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    styles, spare = {}, iter(SPARE_STYLES)
    for m in _method_order(methods):
        styles[m] = METHOD_STYLE.get(m) or next(spare, ("#000000", "o"))
    return styles


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_experiment(exp_dir: str | os.PathLike) -> Experiment:
    """Read one sweep directory; a missing directory or one without trials is a :class:`UserError`."""
    path, meta = open_experiment(exp_dir)
    tune = meta.get("tune") or {}
    metric, mode = scalar_objective(tune) if tune else (DEFAULT_METRIC, default_mode(DEFAULT_METRIC))
    trials = load_trials(path)
    return Experiment(meta.get("name") or path.resolve().name, path, meta, trials,
                      results_table(path, metric, mode), metric, mode)


def load_zero_shot(path: str | os.PathLike) -> dict[str, float]:
    """The ``*_acc`` and ``*_f1`` metrics of a zero-shot JSON file or of a checkpoint directory.

    A directory is read through its ``metrics.json``. The file holds one JSON object
    of metrics (``{"id_val_acc": 0.7, ...}``), optionally nested under ``"metrics"``.
    """
    src = Path(path)
    file = src / "metrics.json" if src.is_dir() else src
    if not file.is_file():
        what = "no metrics.json in this directory" if src.is_dir() else "no such file or directory"
        raise UserError(f"zero-shot metrics {str(src)!r}: {what}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"zero-shot metrics {str(file)!r}: not readable JSON ({first_line(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        data = data["metrics"]
    if not isinstance(data, dict):
        raise UserError(f"zero-shot metrics {str(file)!r}: expected a JSON object of metrics")
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


def _check_output(out: Path) -> None:
    """Fail before any plotting when the report cannot be written where asked."""
    if out.is_dir():
        raise UserError(f"report {str(out)!r}: is a directory; give a file name such as report.html")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"report {str(out)!r}: cannot create its directory ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"report {str(out)!r}: not writable")


# ---------------------------------------------------------------------------- helpers


def metric_label(name: str) -> str:
    """``ood_test_f1`` -> ``OOD test macro-F1``; unknown names are returned as they are."""
    split, _, kind = name.rpartition("_")
    if split in SPLIT_NAMES and kind in KIND_NAMES:
        return f"{SPLIT_NAMES[split]} {KIND_NAMES[kind]}"
    return name


def _twin(metric: str) -> str:
    """The same split in the other metric kind: accuracy <-> macro-F1."""
    if metric.endswith("_acc"):
        return metric[:-4] + "_f1"
    if metric.endswith("_f1"):
        return metric[:-3] + "_acc"
    return metric


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    # Figure renders through the Agg canvas without pyplot's global state; no "Software"
    # tag keeps matplotlib's web address out of the file.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _padded(values: Sequence[float], pad: float = 0.06) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.02)
    return lo - pad * span, hi + pad * span


@dataclass(frozen=True)
class _Point:
    trial: Trial
    method: str
    status: str

    def value(self, metric: str) -> float | None:
        v = self.trial.last.get(metric)
        return float(v) if _finite(v) else None


def _points(experiments: Sequence[Experiment]) -> list[_Point]:
    return [_Point(t, method_name(t.config), e.status(t)) for e in experiments for t in e.trials]


# ------------------------------------------------------------------------------ plots


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


def best_checkpoints(experiments: Sequence[Experiment], x_metric: str, y_metric: str) -> list[_Marked]:
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


def confirmed_means(experiments: Sequence[Experiment], x_metric: str, y_metric: str) -> list[_Marked]:
    """The methods' confirmed means (``dps-tune confirm``'s ``confirm.json``) with their 95% intervals."""
    from dps_tune.sweep.confirm import ZERO_SHOT, read_summary

    out = []
    for e in experiments:
        for method, row in ((read_summary(e.path) or {}).get("methods") or {}).items():
            x, y = row.get(x_metric), row.get(y_metric)
            if method == ZERO_SHOT or not x or not y or not _finite(x.get("mean")) or not _finite(y.get("mean")):
                continue
            out.append(_Marked(method, x["mean"], y["mean"], (x.get("low", x["mean"]), x.get("high", x["mean"])),
                               (y.get("low", y["mean"]), y.get("high", y["mean"])), len(row.get("seeds", []))))
    return out


def _logit(p: Any) -> Any:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def _expit(z: Any) -> Any:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def plot_id_ood(points: Sequence[_Point], x_metric: str, y_metric: str,
                zero_shot: Mapping[str, float] | None, curves: Sequence[_Curve] = (),
                soups: Sequence[_Soup] = (), best: Sequence[_Marked] = (),
                confirmed: Sequence[_Marked] = ()) -> Figure | None:
    """``y_metric`` against ``x_metric`` on logit-scaled axes; None when no trial has both.

    Each point says what it is: a trial's last report (the method's marker), its best
    checkpoint (``best``: a small diamond), a confirmed mean (``confirmed``: a large
    square with its 95% intervals). The zero-shot model is a star. ``curves`` (WiSE-FT)
    are drawn through their alphas with the chosen alpha ringed; ``soups`` as plus
    markers. The baseline trend (CE trials, else all trials) is a line fitted on
    logit-transformed accuracies, as effective robustness is measured.
    """
    data = [(p, p.value(x_metric), p.value(y_metric)) for p in points]
    data = [(p, x, y) for p, x, y in data if x is not None and y is not None]
    if not data:
        return None
    curves = [c for c in curves if all(_finite(m.get(x_metric)) and _finite(m.get(y_metric)) for _, m in c.points)]
    soups = [s for s in soups if _finite(s.metrics.get(x_metric)) and _finite(s.metrics.get(y_metric))]
    styles = _styles([*(p.method for p, _, _ in data), *(c.method for c in curves),
                      *(s.name for s in soups if s.name != "mixed"), *(m.method for m in (*best, *confirmed))])
    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.subplots()
    for method, (color, marker) in styles.items():
        for done in (True, False):
            sel = [(x, y) for p, x, y in data if p.method == method and (p.status == "completed") == done]
            if sel:
                xs, ys = zip(*sel)
                ax.scatter(xs, ys, s=46, marker=marker, linewidths=1.4, edgecolors=color,
                           facecolors=color if done else "none", alpha=0.9 if done else 0.7, zorder=3)
    xs_all = [x for _, x, _ in data]
    ys_all = [y for _, _, y in data]
    for b in best:
        ax.scatter([b.x], [b.y], s=22, marker="D", color=styles[b.method][0], edgecolors="black", linewidths=0.6,
                   zorder=4)
        xs_all.append(b.x)
        ys_all.append(b.y)
    for c in confirmed:
        color = styles[c.method][0]
        ax.errorbar([c.x], [c.y], xerr=[[c.x - c.x_range[0]], [c.x_range[1] - c.x]],
                    yerr=[[c.y - c.y_range[0]], [c.y_range[1] - c.y]], fmt="s", ms=10, color=color,
                    markeredgecolor="black", elinewidth=1.2, capsize=3, zorder=6)
        xs_all += list(c.x_range)
        ys_all += list(c.y_range)
    for c in curves:
        color = styles[c.method][0]
        xs, ys = [m[x_metric] for _, m in c.points], [m[y_metric] for _, m in c.points]
        ax.plot(xs, ys, color=color, lw=1.4, marker=".", ms=6, alpha=0.85, zorder=2.5)
        for a, m in c.points:
            if a == c.chosen:
                ax.scatter([m[x_metric]], [m[y_metric]], s=150, marker="o", facecolors="none", edgecolors=color,
                           linewidths=2.2, zorder=5)
        xs_all += xs
        ys_all += ys
    for sp in soups:
        color = styles[sp.name][0] if sp.name in styles else "black"
        ax.scatter([sp.metrics[x_metric]], [sp.metrics[y_metric]], s=140, marker="P", color=color,
                   edgecolors="black", linewidths=0.8, zorder=5)
        xs_all.append(sp.metrics[x_metric])
        ys_all.append(sp.metrics[y_metric])
    zs = zero_shot or {}
    has_zs = _finite(zs.get(x_metric)) and _finite(zs.get(y_metric))
    if has_zs:
        ax.scatter([zs[x_metric]], [zs[y_metric]], s=260, marker="*", color="gold", edgecolors="black",
                   linewidths=1.0, zorder=4)
        xs_all.append(zs[x_metric])
        ys_all.append(zs[y_metric])
    # Limits, the y = x line and the fit are worked out on the logit scale the axes use.
    xlim = tuple(_expit(_padded(list(_logit(xs_all)))))
    ylim = tuple(_expit(_padded(list(_logit(ys_all)))))
    line_z = np.linspace(float(_logit(min(xlim[0], ylim[0]))), float(_logit(max(xlim[1], ylim[1]))), 80)
    ax.plot(_expit(line_z), _expit(line_z), color="0.55", ls="--", lw=1.0, zorder=1)
    # The trend of plain CE fine-tunes is the baseline effective robustness is measured
    # against; without enough CE trials, the trend of all fine-tuned trials stands in.
    ce = [(x, y) for p, x, y in data if p.method == "ce"]
    base, base_name = (ce, "CE trials") if len({x for x, _ in ce}) >= 3 else (
        [(x, y) for _, x, y in data], "all trials")
    fitted = len({x for x, _ in base}) >= 3
    if fitted:
        slope, intercept = np.polyfit(_logit([x for x, _ in base]), _logit([y for _, y in base]), 1)
        ax.plot(_expit(line_z), _expit(slope * line_z + intercept), color="0.3", ls=":", lw=1.3, zorder=2)
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(f"{metric_label(x_metric)} (logit scale)")
    ax.set_ylabel(f"{metric_label(y_metric)} (logit scale)")
    ax.set_title(f"{metric_label(y_metric)} vs {metric_label(x_metric)}")
    ax.grid(True, alpha=0.3, which="both")
    handles = [Line2D([], [], ls="", marker=m, color=c, markersize=7, label=name) for name, (c, m) in styles.items()]
    handles.append(Line2D([], [], ls="", marker="o", color="0.3", markersize=7, label="a trial's last report"))
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.3",
                          markersize=7, label="hollow: early-stopped"))
    if best:
        handles.append(Line2D([], [], ls="", marker="D", color="0.6", markeredgecolor="black", markersize=5,
                              label="a trial's best checkpoint"))
    if confirmed:
        seeds = sorted({c.seeds for c in confirmed})
        handles.append(Line2D([], [], ls="", marker="s", color="0.6", markeredgecolor="black", markersize=9,
                              label=f"confirmed mean, 95% CI ({'/'.join(map(str, seeds))} seeds)"))
    if has_zs:
        handles.append(Line2D([], [], ls="", marker="*", markersize=13, markerfacecolor="gold",
                              markeredgecolor="black", label="zero-shot"))
    if curves:
        handles.append(Line2D([], [], color="0.3", lw=1.4, marker=".", label="WiSE-FT, alpha 0 to 1"))
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.3",
                              markeredgewidth=2, markersize=10, label="alpha chosen on validation"))
    if soups:
        handles.append(Line2D([], [], ls="", marker="P", color="0.3", markeredgecolor="black", markersize=10,
                              label="model soup"))
    handles.append(Line2D([], [], color="0.55", ls="--", label="y = x"))
    if fitted:
        handles.append(Line2D([], [], color="0.3", ls=":", label=f"fit on logit scale ({base_name})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8.5, frameon=False)
    return fig


def plot_pareto(experiments: Sequence[Experiment]) -> Figure | None:
    """Every trial's last ID-val against OOD-val metric (or the sweep's own two objectives), the front drawn.

    The front is the set of trials no other trial of the same experiment beats on both.
    """
    from dps_tune.stats import pareto_front

    metrics, modes = pareto_objectives(experiments[0].path)
    if len(metrics) != 2:
        return None
    x_metric, y_metric = metrics
    fig = Figure(figsize=(6.4, 5.4))
    ax = fig.subplots()
    drawn = False
    styles = _styles(method_name(t.config) for e in experiments for t in e.trials)
    for e in experiments:
        pts = [(t, t.last.get(x_metric), t.last.get(y_metric)) for t in e.trials]
        pts = [(t, x, y) for t, x, y in pts if _finite(x) and _finite(y)]
        if not pts:
            continue
        drawn = True
        for t, x, y in pts:
            color, marker = styles[method_name(t.config)]
            ax.scatter([x], [y], s=40, marker=marker, color=color, alpha=0.6, zorder=3)
        front = sorted((pts[i] for i in pareto_front([(x, y) for _, x, y in pts], modes)), key=lambda p: p[1])
        ax.plot([x for _, x, _ in front], [y for _, _, y in front], color="black", lw=1.2, ls="-", marker="o",
                markerfacecolor="none", markersize=11, zorder=4)
    if not drawn:
        return None
    ax.set_xlabel(f"{metric_label(x_metric)} (last report, {modes[0]})")
    ax.set_ylabel(f"{metric_label(y_metric)} (last report, {modes[1]})")
    ax.set_title("Pareto front on validation: ID against OOD")
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], ls="", marker=m, color=c, markersize=7, label=name) for name, (c, m) in styles.items()]
    handles.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=10,
                          label="Pareto front (ringed)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8.5, frameon=False)
    return fig


def _bootstrap_cells(trial: Trial, step: Any) -> dict[str, Any]:
    """95% bootstrap intervals of the test metrics of ``trial``'s checkpoint at ``step``, if it was kept.

    Also, under ``_correct``, its per-image correctness on the ID and OOD test splits
    (each [1, images]), for the comparison with CE's WiSE-FT curve.
    """
    from dps_tune.checkpoint import read_predictions
    from dps_tune.stats import bootstrap_interval

    for path, m in checkpoints(trial.path):
        if m.get("step") == step:
            out: dict[str, Any] = {}
            preds = read_predictions(path)
            for split, (y_true, y_pred) in preds.items():
                if split in ("id_test", "ood_test"):
                    iv = bootstrap_interval(y_true, y_pred)
                    out[f"{split}_acc 95% CI"] = f"[{iv['acc'].low:.3f}, {iv['acc'].high:.3f}]"
                    out[f"{split}_f1 95% CI"] = f"[{iv['f1'].low:.3f}, {iv['f1'].high:.3f}]"
            if "id_test" in preds and "ood_test" in preds:
                out["_correct"] = tuple((t == p).double().numpy()[None, :] for t, p in
                                        (preds["id_test"], preds["ood_test"]))
            return out
    return {}


def plot_masking(points: Sequence[_Point], zero_shot: Mapping[str, float] | None) -> Figure | None:
    """OOD test and OOD val metrics against ``dps.masking``, a column per suppression arm; None without DPS."""
    dps = [p for p in points if p.trial.param("algorithm") == "dps" and _finite(p.trial.param("dps.masking"))]
    kinds = [k for k in ("acc", "f1") if any(p.value(f"ood_test_{k}") is not None
                                             or p.value(f"ood_val_{k}") is not None for p in dps)]
    if not dps or not kinds:
        return None
    arms = sorted({str(p.trial.param("dps.suppress")) for p in dps},
                  key=lambda a: (SUPPRESS_MODES.index(a) if a in SUPPRESS_MODES else len(SUPPRESS_MODES), a))
    styles = _styles(f"dps ({a})" for a in arms)
    fig = Figure(figsize=(4.0 * len(arms) + 1.8, 3.3 * len(kinds)))
    axes = fig.subplots(len(kinds), len(arms), sharex=True, sharey="row", squeeze=False)
    split_markers = {"ood_test": "o", "ood_val": "^"}
    zs = zero_shot or {}
    for r, kind in enumerate(kinds):
        for c, arm in enumerate(arms):
            ax = axes[r][c]
            color, _ = styles[f"dps ({arm})"]
            for p in (p for p in dps if str(p.trial.param("dps.suppress")) == arm):
                done = p.status == "completed"
                for split, marker in split_markers.items():
                    y = p.value(f"{split}_{kind}")
                    if y is not None:
                        ax.scatter([p.trial.param("dps.masking")], [y], marker=marker, s=42, linewidths=1.3,
                                   edgecolors=color, facecolors=color if done else "none", zorder=3)
            for split, ls in (("ood_test", "--"), ("ood_val", ":")):
                if _finite(zs.get(f"{split}_{kind}")):
                    ax.axhline(zs[f"{split}_{kind}"], color="black", ls=ls, lw=1.0, zorder=1)
            ax.grid(True, alpha=0.3)
            if r == 0:
                ax.set_title(f"dps ({arm}): {ARM_TITLES.get(arm, arm + ' rows suppressed')}")
            if r == len(kinds) - 1:
                ax.set_xlabel("dps.masking (fraction of rows suppressed)")
            if c == 0:
                ax.set_ylabel(f"OOD {KIND_NAMES[kind]}")
    handles = [Line2D([], [], ls="", marker=m, color="0.25", markersize=7, label=SPLIT_NAMES[s])
               for s, m in split_markers.items()]
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.25",
                          markersize=7, label="hollow: early-stopped"))
    for split, ls in (("ood_test", "--"), ("ood_val", ":")):
        if any(_finite(zs.get(f"{split}_{k}")) for k in kinds):
            handles.append(Line2D([], [], color="black", ls=ls, label=f"zero-shot, {SPLIT_NAMES[split]}"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8.5, frameon=False)
    fig.tight_layout()
    return fig


def plot_params_held(points: Sequence[_Point], zero_shot: Mapping[str, float] | None) -> Figure | None:
    """OOD test metrics against the share of all trainable parameters each DPS trial held; None without DPS.

    Masking counts ranked rows; this counts parameters, which is what the model keeps of θ0.
    """
    dps = [p for p in points if p.trial.param("algorithm") == "dps" and p.value(HELD) is not None]
    kinds = [k for k in ("acc", "f1") if any(p.value(f"ood_test_{k}") is not None for p in dps)]
    if not dps or not kinds:
        return None
    styles = _styles(p.method for p in dps)
    fig = Figure(figsize=(4.6 * len(kinds) + 1.8, 3.6))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    zs = zero_shot or {}
    for ax, kind in zip(axes, kinds):
        for p in dps:
            y = p.value(f"ood_test_{kind}")
            if y is not None:
                color, marker = styles[p.method]
                ax.scatter([p.value(HELD)], [y], marker=marker, s=42, linewidths=1.3, edgecolors=color,
                           facecolors=color if p.status == "completed" else "none", zorder=3)
        if _finite(zs.get(f"ood_test_{kind}")):
            ax.axhline(zs[f"ood_test_{kind}"], color="black", ls="--", lw=1.0, zorder=1)
        ax.set_xlabel("fraction of all trainable parameters held at θ0")
        ax.set_ylabel(f"OOD test {KIND_NAMES[kind]}")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], ls="", marker=m, color=c, markersize=7, label=name) for name, (c, m) in styles.items()]
    handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.25",
                          markersize=7, label="hollow: early-stopped"))
    if any(_finite(zs.get(f"ood_test_{k}")) for k in kinds):
        handles.append(Line2D([], [], color="black", ls="--", label="zero-shot, OOD test"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8.5, frameon=False)
    fig.tight_layout()
    return fig


def asha_rungs(meta: Mapping[str, Any]) -> list[float]:
    """The epochs at which ASHA (Ray's ``ASHAScheduler``, one bracket) compares trials."""
    tune = meta.get("tune") or {}
    max_t, grace, rf = meta.get("max_t"), tune.get("grace_period"), tune.get("reduction_factor")
    if not (_finite(max_t) and _finite(grace) and _finite(rf)) or grace <= 0 or rf <= 1 or max_t <= grace:
        return []
    count = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [grace * rf ** k for k in range(count) if grace * rf ** k < max_t]


def plot_learning_curves(experiments: Sequence[Experiment], zero_shot: Mapping[str, float] | None) -> Figure:
    """The sweep metric against epoch for every trial; one panel per experiment."""
    methods = [method_name(t.config) for e in experiments for t in e.trials]
    styles = _styles(methods)
    fig = Figure(figsize=(11.0, 3.9 * len(experiments)))
    axes = fig.subplots(len(experiments), 1, squeeze=False)[:, 0]
    zs = zero_shot or {}
    for ax, exp in zip(axes, experiments):
        curves = {}
        for t in exp.trials:
            curve = [(h["epoch"], h[exp.metric]) for h in t.history
                     if _finite(h.get("epoch")) and _finite(h.get(exp.metric))]
            if curve:
                curves[t.trial_id] = (t, curve)
        # The trial holding the best single evaluation: the one `dps-tune best` exports.
        best = best_of(curves, lambda k: best_of((y for _, y in curves[k][1]), float, exp.mode),
                       exp.mode) if curves else None
        statuses = {exp.status(t) for t, _ in curves.values()}
        for trial_id, (t, curve) in curves.items():
            ls, end = STATUS_STYLE.get(exp.status(t), ("-", "o"))
            color, _ = styles[method_name(t.config)]
            xs, ys = zip(*curve)
            top = trial_id == best
            ax.plot(xs, ys, ls=ls, color=color, lw=2.8 if top else 1.4, alpha=1.0 if top else 0.8,
                    zorder=4 if top else 2)
            ax.plot(xs[-1:], ys[-1:], ls="", marker=end, color=color, markersize=6, mew=1.6, zorder=5 if top else 3)
        rungs = asha_rungs(exp.meta)
        for rung in rungs:
            ax.axvline(rung, color="0.6", ls="-.", lw=0.9, zorder=1)
        if _finite(zs.get(exp.metric)):
            ax.axhline(zs[exp.metric], color="black", ls="--", lw=1.0, zorder=1)
        stopped = sum(exp.status(t) == "early-stopped" for t in exp.trials)
        ax.set_title(f"{exp.name}: {len(exp.trials)} trials, {stopped} early-stopped", fontsize=10.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric_label(exp.metric)} ({exp.mode})")
        ax.grid(True, alpha=0.3)
        if _finite(exp.meta.get("max_t")):
            ax.set_xlim(0, exp.meta["max_t"] * 1.04)
        exp_methods = _method_order(method_name(t.config) for t in exp.trials)
        handles = [Line2D([], [], color=styles[m][0], lw=2.2, label=m) for m in exp_methods]
        handles += [Line2D([], [], color="0.25", ls=STATUS_STYLE[s][0], marker=STATUS_STYLE[s][1], label=s)
                    for s in STATUS_STYLE if s in statuses]
        if best is not None:
            handles.append(Line2D([], [], color="0.25", lw=2.8, label=f"best: {best}"))
        if rungs:
            handles.append(Line2D([], [], color="0.6", ls="-.", label="ASHA rung"))
        if _finite(zs.get(exp.metric)):
            handles.append(Line2D([], [], color="black", ls="--", label="zero-shot"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tables


def all_trials_table(experiments: Sequence[Experiment], zero_shot: Mapping[str, float] | None) -> pd.DataFrame:
    """Every experiment's ``results_table`` with an ``experiment`` column; the zero-shot row first."""
    frames = [e.table.assign(experiment=e.name) for e in experiments]
    table = pd.concat(frames, ignore_index=True)
    table = table[["experiment"] + [c for c in table.columns if c != "experiment"]]
    if zero_shot:
        row = {"experiment": "zero-shot", "trial_id": "zero-shot", "algorithm": "zero-shot", "status": ""}
        row.update({k: v for k, v in zero_shot.items() if k in table.columns})
        table = pd.concat([pd.DataFrame([row]), table], ignore_index=True)
    return table


def summary_table(experiments: Sequence[Experiment], zero_shot: Mapping[str, float] | None) -> pd.DataFrame:
    """The best-per-method table (see :func:`summary_rows`)."""
    return pd.DataFrame(summary_rows(experiments, zero_shot), columns=SUMMARY_COLUMNS)


SUMMARY_COLUMNS = ["method", "experiment", "trial_id", "epoch", "selected by", "selection value", *SUMMARY_METRICS,
                   *CI_COLUMNS, "trial status"]


def summary_rows(experiments: Sequence[Experiment], zero_shot: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """Per method: the evaluation best by its sweep's metric, over every report of every trial.

    Ray keeps each trial's best checkpoint by the sweep metric, so this is the checkpoint
    :func:`dps_tune.results.best_per_method` (and the demo) selects, found from the
    reports alone. Trials of one method are ranked together only when their sweeps select
    by the same metric and mode; otherwise each selection gets its own row.
    """
    groups: dict[tuple[str, str, str], list[tuple[float, Experiment, Trial, dict[str, Any]]]] = {}
    for e in experiments:
        for t in e.trials:
            for h in t.history:
                if _finite(h.get(e.metric)):
                    groups.setdefault((method_name(t.config), e.metric, e.mode), []).append((h[e.metric], e, t, h))
    order = _method_order(m for m, _, _ in groups)
    rows = []
    if zero_shot:
        rows.append({"method": "zero-shot", "experiment": "", "trial_id": "", "epoch": None, "selected by": "",
                     "selection value": None, **{m: zero_shot.get(m) for m in SUMMARY_METRICS}})
    for (method, metric, mode), members in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1:])):
        value, e, t, h = best_of(members, lambda m: m[0], mode)
        rows.append({"method": method, "experiment": e.name, "trial_id": t.trial_id, "epoch": h.get("epoch"),
                     "selected by": f"{metric} ({mode})", "selection value": value,
                     **{m: h.get(m) for m in SUMMARY_METRICS}, "trial status": e.status(t),
                     **_bootstrap_cells(t, h.get("step"))})
    return rows


def _ood_twin(metric: str) -> str:
    return metric.replace("id_val", "ood_val") if metric.startswith("id_val") else metric


def ensemble_table(curves: Sequence[_Curve], soups: Sequence[_Soup],
                   summaries: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per method: every point of its WiSE-FT curve, the alphas chosen on ID and on OOD validation, its soup.

    The alpha ``wise`` chose (on its ``--select`` metric, ID validation by default) is
    marked, and so is the alpha the same metric on OOD validation would choose, labelled
    as such: selecting on OOD validation uses OOD labels.
    """
    rows = []
    select = {s["kind"]: s.get("select", "") for s in summaries}
    wise_metric = select.get("wise") or DEFAULT_METRIC
    ood_metric = _ood_twin(wise_metric)
    for c in curves:
        by_alpha = dict(c.points)
        if 0.0 in by_alpha and not any(r["method"] == "zero-shot" for r in rows):
            rows.append({"method": "zero-shot", "variant": "alpha 0", **by_alpha[0.0]})
    for method in _method_order([*(c.method for c in curves), *(s.name for s in soups)]):
        for c in (c for c in curves if c.method == method):
            scored = [(a, m) for a, m in c.points if _finite(m.get(ood_metric))]
            on_ood = best_of(scored, lambda am: am[1][ood_metric], default_mode(ood_metric))[0] if scored else None
            for alpha, metrics in c.points:
                chosen = []
                if alpha == c.chosen:
                    chosen.append(f"chosen on {wise_metric}")
                if alpha == on_ood and ood_metric != wise_metric:
                    chosen.append(f"chosen on {ood_metric} (OOD validation)")
                variant = "fine-tuned (alpha 1)" if alpha == 1.0 else f"WiSE-FT, alpha {alpha:g}"
                rows.append({"method": method, "variant": variant, "alpha chosen": "; ".join(chosen), **metrics})
        for sp in (s for s in soups if s.name == method):
            rows.append({"method": method, "variant": f"soup of {sp.ingredients} of {sp.candidates}",
                         "alpha chosen": f"soup selected on {select.get('soup')}", **sp.metrics})
    columns = ["method", "variant", "alpha chosen", "id_val_f1", "ood_val_f1", *SUMMARY_METRICS]
    return pd.DataFrame(rows, columns=columns)


FRONTIER_PAIRED = "the method's and the curve's test images, paired"
FRONTIER_FIXED = "the method's test images; the curve held fixed (its wise output has no per-image predictions)"


def frontier_table(curves: Sequence[_Curve], best: Sequence[Mapping[str, Any]], confirmed: Sequence[_Marked],
                   x_metric: str = "id_test_acc", y_metric: str = "ood_test_acc") -> pd.DataFrame | None:
    """Each method against CE's WiSE-FT curve: its OOD minus the curve's OOD at the same ID; None without that curve.

    ``best`` rows are the best-per-method table's (selected on validation; their interval
    resamples the checkpoint's test images, from its recorded predictions); ``confirmed``
    are confirmed means (no per-image interval here: see ``confirm.json``). Where ``wise``
    recorded the curve's per-image predictions (``ce.correct``), each resample recomputes
    the curve's points on the same images as the method's (paired), so the interval counts
    the curve's own test-set noise too; otherwise (an older ``wise`` output) the curve is
    held fixed, and the row says so.
    """
    ce = next((c for c in curves if c.method == "ce"), None)
    if ce is None:
        return None
    curve = [(a, m[x_metric], m[y_metric]) for a, m in ce.points if _finite(m.get(x_metric))
             and _finite(m.get(y_metric))]
    if len(curve) < 2:
        return None
    from dps_tune.stats import wise_frontier_gap

    rows = []
    for b in best:
        x, y = b.get(x_metric), b.get(y_metric)
        if not (_finite(x) and _finite(y)):
            continue
        correct = b.get("_correct")
        gap = wise_frontier_gap(curve, x, y, method_correct=correct, curve_correct=ce.correct)
        rows.append({"method": b["method"], "point": "best checkpoint (selected on validation)", x_metric: x,
                     y_metric: y, "OOD minus CE's WiSE-FT curve": gap.gap,
                     "95% CI": f"[{gap.interval.low:+.4f}, {gap.interval.high:+.4f}]" if gap.interval else "",
                     "interval resamples": "" if gap.interval is None else FRONTIER_PAIRED if gap.curve_resampled
                     else FRONTIER_FIXED})
    for c in confirmed:
        gap = wise_frontier_gap(curve, c.x, c.y)
        rows.append({"method": c.method, "point": f"confirmed mean ({c.seeds} seeds)", x_metric: c.x, y_metric: c.y,
                     "OOD minus CE's WiSE-FT curve": gap.gap, "95% CI": "", "interval resamples": ""})
    return pd.DataFrame(rows, columns=["method", "point", x_metric, y_metric, "OOD minus CE's WiSE-FT curve",
                                       "95% CI", "interval resamples"])


def _cell(value: Any) -> tuple[str, bool]:
    """HTML text of a table cell and whether it is a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", False
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if isinstance(value, (int, np.integer)):
        return str(value), True
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}", True
    return html.escape(str(value)), False


def html_table(df: pd.DataFrame, table_id: str, row_class: Sequence[str] | None = None) -> str:
    """``df`` as an HTML table, numbers to 4 significant digits; ``row_class`` styles rows."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for value in row:
            text, numeric = _cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        cls = f' class="{html.escape(row_class[i])}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


# ------------------------------------------------------------------------------- page


def _figure_html(img_id: str, fig: Figure | None, alt: str, caption: str, missing: str) -> str:
    if fig is None:
        return f'<p class="note" id="{img_id}-missing">{html.escape(missing)}</p>'
    return (f'<figure><img id="{img_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _frontier_html(curves: Sequence[_Curve], best: Sequence[Mapping[str, Any]], confirmed: Sequence[_Marked]) -> str:
    table = frontier_table(curves, best, confirmed)
    if table is None or table.empty:
        return ""
    return f"""<h3>Against CE's WiSE-FT curve</h3>
<p class="caption">Each method's OOD test accuracy minus the OOD test accuracy of CE's WiSE-FT curve at the same ID
test accuracy (interpolated along alpha; empty where the method's ID accuracy lies outside the curve's). Above 0:
more robust than mixing CE with the zero-shot weights at that ID accuracy. The interval resamples the test images:
the method's from its checkpoint's predictions and, paired on the same images, the curve's from the predictions
<code>wise</code> recorded for each alpha, so it counts the curve's own test-set noise. Where the wise output has
no per-image predictions (an older <code>wise</code>), the curve is held fixed; the last column says which.</p>
{html_table(table, "frontier-table")}"""


def render_report(exp_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  zero_shot: Mapping[str, float] | str | os.PathLike | None = None,
                  x_metric: str = "id_test_acc", y_metric: str = "ood_test_acc") -> Path:
    """Write the HTML report of ``exp_dirs`` to ``out`` and return its path.

    ``zero_shot`` is a mapping of metrics, or a JSON file or checkpoint directory to read
    them from (:func:`load_zero_shot`). The ID-vs-OOD plot uses ``x_metric`` and
    ``y_metric`` and is repeated for their accuracy/macro-F1 twins. Raises
    :class:`UserError` for a missing directory, one without trials, or an unwritable ``out``.
    """
    if not exp_dirs:
        raise UserError("no experiment directory given")
    out = Path(out)
    seen: set[Path] = set()
    experiments, summaries = [], []
    for d in exp_dirs:
        if Path(d).resolve() not in seen:
            seen.add(Path(d).resolve())
            if Path(d).is_dir() and ensemble_kind(d):
                summaries.append(read_ensemble(d))
            else:
                experiments.append(load_experiment(d))
    if not experiments:
        raise UserError("no sweep among the directories: the output of wise and soup is drawn beside its sweeps")
    curves, soups = _ensembles(summaries)
    names = [e.name for e in experiments]
    # Two sweeps of the same name (from different storage roots) are told apart by path.
    experiments = [e if names.count(e.name) == 1 else replace(e, name=str(e.path)) for e in experiments]
    zero_shot_source = None
    if zero_shot is not None and not isinstance(zero_shot, Mapping):
        zero_shot_source = str(zero_shot)
        zero_shot = load_zero_shot(zero_shot)
    zs = dict(zero_shot) if zero_shot else None
    _check_output(out)  # after the cheap reads, so a bad input leaves no empty output directory behind

    points = _points(experiments)
    pairs = [(x_metric, y_metric)]
    if (_twin(x_metric), _twin(y_metric)) != (x_metric, y_metric):
        pairs.append((_twin(x_metric), _twin(y_metric)))
    scatter_html = []
    for x, y in pairs:
        kind = "f1" if y.endswith("_f1") else "acc"
        scatter_html.append(_figure_html(
            f"plot-id-ood-{kind}", plot_id_ood(points, x, y, zs, curves, soups, best_checkpoints(experiments, x, y),
                                               confirmed_means(experiments, x, y)),
            alt=f"Scatter plot of {metric_label(y)} against {metric_label(x)} for every trial, coloured by method"
                + (", zero-shot model marked with a star" if zs else ""),
            caption=f"{metric_label(y)} against {metric_label(x)} on logit-scaled axes. Each trial at its last "
                    "report (its method's marker) and at its best checkpoint by its sweep's metric (small diamond); "
                    "large squares with bars: confirmed means of `dps-tune confirm` with 95% intervals. Hollow "
                    "markers: trials ASHA stopped early (their metrics are from an early epoch). Dotted: the "
                    "baseline fitted on logit-transformed values."
                    + (" Star: the zero-shot model." if zs else "")
                    + (" Lines: WiSE-FT from alpha 0 (the zero-shot weights) to 1 (the fine-tuned model), "
                       "the alpha chosen on validation ringed." if curves else "")
                    + (" Plus signs: model soups." if soups else ""),
            missing=f"No trial reports both {x} and {y}."))
    pareto_html = _figure_html(
        "plot-pareto", plot_pareto(experiments),
        alt="Pareto front: every trial's ID validation metric against its OOD validation metric, "
            "the non-dominated trials ringed and joined",
        caption="Each trial at its last report. Ringed and joined: the trials no other trial of the same "
                "experiment beats on both (selection on robustness as well as ID).",
        missing="No trial reports both validation metrics.")
    masking_html = _figure_html(
        "plot-masking", plot_masking(points, zs),
        alt="OOD test and OOD val metrics against the DPS masking ratio, one panel per suppression arm",
        caption="DPS trials only, each at its last report: circles OOD test, triangles OOD val; "
                "hollow markers were stopped early by ASHA.",
        missing="No DPS trials in these experiments: there is nothing to plot against dps.masking.")
    held_html = _figure_html(
        "plot-params-held", plot_params_held(points, zs),
        alt="OOD test metrics against the fraction of all trainable parameters each DPS trial held at the "
            "pretrained weights, coloured by suppression arm",
        caption="DPS trials only, each at its last report. Masking counts ranked rows; this counts parameters, "
                "the share of the model kept at θ0 (the rest trains). Dashed: zero-shot.",
        missing="No DPS trial reports dps_params_held_frac (trials of dps_tune before 0.3 do not).")
    curves_html = _figure_html(
        "plot-learning-curves", plot_learning_curves(experiments, zs),
        alt="Learning curves: each sweep's selection metric against epoch for every trial; "
            "dashed curves ending in a cross were stopped early by ASHA",
        caption="Solid curves ending in a dot ran to the end; dashed curves ending in a cross were stopped "
                "early by ASHA at a rung (dash-dotted vertical lines).",
        missing="")

    trials = all_trials_table(experiments, zs)
    row_class = ["zero-shot" if r == "zero-shot" else str(s) for r, s in zip(trials["trial_id"], trials["status"])]
    best_rows = summary_rows(experiments, zs)
    summary = pd.DataFrame(best_rows, columns=SUMMARY_COLUMNS)
    summary_class = ["zero-shot" if m == "zero-shot" else "" for m in summary["method"]]

    ensemble_html = ""
    if summaries:
        table = ensemble_table(curves, soups, summaries)
        ensemble_html = f"""<section id="ensembles">
<h2>WiSE-FT and model soups</h2>
<p class="caption">For each method: every point of its WiSE-FT curve from the fine-tuned checkpoint (alpha 1)
towards the zero-shot weights, the alpha chosen on validation (never on test) and the alpha that OOD validation
would choose, each labelled, and the soup of its checkpoints. From {html.escape(", ".join(s.get("kind", "") for s in summaries))}
output(s).</p>
{html_table(table, "ensemble-table", ["zero-shot" if m == "zero-shot" else "" for m in table["method"]])}
{_frontier_html(curves, [r for r in best_rows if r["method"] != "zero-shot"],
                confirmed_means(experiments, "id_test_acc", "ood_test_acc"))}
</section>"""
    exp_rows = pd.DataFrame([{
        "experiment": e.name, "path": str(e.path.resolve()), "status": e.meta.get("status", "unknown"),
        "trials": len(e.trials), "selected by": f"{e.metric} ({e.mode})", "max_t": e.meta.get("max_t"),
    } for e in experiments])
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    title = "dps-tune report: " + ", ".join(e.name for e in experiments)
    zs_line = (f"<p>Zero-shot metrics from <code>{html.escape(zero_shot_source)}</code>.</p>" if zero_shot_source
               else "<p>Zero-shot metrics given by the caller.</p>" if zs else "<p>No zero-shot metrics given.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<p>Generated {html.escape(generated)} from {len(experiments)} experiment(s), {len(points)} trials.</p>
{html_table(exp_rows, "experiments")}
{zs_line}
<ul>
<li><a href="#effective-robustness">ID vs OOD</a>: every trial's last ID against OOD test metric, by method
(the effective-robustness plot), in accuracy and macro-F1.</li>
<li><a href="#masking">OOD vs masking</a>: DPS trials' OOD metrics against the fraction of rows suppressed,
per suppression arm.</li>
<li><a href="#learning-curves">Learning curves</a>: each sweep's selection metric against epoch for every
trial; ASHA's early stops end early.</li>
<li><a href="#summary">Best per method</a> and <a href="#results">all trials</a>: the numbers behind the plots.</li>
</ul>
</header>
<section id="effective-robustness">
<h2>ID vs OOD (effective robustness)</h2>
<p class="caption">Points above the dotted linear trend are more robust out of distribution than their
in-distribution performance predicts; the dashed line is y = x.</p>
<div class="row">{''.join(scatter_html)}</div>
</section>
{ensemble_html}
<section id="pareto">
<h2>Pareto front on validation</h2>
{pareto_html}
</section>
<section id="masking">
<h2>OOD metric vs DPS masking, and vs the parameters held</h2>
<div class="row">{masking_html}{held_html}</div>
</section>
<section id="learning-curves">
<h2>Learning curves</h2>
{curves_html}
</section>
<section id="summary">
<h2>Best trial per method</h2>
<p class="caption">For each method, the evaluation (any epoch of any trial) best by its sweep's selection
metric on validation data, and its ID and OOD test metrics: the checkpoint that <code>dps-tune best</code>
and the demo select. The 95% intervals are a seeded bootstrap over the test images (1,000 resamples,
macro-F1 over the labels present in each resample); they show the evaluation's sampling noise, not the
seed-to-seed spread (<code>dps-tune confirm</code> measures that).</p>
{html_table(summary, "summary-table", summary_class)}
</section>
<section id="results">
<h2>All trials</h2>
<p class="caption">Each trial's last report, sorted within each experiment by its selection metric.
Grey rows were stopped early by ASHA.</p>
{html_table(trials, "results-table", row_class)}
</section>
</body>
</html>
"""
    try:
        write_text(out, page)
    except OSError as exc:
        raise UserError(f"report {str(out)!r}: cannot write ({exc.strerror or first_line(exc)})") from None
    logger.info("report of %d experiment(s) written to %s (%.0f KiB)", len(experiments), out,
                out.stat().st_size / 1024)
    return out
