"""The report's figures: each a matplotlib :class:`Figure`, or None when there is nothing to draw.

Figures are made without pyplot, so drawing keeps no global state and needs no display.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dps_tune.config import SUPPRESS_MODES
from dps_tune.objectives import best_of
from dps_tune.sweep.report.loading import ReportedExperiment, _Curve, _finite, _Marked, _Point, _Soup
from dps_tune.sweep.report.style import ARM_TITLES, KIND_NAMES, SPLIT_NAMES, STATUS_STYLE, _styles, metric_label
from dps_tune.sweep.results import in_method_order, method_name, pareto_objectives
from dps_tune.sweep.sweep_file import SweepFile

HELD = "dps_params_held_frac"  # the share of all trainable parameters a DPS trial held at θ0


def _padded(values: Sequence[float], pad: float = 0.06) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = max(hi - lo, 0.02)
    return lo - pad * span, hi + pad * span


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


def plot_pareto(experiments: Sequence[ReportedExperiment]) -> Figure | None:
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


def asha_rungs(sweep: SweepFile) -> list[float]:
    """The epochs at which ASHA (Ray's ``ASHAScheduler``, one bracket) compares trials in ``sweep``."""
    tune = sweep.tune or {}
    max_t, grace, rf = sweep.max_t, tune.get("grace_period"), tune.get("reduction_factor")
    if not (_finite(max_t) and _finite(grace) and _finite(rf)) or grace <= 0 or rf <= 1 or max_t <= grace:
        return []
    count = int(math.log(max_t / grace) / math.log(rf) + 1)
    return [grace * rf ** k for k in range(count) if grace * rf ** k < max_t]


def plot_learning_curves(experiments: Sequence[ReportedExperiment], zero_shot: Mapping[str, float] | None) -> Figure:
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
        rungs = asha_rungs(exp.sweep)
        for rung in rungs:
            ax.axvline(rung, color="0.6", ls="-.", lw=0.9, zorder=1)
        if _finite(zs.get(exp.metric)):
            ax.axhline(zs[exp.metric], color="black", ls="--", lw=1.0, zorder=1)
        stopped = sum(exp.status(t) == "early-stopped" for t in exp.trials)
        ax.set_title(f"{exp.name}: {len(exp.trials)} trials, {stopped} early-stopped", fontsize=10.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric_label(exp.metric)} ({exp.mode})")
        ax.grid(True, alpha=0.3)
        if _finite(exp.sweep.max_t):
            ax.set_xlim(0, exp.sweep.max_t * 1.04)
        exp_methods = in_method_order(method_name(t.config) for t in exp.trials)
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
