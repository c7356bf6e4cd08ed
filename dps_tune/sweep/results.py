"""Reading experiments from disk: trials, their metrics, and the best checkpoints.

Ray-free: it reads the files an experiment directory holds, so it works on a laptop
over a copy of a cluster's results. A sweep directory looks like::

    EXP/dps_tune_sweep.json            base config, search space, tune settings, status
    EXP/optuna.db                      the Optuna study (pruned trials included)
    EXP/<trial>/params.json            the trial's searched values (dotted config keys)
    EXP/<trial>/dps_tune_config.json   the trial's resolved config (base + params), for people
    EXP/<trial>/result.json            one JSON line per evaluation
    EXP/<trial>/events.out.tfevents.*  TensorBoard curves
    EXP/<trial>/checkpoint_NNNNNN/     model.safetensors, config.json, metrics.json, train_state.pt
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from dps_tune.config import SUPPRESS_MODES, merge_dotted
from dps_tune.errors import UserError
from dps_tune.files import json_object_or_none, read_json_object
from dps_tune.layout import CONFIG_FILE, METRICS_FILE
from dps_tune.objectives import best_of, default_mode, objectives
from dps_tune.paths import is_remote
from dps_tune.sweep.storage import has_weights, local_view
from dps_tune.sweep.sweep_file import SweepFile

TRIAL_CONFIG_FILE = "dps_tune_config.json"
# What `dps-tune wise` and `dps-tune soup` write (dps_tune.sweep.ensembles).
WISE_CSV, WISE_JSON = "wise.csv", "wise.json"
WISE_PREDICTIONS = "predictions"  # one safetensors file per (checkpoint, alpha) row of wise.csv
SOUP_CSV, SOUP_JSON = "soup_steps.csv", "soup.json"
PARAM_COLUMNS = {"algorithm": "algorithm", "optim.lr": "lr", "optim.wd": "wd", "dps.masking": "masking",
                 "dps.suppress": "suppress", "dps.quota": "quota", "seed": "seed"}
# What a DPS trial holds (dps_tune.suppression.holding_metrics), as results columns.
HELD_COLUMNS = {"dps_params_held_frac": "params_held", "dps_params_train_frac": "params_train"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters as dotted config keys: a confirmation run's ``variant`` dict is unpacked."""
    params = dict(params)
    variant = params.pop("variant", None)
    return {**(variant if isinstance(variant, Mapping) else {}), **params}


def checkpoints(exp_dir: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Every complete checkpoint under ``exp_dir`` (a sweep, a trial or a train run) with its metrics."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise UserError(f"experiment {str(exp)!r}: no such directory")
    found = []
    for metrics_path in sorted(exp.rglob(METRICS_FILE)):
        ckpt = metrics_path.parent
        if not has_weights(ckpt) or ckpt.name.startswith("."):
            continue
        metrics = json_object_or_none(metrics_path)
        if metrics is not None:  # one a killed writer left cut short is no checkpoint
            found.append((ckpt, metrics))
    return found


def checkpoint_json(ckpt: str | os.PathLike, name: str = METRICS_FILE) -> dict[str, Any]:
    """A checkpoint's ``metrics.json`` (or ``config.json``); one :class:`UserError` line naming it when damaged."""
    return read_json_object(Path(ckpt) / name, f"checkpoint {str(ckpt)!r}")


def _json_ok(path: Path) -> bool:
    try:
        read_json_object(path, str(path))
        return True
    except UserError:
        return False


def best_checkpoint(exp_dir: str | os.PathLike, metric: str, mode: str = "max", scope: str = "all") -> Path:
    """The kept checkpoint with the best ``metric`` under ``exp_dir``.

    ``scope="all"`` ranks every kept checkpoint of every trial; ``scope="last"`` ranks
    trials by their last reported value and returns that trial's newest checkpoint.
    """
    if scope == "last":
        trials = [t for t in load_trials(exp_dir) if _finite(t.last.get(metric))]
        if not trials:
            raise UserError(f"experiment {str(exp_dir)!r}: no trial reports {metric!r}")
        trial = best_of(trials, lambda t: t.last[metric], mode)
        kept = sorted(p for p, _ in checkpoints(trial.path))
        if not kept:
            raise UserError(f"trial {trial.trial_id}: no checkpoint was kept")
        return kept[-1]
    scored = [(m[metric], p) for p, m in checkpoints(exp_dir) if _finite(m.get(metric))]
    if not scored:
        damaged = [p for p in sorted(Path(exp_dir).rglob(METRICS_FILE)) if has_weights(p.parent) and not _json_ok(p)]
        why = (f"; {len(damaged)} checkpoint(s) have an unreadable {METRICS_FILE}, e.g. {damaged[0]}"
               if damaged else "")
        raise UserError(f"experiment {str(exp_dir)!r}: no checkpoint reports {metric!r}{why}")
    return best_of(scored, lambda t: t[0], mode)[1]


@dataclass
class Trial:
    trial_id: str
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    errored: bool = False
    interrupted: bool = False  # stopped by a Ctrl-C of the sweep; `resume` continues it

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def param(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed driver
        if "step" in row:
            rows[int(row["step"])] = row  # a retried trial may report a step again: keep the newest
    return [rows[k] for k in sorted(rows)]


def _with_checkpoint_figures(history: list[dict[str, Any]], trial_dir: Path) -> list[dict[str, Any]]:
    """``history`` with the figures added to its kept checkpoints after the report (their test splits)."""
    by_step = {int(row["step"]): row for row in history}
    for metrics_path in trial_dir.glob(f"*/{METRICS_FILE}"):
        metrics = json_object_or_none(metrics_path)
        row = by_step.get(metrics.get("step")) if metrics is not None else None
        if row is not None:
            row.update({k: v for k, v in metrics.items() if k not in row and _finite(v)})
    return history


def load_trials(exp_dir: str | os.PathLike) -> list[Trial]:
    """Every trial of a sweep directory, in trial-id order."""
    exp, sweep = open_sweep(exp_dir)
    trials = []
    stopped = set(sweep.interrupted)  # Ray's trial ids; also in the directory name trainable_ID_...
    for params_path in sorted(exp.glob("*/params.json")):
        tdir = params_path.parent
        history = _with_checkpoint_figures(_read_history(tdir / "result.json"), tdir)
        trial_id = history[-1].get("trial_id") if history else None
        config = merge_dotted(sweep.base, flat_params(read_json_object(params_path, f"trial {str(tdir)!r}")))
        trials.append(Trial(trial_id or tdir.name, tdir, config, history, errored=(tdir / "error.txt").exists(),
                            interrupted=trial_id in stopped or any(f"_{i}_" in tdir.name for i in stopped)))
    if not trials:
        raise UserError(f"experiment {str(exp)!r}: no dps_tune trials in it")
    return sorted(trials, key=lambda t: t.trial_id)


def open_sweep(location: str | os.PathLike) -> tuple[Path, SweepFile]:
    """The experiment at ``location`` (a path or a URI): its local folder and its sweep file, checked.

    The one place that decides what an experiment is, for every command that reads one:
    a missing path, a file, a directory without a sweep file and a sweep file cut short
    each end in one :class:`UserError` naming ``location``.
    """
    where = str(location)
    if not is_remote(where):
        path = Path(where)
        if not path.exists():
            raise UserError(f"experiment {where!r}: no such directory")
        if not path.is_dir():
            raise UserError(f"experiment {where!r}: a file, not an experiment directory")
    view = local_view(where)
    return view, SweepFile.load(view, where)


def trial_status(trial: Trial, max_t: float | None, finished: bool) -> str:
    """completed, early-stopped, error, interrupted or running; ``finished``: the sweep has ended."""
    target = trial.param("optim.epochs") or 0
    if max_t:
        target = min(target, max_t)
    epoch = trial.last.get("epoch", 0)
    if epoch >= target:
        return "completed"
    if trial.interrupted:
        return "interrupted"
    if trial.errored and finished:
        return "error"
    return "early-stopped" if finished else "running"


def results_table(exp_dir: str | os.PathLike, metric: str | None = None, mode: str | None = None) -> pd.DataFrame:
    """One row per trial, sorted by ``metric``: searched parameters, epochs, status, every acc/F1."""
    _, sweep = open_sweep(exp_dir)
    metric, mode = sweep.objective(metric, mode)
    rows = []
    for t in load_trials(exp_dir):
        row: dict[str, Any] = {"trial_id": t.trial_id}
        for dotted, short in PARAM_COLUMNS.items():
            row[short] = t.param(dotted)
        if row["algorithm"] != "dps":  # masking, suppress and quota mean nothing to CE and FLYP
            row["masking"] = row["suppress"] = row["quota"] = None
        for key, short in HELD_COLUMNS.items():
            row[short] = t.last.get(key)
        row["epochs"] = t.last.get("epoch", 0)
        row["status"] = trial_status(t, sweep.max_t, sweep.ended)
        row["early_stopped"] = row["status"] == "early-stopped"
        for key, value in t.last.items():
            if key.endswith(("_acc", "_f1")) or key == "objective_mean":
                row[key] = value
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable")
    return df.reset_index(drop=True)


MASKING_ALL = "dps (masking 1.0)"
# The one order in which tables, plots, ensembles and the demo list methods: the baselines, DPS, then its
# controls (the names method_name gives).
METHOD_ORDER = ("ce", "flyp", *(f"dps ({s})" for s in SUPPRESS_MODES), MASKING_ALL)


def method_name(config: dict[str, Any]) -> str:
    """``ce``, ``flyp``, or ``dps (top)`` / ``dps (random)`` / ``dps (bottom)`` … for the DPS arms.

    At ``masking: 1.0`` every ranked row is held whatever the suppression kind, so those
    are one method: ``dps (masking 1.0)``, where only the excluded tensors train.
    """
    algorithm = config.get("algorithm", "?")
    if algorithm == "dps":
        dps = config.get("dps", {})
        if dps.get("masking", 0) == 1.0:
            return MASKING_ALL
        return f"dps ({dps.get('suppress', 'top')})"
    return algorithm


def in_method_order(methods: Iterable[str]) -> list[str]:
    """``methods``, each once, in :data:`METHOD_ORDER`; names it does not hold follow, alphabetically."""
    return sorted(set(methods), key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def best_per_method(exp_dirs: list[str | os.PathLike], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """For each method, the kept checkpoint best by ``metric``: its path, trial and metrics.

    Selection uses validation metrics only (``metric`` should be a ``*_val_*`` metric);
    the test metrics of the chosen checkpoint are what a method is reported with.
    """
    candidates: dict[str, list[tuple[float, Path, dict]]] = {}
    for exp in exp_dirs:
        for path, metrics in checkpoints(exp):
            if not _finite(metrics.get(metric)) or not (path / CONFIG_FILE).is_file():
                continue
            method = method_name(checkpoint_json(path, CONFIG_FILE))
            candidates.setdefault(method, []).append((metrics[metric], path, metrics))
    best = {m: best_of(c, lambda t: t[0], mode) for m, c in candidates.items()}
    return [{"method": m, "checkpoint": best[m][1], "trial": _trial_id(best[m][1].parent), **best[m][2]}
            for m in in_method_order(best)]


def _trial_id(trial_dir: Path) -> str:
    history = _read_history(trial_dir / "result.json")
    return str(history[-1].get("trial_id", trial_dir.name)) if history else trial_dir.name


def ensemble_kind(path: str | os.PathLike) -> str | None:
    """``"wise"`` or ``"soup"`` for an output directory of those commands, else None."""
    p = Path(path)
    if (p / WISE_JSON).is_file():
        return "wise"
    if (p / SOUP_JSON).is_file():
        return "soup"
    return None


def wise_prediction_file(out: str | os.PathLike, checkpoint: str, alpha: float) -> Path:
    """Where ``wise`` keeps the per-image predictions of its (``checkpoint``, ``alpha``) row under ``out``."""
    key = hashlib.sha256(f"{checkpoint}\n{float(alpha):.12g}".encode()).hexdigest()[:16]
    return Path(out) / WISE_PREDICTIONS / f"{key}.safetensors"


def curve_correct(out: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                  splits: tuple[str, ...] = ("id_test", "ood_test")) -> dict[float, tuple[np.ndarray, ...]] | None:
    """Per alpha of ``rows`` (``wise.csv`` rows of one curve), its per-image correctness on ``splits``.

    Each is a float vector (1 right, 0 wrong) over the split's images in its fixed order,
    the order of a checkpoint's own ``predictions.safetensors``, so the two pair image by
    image. None when a row has no recorded predictions (the output of an older ``wise``,
    which recorded none) or they lack one of ``splits``.
    """
    from dps_tune.checkpoint import read_prediction_file

    found = {}
    for r in rows:
        file = wise_prediction_file(out, str(r["checkpoint"]), float(r["alpha"]))
        if not file.is_file():
            return None
        preds = read_prediction_file(file, f"wise predictions {str(file)!r}")
        if any(s not in preds for s in splits):
            return None
        found[float(r["alpha"])] = tuple((preds[s][0] == preds[s][1]).double().numpy() for s in splits)
    return found or None


def wise_curve_correct(out: str | os.PathLike, method: str) -> dict[float, tuple[np.ndarray, np.ndarray]] | None:
    """``{alpha: (id_test correct, ood_test correct)}`` of ``method``'s curve in ``wise``'s output ``out``
    (the checkpoint it chose), or None (see :func:`curve_correct`)."""
    summary = read_ensemble(out)
    rec = summary.get("methods", {}).get(method)
    if rec is None:
        return None
    return curve_correct(out, [r for r in summary["rows"] if r["method"] == method
                               and r["checkpoint"] == rec["checkpoint"]])


def read_ensemble(path: str | os.PathLike) -> dict[str, Any]:
    """The summary a ``wise`` or ``soup`` run wrote; for WiSE-FT with every evaluated row under ``rows``."""
    p = Path(path)
    kind = ensemble_kind(p)
    if kind is None:
        raise UserError(f"{str(p)!r}: neither a sweep nor the output of `dps-tune wise` or `dps-tune soup`")
    summary = read_json_object(p / (WISE_JSON if kind == "wise" else SOUP_JSON), f"{kind} output {str(p)!r}")
    summary["kind"], summary["path"] = kind, str(p)
    if kind == "wise":
        rows = pd.read_csv(p / WISE_CSV) if (p / WISE_CSV).is_file() else pd.DataFrame()
        if "complete" in rows.columns:  # rows a killed run cut short lack it
            rows = rows[rows["complete"] == 1].drop(columns="complete")
        summary["rows"] = rows.dropna().to_dict("records") if len(rows) else []
    return summary


PARETO_DEFAULT = (("id_val_f1", "max"), ("ood_val_f1", "max"))


def pareto_objectives(exp_dir: str | os.PathLike) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The sweep's objectives when it has several, else ID and OOD validation macro-F1."""
    sweep = SweepFile.read(exp_dir)
    metrics, modes = objectives((sweep.tune if sweep else None) or {})
    if len(metrics) > 1:
        return metrics, modes
    return tuple(m for m, _ in PARETO_DEFAULT), tuple(d for _, d in PARETO_DEFAULT)


def pareto_table(exp_dir: str | os.PathLike, metrics: tuple[str, ...] | None = None,
                 modes: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The trials no other trial beats on every objective (each at its last report)."""
    from dps_tune.stats import pareto_front

    if metrics is None:
        metrics, modes = pareto_objectives(exp_dir)
    modes = modes or tuple(default_mode(m) for m in metrics)
    table = results_table(exp_dir, metrics[0], modes[0])
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise UserError(f"experiment {str(exp_dir)!r}: no trial reports {missing[0]!r}")
    front = pareto_front(table[list(metrics)].to_numpy(dtype=float), modes)
    return table.iloc[front].reset_index(drop=True)


def bootstrap_table(exp_dir: str | os.PathLike, metric: str, mode: str, *, resamples: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Per trial, its kept checkpoint best on ``metric``, with 95% bootstrap intervals of every test metric."""
    from dps_tune.checkpoint import read_predictions
    from dps_tune.stats import bootstrap_interval

    rows = []
    for t in load_trials(exp_dir):
        kept = [(p, m) for p, m in checkpoints(t.path) if _finite(m.get(metric))]
        if not kept:
            continue
        path, m = best_of(kept, lambda x: x[1][metric], mode)
        row: dict[str, Any] = {"trial_id": t.trial_id, "method": method_name(t.config), "epoch": m.get("epoch"),
                               metric: m[metric]}
        preds = read_predictions(path)
        for split, (y_true, y_pred) in preds.items():
            if not split.endswith("_test"):
                continue
            iv = bootstrap_interval(y_true, y_pred, resamples=resamples, seed=seed)
            for kind in ("acc", "f1"):
                row[f"{split}_{kind}"] = iv[kind].mean
                row[f"{split}_{kind} 95% CI"] = f"[{iv[kind].low:.4f}, {iv[kind].high:.4f}]"
        if not preds:
            row["note"] = "no predictions.safetensors (a checkpoint of dps_tune < 0.2)"
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=(mode == "min"), kind="stable")
    return df.reset_index(drop=True)
