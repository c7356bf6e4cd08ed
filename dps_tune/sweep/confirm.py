"""``dps-tune confirm``: retrain each method's selected configuration with fresh seeds, and say how sure we are.

1. **Select.** For each method (``ce``, ``flyp``, ``dps (top)``, ``dps (random)``) of the
   given experiments, the kept checkpoint best on a validation metric; its trial's
   resolved config is the method's configuration (the DPS reference pinned, as trained).
2. **Retrain.** Every configuration with seeds 1..N at its full ``optim.epochs``, no early
   stopping, as one Ray Tune run over (configuration × seed). The seed changes the data
   order, the augmentation and the random-suppression draw. The run is an experiment
   directory like a sweep's: ``results``, ``best`` and ``report`` read it.
3. **Summarise.** Per method and metric (the last evaluation of each seed): mean, standard
   deviation and a 95% t-interval over seeds; and paired differences on the seeds both
   methods ran, each with its 95% t-interval and whether it excludes 0:
   DPS(top) − DPS(random) (which rows are held), DPS(top) − CE, FLYP − CE.
   Written to ``confirm.json`` and ``confirm.csv`` in the experiment directory.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dps_tune.config import Config, TuneConfig, default_mode, to_dict, tune_config_from_dict
from dps_tune.errors import UserError
from dps_tune.files import write_json, write_text
from dps_tune.sweep import results, storage

# checkpoint, stats and reference import torch: they are imported where they are used, so
# `dps-tune confirm` refuses bad input before torch is imported.

CONFIRM_JSON, CONFIRM_CSV = "confirm.json", "confirm.csv"
METRICS = ("id_val_f1", "id_test_acc", "id_test_f1", "ood_val_f1", "ood_test_acc", "ood_test_f1")
PAIRS = (("dps (top)", "dps (random)"), ("dps (top)", "ce"), ("flyp", "ce"))


@dataclass(frozen=True)
class Variant:
    """A method's selected configuration, and where it was selected from."""

    method: str
    config: Config
    checkpoint: str
    trial: str
    value: float


def select_variants(exp_dirs: Sequence[str | os.PathLike], metric: str) -> list[Variant]:
    """Per method, the configuration of the kept checkpoint best on ``metric``."""
    if not exp_dirs:
        raise UserError("no experiment directory given")
    views = []
    for exp in exp_dirs:
        views.append(results.open_experiment(exp)[0])
    finished = [v for v in views if any(t.history for t in results.load_trials(v))]
    if not finished:
        raise UserError(f"{', '.join(map(str, exp_dirs))}: no trial has reported yet; nothing to confirm")
    best = results.best_per_method(finished, metric, default_mode(metric))
    if not best:
        raise UserError(f"--select {metric}: no kept checkpoint of {', '.join(map(str, exp_dirs))} reports it")
    from dps_tune import checkpoint as ckpt

    return [Variant(b["method"], ckpt.read_config(b["checkpoint"]), storage.source(b["checkpoint"]), b["trial"],
                    float(b[metric])) for b in best]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "eval_csvs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def overrides(base: Config, cfg: Config) -> dict[str, Any]:
    """The dotted keys whose values differ between ``base`` and ``cfg``."""
    a, b = _flatten(to_dict(base)), _flatten(to_dict(cfg))
    return {k: v for k, v in b.items() if a.get(k) != v}


def seed_points(variants: Sequence[Variant], seeds: Sequence[int]) -> tuple[Config, list[dict[str, Any]]]:
    """The run's base config (the first variant) and one parameter dict per (variant, seed)."""
    base = variants[0].config
    return base, [{**overrides(base, v.config), "seed": s} for v in variants for s in seeds]


def run_tune(sweep_tune: dict[str, Any], select: str, overrides: dict[str, Any] | None = None) -> TuneConfig:
    """The confirmation run's tune block: the sweep's resources, one metric, one kept checkpoint, no early stop."""
    return tune_config_from_dict({**sweep_tune, "metric": select, "mode": default_mode(select), "asha_metric": "",
                                  "keep_checkpoints": 1, "max_t": 0, **(overrides or {})})


def dps_ranking(configs: Sequence[Config]) -> Any:
    """The DPS ranking the configurations share (None without DPS); several references are refused."""
    dps = [c for c in configs if c.algorithm == "dps"]
    refs = {c.dps.reference for c in dps}
    if len(refs) > 1:
        raise UserError(f"the DPS configurations use different references ({', '.join(sorted(map(str, refs)))}); "
                        "confirm one DPS stage at a time")
    if not dps:
        return None
    from dps_tune.sweep import reference

    return reference.resolve(dps[0]).ranking


def summarize(exp_dir: str | os.PathLike, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Per-method intervals and the paired differences of a confirmation run's trials."""
    from dps_tune import stats

    per_method: dict[str, dict[int, dict[str, float]]] = {}
    for t in results.load_trials(exp_dir):
        if not t.history or t.last.get("epoch", 0) < (t.param("optim.epochs") or 0):
            continue  # an unfinished seed would mix epochs into the interval
        per_method.setdefault(results.method_name(t.config), {})[int(t.param("seed"))] = t.last
    out: dict[str, Any] = {"methods": {}, "pairs": []}
    for method, by_seed in per_method.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for m in metrics:
            values = [by_seed[s][m] for s in sorted(by_seed) if m in by_seed[s]]
            if len(values) >= 2:
                iv = stats.t_interval(values)
                row[m] = {"mean": iv.mean, "std": iv.std, "low": iv.low, "high": iv.high, "n": iv.n,
                          "values": values}
        out["methods"][method] = row
    for a, b in PAIRS:
        if a not in per_method or b not in per_method:
            continue
        shared = sorted(set(per_method[a]) & set(per_method[b]))
        if len(shared) < 2:
            continue
        for m in metrics:
            iv = stats.paired_difference({s: per_method[a][s][m] for s in shared},
                                         {s: per_method[b][s][m] for s in shared})
            out["pairs"].append({"a": a, "b": b, "metric": m, "mean": iv.mean, "low": iv.low, "high": iv.high,
                                 "n": iv.n, "seeds": shared, "excludes_zero": iv.excludes_zero})
    return out


def format_summary(summary: dict[str, Any], metrics: Sequence[str] = ("id_test_acc", "ood_test_acc")) -> str:
    """The table people read: mean [95% interval] per method, then the paired differences."""
    head = f"{'method':<16} {'seeds':>5} " + " ".join(f"{m + ' mean [95% CI]':>30}" for m in metrics)
    lines = [head, "-" * len(head)]
    for method, row in summary["methods"].items():
        cells = []
        for m in metrics:
            r = row.get(m)
            cells.append(f"{r['mean']:.4f} [{r['low']:.4f}, {r['high']:.4f}]" if r else "n/a")
        lines.append(f"{method:<16} {len(row['seeds']):>5} " + " ".join(f"{c:>30}" for c in cells))
    pairs = [p for p in summary["pairs"] if p["metric"] in metrics]
    if pairs:
        lines.append("")
        lines.append("paired differences on the same seeds (95% t-interval; * = excludes 0):")
        for p in pairs:
            mark = "*" if p["excludes_zero"] else " "
            lines.append(f"  {p['a']} - {p['b']:<14} {p['metric']:<14} {p['mean']:+.4f} "
                         f"[{p['low']:+.4f}, {p['high']:+.4f}] {mark} (n={p['n']})")
    return "\n".join(lines)


def selected(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """What the run records of its selection (in its sweep file, so ``resume`` can write the summary too)."""
    return [{"method": v.method, "checkpoint": v.checkpoint, "trial": v.trial, "value": v.value} for v in variants]


def write_summary(exp_dir: str | os.PathLike, summary: dict[str, Any], chosen: Sequence[dict[str, Any]] = ()) -> None:
    exp = Path(exp_dir)
    write_json(exp / CONFIRM_JSON, {**summary, "selected": list(chosen)})
    rows = [["method", "metric", "mean", "std", "low", "high", "n"]]
    for method, row in summary["methods"].items():
        for m in METRICS:
            if m in row:
                r = row[m]
                rows.append([method, m, r["mean"], r["std"], r["low"], r["high"], r["n"]])
    for p in summary["pairs"]:
        rows.append([f"{p['a']} - {p['b']}", p["metric"], p["mean"], "", p["low"], p["high"], p["n"]])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write_text(exp / CONFIRM_CSV, buf.getvalue())


def read_summary(exp_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(exp_dir) / CONFIRM_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
