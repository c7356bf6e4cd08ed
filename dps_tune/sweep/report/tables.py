"""The report's tables as DataFrames: all trials, the best trial per method, WiSE-FT and soups, the frontier gap."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from dps_tune.objectives import DEFAULT_METRIC, best_of, default_mode
from dps_tune.sweep.report.loading import ReportedExperiment, _Curve, _finite, _Marked, _Soup
from dps_tune.sweep.results import Trial, checkpoints, in_method_order, method_name

SUMMARY_METRICS = ("id_test_acc", "id_test_f1", "ood_test_acc", "ood_test_f1")
CI_COLUMNS = tuple(f"{m} 95% CI" for m in SUMMARY_METRICS)  # seeded bootstrap over the test images


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


def all_trials_table(experiments: Sequence[ReportedExperiment], zero_shot: Mapping[str, float] | None) -> pd.DataFrame:
    """Every experiment's ``results_table`` with an ``experiment`` column; the zero-shot row first."""
    frames = [e.table.assign(experiment=e.name) for e in experiments]
    table = pd.concat(frames, ignore_index=True)
    table = table[["experiment"] + [c for c in table.columns if c != "experiment"]]
    if zero_shot:
        row = {"experiment": "zero-shot", "trial_id": "zero-shot", "algorithm": "zero-shot", "status": ""}
        row.update({k: v for k, v in zero_shot.items() if k in table.columns})
        table = pd.concat([pd.DataFrame([row]), table], ignore_index=True)
    return table


def summary_table(experiments: Sequence[ReportedExperiment], zero_shot: Mapping[str, float] | None) -> pd.DataFrame:
    """The best-per-method table (see :func:`summary_rows`)."""
    return pd.DataFrame(summary_rows(experiments, zero_shot), columns=SUMMARY_COLUMNS)


SUMMARY_COLUMNS = ["method", "experiment", "trial_id", "epoch", "selected by", "selection value", *SUMMARY_METRICS,
                   *CI_COLUMNS, "trial status"]


def summary_rows(experiments: Sequence[ReportedExperiment], zero_shot: Mapping[str, float] | None
                 ) -> list[dict[str, Any]]:
    """Per method: the evaluation best by its sweep's metric, over every report of every trial.

    Ray keeps each trial's best checkpoint by the sweep metric, so this is the checkpoint
    :func:`dps_tune.sweep.results.best_per_method` (and the demo) selects, found from the
    reports alone. Trials of one method are ranked together only when their sweeps select
    by the same metric and mode; otherwise each selection gets its own row.
    """
    groups: dict[tuple[str, str, str], list[tuple[float, ReportedExperiment, Trial, dict[str, Any]]]] = {}
    for e in experiments:
        for t in e.trials:
            for h in t.history:
                if _finite(h.get(e.metric)):
                    groups.setdefault((method_name(t.config), e.metric, e.mode), []).append((h[e.metric], e, t, h))
    order = in_method_order(m for m, _, _ in groups)
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
    for method in in_method_order([*(c.method for c in curves), *(s.name for s in soups)]):
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
CONFIRMED_PAIRED = "the seeds, then the test images (the curve's too, paired)"
CONFIRMED_FIXED = "the seeds, then the method's test images; the curve held fixed (no per-image predictions)"


def frontier_table(curves: Sequence[_Curve], best: Sequence[Mapping[str, Any]], confirmed: Sequence[_Marked],
                   x_metric: str = "id_test_acc", y_metric: str = "ood_test_acc") -> pd.DataFrame | None:
    """Each method against CE's WiSE-FT curve: its OOD minus the curve's OOD at the same ID; None without that curve.

    ``best`` rows are the best-per-method table's (selected on validation; their interval
    resamples the checkpoint's test images, from its recorded predictions); ``confirmed``
    are confirmed means (their interval resamples the seeds, then each seed's test images,
    when the seeds' predictions were kept: :func:`confirmed_means`). Where ``wise``
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
        gap = wise_frontier_gap(curve, c.x, c.y, method_correct=c.correct, curve_correct=ce.correct)
        rows.append({"method": c.method, "point": f"confirmed mean ({c.seeds} seeds)", x_metric: c.x, y_metric: c.y,
                     "OOD minus CE's WiSE-FT curve": gap.gap,
                     "95% CI": f"[{gap.interval.low:+.4f}, {gap.interval.high:+.4f}]" if gap.interval else "",
                     "interval resamples": "" if gap.interval is None else CONFIRMED_PAIRED if gap.curve_resampled
                     else CONFIRMED_FIXED})
    return pd.DataFrame(rows, columns=["method", "point", x_metric, y_metric, "OOD minus CE's WiSE-FT curve",
                                       "95% CI", "interval resamples"])
