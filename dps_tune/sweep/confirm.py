"""``dps-tune confirm``: retrain each method's selected configuration with fresh seeds, and say how sure we are.

1. **Select.** For each method (``ce``, ``flyp``, ``dps (top)``) of the given experiments,
   the kept checkpoint best on a validation metric; its trial's resolved config is the
   method's configuration (the DPS reference pinned, as trained).
2. **Controls at DPS's configuration.** DPS's selected configuration (masking, quota,
   exclusions, lr, wd, …) is also run with ``suppress: random`` and ``suppress: bottom``
   (matched: as many rows held in every tensor as ``top`` holds) and with
   ``masking: 1.0`` (every ranked row held: only the excluded tensors train). They replace
   DPS arms a sweep tuned on their own, so the arms differ only in which rows are held.
3. **Retrain.** Every configuration with seeds 1..N at its full ``optim.epochs``, no early
   stopping, as one Ray Tune run over (configuration × seed). The seed changes the data
   order, the augmentation and the random-suppression draw. The run is an experiment
   directory like a sweep's: ``results``, ``best`` and ``report`` read it.
4. **Zero-shot** (the pretrained model itself) is evaluated once, with its per-image
   predictions, into ``zero_shot/`` of the run, and is a row of the table.
5. **Summarise.** Per method, the test accuracies' mean over seeds with a 95% interval
   from a two-level bootstrap (seeds, then the test images, from each seed's last
   checkpoint's per-image predictions), and for the other metrics a t-interval over
   seeds. Then the family of comparisons (:data:`PAIRS` and every method against
   zero-shot, on each test accuracy), each a paired two-level bootstrap on the same seeds
   and images, Holm-adjusted over the whole family: a comparison is called a difference
   only when its adjusted interval excludes 0. Written to ``confirm.json`` and
   ``confirm.csv`` in the experiment directory.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dps_tune.config import (Config, TuneConfig, leaves, tune_config_from_dict, validate, validate_tune,
                             with_overrides)
from dps_tune.errors import UserError
from dps_tune.files import json_object_or_none, read_json_object, write_json, write_text
from dps_tune.layout import METRICS_FILE
from dps_tune.objectives import default_mode
from dps_tune.paths import is_remote
from dps_tune.sweep import results, storage
from dps_tune.sweep.sweep_file import Confirmation, SweepFile

# checkpoint, stats and reference import torch: they are imported where they are used, so
# `dps-tune confirm` refuses bad input before torch is imported.

CONFIRM_JSON, CONFIRM_CSV = "confirm.json", "confirm.csv"
ZERO_SHOT_DIR, ZERO_SHOT = "zero_shot", "zero-shot"
METRICS = ("id_val_f1", "id_test_acc", "id_test_f1", "ood_val_f1", "ood_test_acc", "ood_test_f1")
# The accuracies compared with per-image predictions (seeds and images resampled together).
COMPARED = ("id_test_acc", "ood_test_acc")
DEFAULT_SEEDS = 5
TOP, MASKING_ALL = "dps (top)", results.MASKING_ALL
# The controls confirm runs at DPS (top)'s selected configuration: method name -> dps overrides.
CONTROLS = {"dps (random)": {"suppress": "random"}, "dps (bottom)": {"suppress": "bottom"},
            MASKING_ALL: {"suppress": "top", "masking": 1.0}}
PAIRS = ((TOP, "dps (random)"), (TOP, "dps (bottom)"), (TOP, MASKING_ALL), (TOP, "ce"), ("flyp", "ce"))


@dataclass(frozen=True)
class Variant:
    """A method's selected configuration, and where it was selected from."""

    method: str
    config: Config
    checkpoint: str
    trial: str
    value: float


def select_variants(exp_dirs: Sequence[str | os.PathLike], metric: str, *, controls: bool = True) -> list[Variant]:
    """Per method, the configuration of the kept checkpoint best on ``metric``.

    With ``controls`` and a DPS (top) among them: the :data:`CONTROLS` at its
    configuration (see :func:`with_controls`).
    """
    if not exp_dirs:
        raise UserError("no experiment directory given")
    views = []
    for exp in exp_dirs:
        views.append(results.open_sweep(exp)[0])
    finished = [v for v in views if any(t.history for t in results.load_trials(v))]
    if not finished:
        raise UserError(f"{', '.join(map(str, exp_dirs))}: no trial has reported yet; nothing to confirm")
    best = results.best_per_method(finished, metric, default_mode(metric))
    if not best:
        raise UserError(f"--select {metric}: no kept checkpoint of {', '.join(map(str, exp_dirs))} reports it")
    from dps_tune import checkpoint as ckpt

    chosen = [Variant(b["method"], ckpt.read_config(b["checkpoint"]), storage.source(b["checkpoint"]), b["trial"],
                      float(b[metric])) for b in best]
    return with_controls(chosen) if controls else chosen


def with_controls(variants: Sequence[Variant]) -> list[Variant]:
    """``variants`` with every other DPS arm replaced by the controls at DPS (top)'s configuration.

    Each control is DPS (top)'s selected config with only the suppression kind (or the
    masking, for ``masking 1.0``) changed, so it shares the masking, quota, exclusions, lr,
    wd and seeds. Without a DPS (top), ``variants`` come back as they are.
    """
    top = next((v for v in variants if v.method == TOP), None)
    if top is None:
        return list(variants)
    out = [v for v in variants if v.config.algorithm != "dps" or v.method == TOP]
    for method, change in CONTROLS.items():
        cfg = dataclasses.replace(top.config, dps=dataclasses.replace(top.config.dps, **change))
        validate(cfg)
        out.append(Variant(method, cfg, top.checkpoint, top.trial, top.value))
    return out


def overrides(base: Config, cfg: Config) -> dict[str, Any]:
    """The dotted keys whose values differ between ``base`` and ``cfg``, with ``cfg``'s values."""
    old = {key: value for key, _, value in leaves(base)}
    return {key: value for key, _, value in leaves(cfg) if old[key] != value}


def run_tune(sweep_tune: Mapping[str, Any], select: str, overrides: Mapping[str, Any] | None = None) -> TuneConfig:
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


def run_confirmation(exp_dirs: Sequence[str | os.PathLike], select: str, seeds: Sequence[int], *, name: str,
                     storage_path: str | None, config_overrides: Mapping[str, Any] | None = None,
                     tune_overrides: Mapping[str, Any] | None = None, skip: Sequence[str] = (),
                     address: str | None = None, dashboard: bool = True, shared_storage: bool = False,
                     announce: Callable[[Sequence[Variant]], None] = lambda variants: None,
                     ) -> tuple[str, list[Variant]]:
    """Select each method's configuration (and DPS's controls), check the run, and train it with ``seeds``.

    The flow of `dps-tune confirm` and of the demo's confirmation alike. The run's tune
    block (:func:`run_tune` of the first experiment's, with ``tune_overrides``) is checked
    against that experiment's base config and against every selected configuration (with
    ``config_overrides`` applied), and its trackers are checked, before anything trains.
    Methods in ``skip`` are left out; ``announce`` sees the rest before the run starts.
    Returns where the run is and what it confirms (see :func:`conclude`).
    """
    if not exp_dirs:
        raise UserError("no experiment directory given")
    first = results.open_sweep(exp_dirs[0])[1]
    tune_cfg = run_tune(first.tune or {}, select, tune_overrides)
    validate_tune(tune_cfg, first.base_config())  # again below, with each selected config
    variants = [v for v in select_variants(exp_dirs, select) if v.method not in skip]
    configs = [with_overrides(v.config, config_overrides or {}) for v in variants]
    for c in configs:
        validate_tune(tune_cfg, c)
    from dps_tune import preflight

    preflight.check_loggers(tune_cfg.loggers)  # the sweep's trackers follow it into the confirmation
    ranking = dps_ranking(configs)
    announce(variants)
    from dps_tune.sweep import ray_tune

    base = configs[0]
    location = ray_tune.run_points(base, [overrides(base, c) for c in configs], list(seeds), tune_cfg,
                                   ranking=ranking, name=name, storage_path=storage_path, address=address,
                                   dashboard=dashboard, shared_storage=shared_storage,
                                   confirm=record(select, seeds, variants, exp_dirs))
    return location, variants


def conclude(exp: str, chosen: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of a finished confirmation run (after :func:`run_confirmation`, or after `resume` of a killed
    one); written beside it (``confirm.json``, ``confirm.csv``) unless it is on remote storage."""
    view = storage.local_view(exp)
    summary = summarize(view)
    if not is_remote(exp):
        write_summary(view, summary, chosen)
    return summary


def zero_shot(exp_dir: str | os.PathLike) -> Path:
    """The run's zero-shot evaluation (``zero_shot/``: metrics and per-image predictions), made once.

    It evaluates the pretrained model of the run's base config on its evaluation splits,
    in this process, as every trial evaluates.
    """
    out = Path(exp_dir) / ZERO_SHOT_DIR
    if not (out / METRICS_FILE).is_file():
        from dps_tune import checkpoint as ckpt
        from dps_tune.train import evaluate_start

        cfg = SweepFile.load(exp_dir).base_config()
        predictions: dict = {}
        metrics = evaluate_start(cfg, predictions)
        ckpt.save_evaluation(out, metrics, predictions)
    return out


def _last_predictions(trial: results.Trial) -> dict[str, Any]:
    """Per test split, the per-image correctness [images] of the trial's last evaluation ({} if not kept)."""
    from dps_tune.checkpoint import read_predictions

    last = [(p, m) for p, m in results.checkpoints(trial.path) if m.get("epoch") == trial.last.get("epoch")]
    if not last:
        return {}
    return _correct(read_predictions(last[-1][0]))


def _correct(predictions: dict) -> dict[str, Any]:
    return {f"{split}_acc": (y_true.numpy(), (y_true == y_pred).numpy().astype(float))
            for split, (y_true, y_pred) in predictions.items() if split.endswith("_test")}


def finished_seeds(exp_dir: str | os.PathLike) -> tuple[dict[str, dict[int, dict[str, float]]],
                                                          dict[str, dict[int, dict[str, Any]]]]:
    """Per method and seed, the last metrics of each seed that trained to its end, and its per-image
    correctness on the test splits (``{metric: (labels, correct)}``)."""
    per_method: dict[str, dict[int, dict[str, float]]] = {}
    correct: dict[str, dict[int, dict[str, Any]]] = {}
    for t in results.load_trials(exp_dir):
        if not t.history or t.last.get("epoch", 0) < (t.param("optim.epochs") or 0):
            continue  # an unfinished seed would mix epochs into the interval
        method, seed = results.method_name(t.config), int(t.param("seed"))
        per_method.setdefault(method, {})[seed] = t.last
        correct.setdefault(method, {})[seed] = _last_predictions(t)
    return per_method, correct


def wise_mix_sides(exp_dir: str | os.PathLike, method: str, alpha: float, metric: str = "ood_test_acc",
                   ) -> tuple[Any, Any, Any] | None:
    """``method``'s WiSE-FT mix at ``alpha`` over the confirmed seeds, beside the two ends of its curve.

    Each seed of ``method`` that trained to its end has its last checkpoint mixed with the
    pretrained weights (``(1 − alpha) θ0 + alpha θ``) and evaluated on ``metric``'s split.
    Returns the per-image correctness ``(mix, fine-tuned, zero-shot)``: [seeds, images],
    [seeds, images] (the same seeds, in the same order) and [1, images]; None when no seed
    of ``method`` finished with a kept checkpoint.
    """
    import numpy as np

    from dps_tune import checkpoint as ckpt
    from dps_tune.weight_space import Evaluator, interpolate

    _, correct = finished_seeds(exp_dir)
    seeds = sorted(s for s, side in correct.get(method, {}).items() if metric in side)
    if not seeds:
        return None
    last = {}
    for t in results.load_trials(exp_dir):
        if results.method_name(t.config) == method and t.param("seed") in seeds:
            kept = [p for p, m in results.checkpoints(t.path) if m.get("epoch") == t.last.get("epoch")]
            last[int(t.param("seed"))] = kept[-1]
    mixed = []
    for seed in seeds:
        evaluator = Evaluator(ckpt.read_config(last[seed]))
        predictions: dict = {}
        evaluator(interpolate(evaluator.theta0, ckpt.load_checkpoint(last[seed], with_state=False).model_state, alpha),
                  [metric.removesuffix("_acc")], predictions)
        labels, mix = _correct(predictions)[metric]
        if not np.array_equal(labels, correct[method][seed][metric][0]):
            raise UserError(f"{method} seed {seed}: its mix was evaluated on other images than its confirmation")
        mixed.append(mix)
    zero_labels, zero = _correct(ckpt.read_predictions(zero_shot(exp_dir)))[metric]
    if not np.array_equal(labels, zero_labels):
        raise UserError(f"{method}: its mix was evaluated on other images than zero-shot")
    return np.stack(mixed), matrix(correct[method], seeds, metric), zero[None]


def summarize(exp_dir: str | os.PathLike, metrics: Sequence[str] = METRICS, *, with_zero_shot: bool = True,
              resamples: int = 4000) -> dict[str, Any]:
    """Per-method intervals and the Holm-adjusted family of paired comparisons of a confirmation run.

    ``with_zero_shot`` evaluates the zero-shot model (once, see :func:`zero_shot`) and
    makes it a row and a side of the comparisons.
    """
    from dps_tune import stats
    from dps_tune.checkpoint import read_predictions

    per_method, correct = finished_seeds(exp_dir)
    zs = None
    if with_zero_shot and per_method:
        zs_dir = zero_shot(exp_dir)
        zs = {"metrics": read_json_object(zs_dir / METRICS_FILE, f"zero-shot evaluation {str(zs_dir)!r}"),
              "correct": _correct(read_predictions(zs_dir))}
    out: dict[str, Any] = {"methods": {}, "pairs": [], "interval": "two-level bootstrap (seeds, then test images)",
                           "adjustment": "holm"}
    for method, by_seed in per_method.items():
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"seeds": seeds}
        for m in metrics:
            values = [by_seed[s][m] for s in seeds if m in by_seed[s]]
            mat = matrix(correct[method], seeds, m) if m in COMPARED else None
            if mat is not None:
                iv = stats.two_level_bootstrap(mat, resamples=resamples).interval()
                row[m] = {"mean": iv.mean, "std": iv.std, "low": iv.low, "high": iv.high, "n": len(seeds),
                          "values": values, "kind": "bootstrap"}
            elif len(values) >= 2:
                iv = stats.t_interval(values)
                row[m] = {"mean": iv.mean, "std": iv.std, "low": iv.low, "high": iv.high, "n": iv.n,
                          "values": values, "kind": "t"}
        out["methods"][method] = row
    if zs is not None:
        row = {"seeds": []}
        for m in metrics:
            if m in zs["correct"]:
                iv = stats.two_level_bootstrap(zs["correct"][m][1], resamples=resamples).interval()
                row[m] = {"mean": iv.mean, "std": iv.std, "low": iv.low, "high": iv.high, "n": 1, "kind": "bootstrap"}
            elif m in zs["metrics"]:
                row[m] = {"mean": zs["metrics"][m], "n": 1}
        out["methods"][ZERO_SHOT] = row
    pairs = [p for p in PAIRS if p[0] in per_method and p[1] in per_method]
    pairs += [(m, ZERO_SHOT) for m in per_method if zs is not None]
    family, boots = [], []
    for a, b in pairs:
        shared = sorted(set(per_method[a]) & set(per_method[b])) if b != ZERO_SHOT else sorted(per_method[a])
        for m in COMPARED:
            left = matrix(correct[a], shared, m)
            right = (matrix({0: zs["correct"]}, [0], m) if b == ZERO_SHOT else matrix(correct[b], shared, m))
            if left is None or right is None or len(shared) < (1 if b == ZERO_SHOT else 2):
                continue
            _same_images(exp_dir, a, b, m, correct[a][shared[0]][m][0],
                         zs["correct"][m][0] if b == ZERO_SHOT else correct[b][shared[0]][m][0])
            boots.append(stats.paired_two_level_bootstrap(left, right, resamples=resamples, seed=len(boots)))
            family.append({"a": a, "b": b, "metric": m, "seeds": shared, "n": len(shared)})
    for entry, boot, verdict in zip(family, boots, stats.holm_family(boots)):
        iv = verdict.interval
        entry.update({"mean": iv.mean, "low": iv.low, "high": iv.high, "level": verdict.level,
                      "p": verdict.p_value, "adjusted_p": verdict.adjusted_p, "differs": verdict.differs,
                      "excludes_zero": verdict.differs, "family": len(boots)})
        out["pairs"].append(entry)
    return out


def matrix(by_seed: dict[int, dict[str, Any]], seeds: Sequence[int], metric: str) -> Any:
    """[seeds, images] per-image correctness on ``metric``'s split, or None if a seed lacks it."""
    import numpy as np

    rows = [by_seed.get(s, {}).get(metric) for s in seeds]
    if not rows or any(r is None for r in rows):
        return None
    return np.stack([r[1] for r in rows])


def _same_images(exp_dir: Any, a: str, b: str, metric: str, labels_a: Any, labels_b: Any) -> None:
    import numpy as np

    if labels_a.shape != labels_b.shape or not np.array_equal(labels_a, labels_b):
        raise UserError(f"confirmation {str(exp_dir)!r}: {a} and {b} were evaluated on different images "
                        f"for {metric}; they cannot be paired")


def format_summary(summary: dict[str, Any], metrics: Sequence[str] = COMPARED) -> str:
    """The table people read: mean [95% interval] per method, then the Holm-adjusted comparisons."""
    head = f"{'method':<18} {'seeds':>5} " + " ".join(f"{m + ' mean [95% CI]':>30}" for m in metrics)
    lines = [head, "-" * len(head)]
    for method, row in summary["methods"].items():
        cells = []
        for m in metrics:
            r = row.get(m)
            cells.append(f"{r['mean']:.4f} [{r['low']:.4f}, {r['high']:.4f}]" if r and "low" in r else
                         f"{r['mean']:.4f}" if r else "n/a")
        seeds = len(row["seeds"]) if row["seeds"] else "-"
        lines.append(f"{method:<18} {seeds:>5} " + " ".join(f"{c:>30}" for c in cells))
    lines.append("intervals: two-level bootstrap over seeds and test images (zero-shot: test images only); "
                 "metrics without per-image predictions: t over seeds")
    pairs = [p for p in summary["pairs"] if p["metric"] in metrics]
    if pairs:
        lines.append("")
        lines.append(f"comparisons, Holm-adjusted over the family of {pairs[0]['family']} (paired two-level bootstrap "
                     "on the same seeds and test images; interval at Holm's level for each):")
        width = max(len(f"{p['a']} - {p['b']}") for p in pairs)
        for p in pairs:
            verdict = "a difference" if p["differs"] else "the data cannot tell"
            lines.append(f"  {p['a'] + ' - ' + p['b']:<{width}}  {p['metric']:<13} {p['mean']:+.4f} "
                         f"[{p['low']:+.4f}, {p['high']:+.4f}] at {100 * p['level']:.1f}%  adj. p {p['adjusted_p']:.3f}"
                         f"  {verdict:<20} ({p['n']} seeds)")
    return "\n".join(lines)


def selected(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """What the run records of its selection (in its sweep file, so ``resume`` can write the summary too)."""
    return [{"method": v.method, "checkpoint": v.checkpoint, "trial": v.trial, "value": v.value} for v in variants]


def record(select: str, seeds: Sequence[int], variants: Sequence[Variant], experiments: Sequence[Any] = ()
           ) -> Confirmation:
    """What the confirmation run's sweep file records: the selection metric, the seeds and :func:`selected`."""
    return Confirmation(select, tuple(seeds), tuple(selected(variants)), tuple(str(e) for e in experiments))


def write_summary(exp_dir: str | os.PathLike, summary: dict[str, Any], chosen: Sequence[Mapping[str, Any]] = ()
                  ) -> None:
    exp = Path(exp_dir)
    write_json(exp / CONFIRM_JSON, {**summary, "selected": [dict(c) for c in chosen]})
    rows = [["method", "metric", "mean", "std", "low", "high", "n", "level", "adjusted_p", "verdict"]]
    for method, row in summary["methods"].items():
        for m in METRICS:
            if m in row:
                r = row[m]
                rows.append([method, m, r["mean"], r.get("std", ""), r.get("low", ""), r.get("high", ""), r["n"],
                             0.95 if "low" in r else "", "", ""])
    for p in summary["pairs"]:
        rows.append([f"{p['a']} - {p['b']}", p["metric"], p["mean"], "", p["low"], p["high"], p["n"], p["level"],
                     p["adjusted_p"], "a difference" if p["differs"] else "the data cannot tell"])
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    write_text(exp / CONFIRM_CSV, buf.getvalue())


def read_summary(exp_dir: str | os.PathLike) -> dict[str, Any] | None:
    return json_object_or_none(Path(exp_dir) / CONFIRM_JSON)
