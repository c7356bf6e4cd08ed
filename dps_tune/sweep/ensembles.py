"""``dps-tune wise`` and ``dps-tune soup``: weight-space ensembles over whole sweeps.

Candidates are the kept checkpoints of the given experiments, grouped by method (``ce``,
``flyp``, ``dps (top)``, ``dps (random)``) and ranked by a validation metric. Every
evaluation is one job (:func:`evaluate_job`), spread over Ray tasks by
:func:`dps_tune.sweep.ray_tune.map_jobs` (or run in this process, for comparison). Each
finished evaluation is appended to a CSV in the output directory at once, so a killed
run, run again with the same ``--out``, redoes none of them. A WiSE-FT row's predictions
file is written (atomically) before its CSV row, so a complete row always has its file.

Output of ``wise`` (``--out DIR``)::

    DIR/wise.csv           one row per (checkpoint, alpha): method, trial, every _acc and _f1
    DIR/predictions/<key>.safetensors
                           per row of wise.csv, its labels and predicted classes on every evaluation
                           split: int32 tensors ``<split>.true`` and ``<split>.pred`` [images], in the
                           split's fixed order (that of a checkpoint's own predictions.safetensors);
                           <key> is the first 16 hex digits of the sha256 of "<checkpoint>\n<alpha>"
                           (alpha as ``{:.12g}``), see :func:`dps_tune.sweep.results.wise_prediction_file`
    DIR/wise.json          the settings, and per method the chosen checkpoint, alpha and figures
    DIR/wise_<method>/     the chosen model: model.safetensors, config.json, metrics.json, <arch>.json

Output of ``soup``::

    DIR/soup_steps.csv     one row per evaluated soup (its ingredients and figures)
    DIR/soup.json          the settings, and per soup its ingredients, weights and figures
    DIR/soup_<method>/     the soup as a checkpoint directory that plain open_clip loads
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from dps_tune import checkpoint as ckpt
from dps_tune import weight_space
from dps_tune.config import config_from_dict
from dps_tune.errors import UserError
from dps_tune.files import atomic_path, write_json
from dps_tune.objectives import best_of, check_selection_metric, default_mode
from dps_tune.sweep import storage
from dps_tune.sweep.candidates import Candidate, check_candidates, load_candidates
from dps_tune.sweep.results import SOUP_CSV, SOUP_JSON, WISE_CSV, WISE_JSON, wise_prediction_file

logger = logging.getLogger(__name__)

# A mapper runs jobs and yields (job, metrics) as each finishes: Ray tasks, or this process.
Mapper = Callable[[list[dict]], Iterable[tuple[dict, dict]]]


# ----------------------------------------------------------------------- the job


@functools.lru_cache(maxsize=2)
def _evaluator(config_json: str) -> weight_space.Evaluator:
    return weight_space.Evaluator(config_from_dict(json.loads(config_json)))


@functools.lru_cache(maxsize=4)
def _weights(path: str) -> dict:
    return ckpt.load_checkpoint(path, with_state=False).model_state


def evaluate_job(job: dict) -> dict[str, Any]:
    """Evaluate one ensemble: ``{"config", "alpha", "theta1"}`` (WiSE-FT) or ``{"config", "ingredients"}`` (soup).

    Returns ``{"metrics": {...}, "predictions": {split: [labels, predicted classes]}}``, each
    list over the split's images in its fixed order. Runs in a Ray task or in this process
    alike; the model, data and the last weights read stay cached in the process for the next job.
    """
    ev = _evaluator(json.dumps(job["config"], sort_keys=True))
    if "alpha" in job:
        state = weight_space.interpolate(ev.theta0, _weights(job["theta1"]), float(job["alpha"]))
    else:
        state = weight_space.average([_weights(p) for p in job["ingredients"]])
    predictions: dict = {}
    metrics = ev(state, predictions=predictions)
    return {"metrics": metrics, "predictions": {s: [t.tolist(), p.tolist()] for s, (t, p) in predictions.items()}}


def _save_predictions(file: Path, predictions: dict[str, list]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        ckpt.write_predictions({s: (torch.tensor(t), torch.tensor(p)) for s, (t, p) in predictions.items()}, tmp)


def map_in_process(jobs: list[dict]) -> Iterable[tuple[dict, dict]]:
    for job in jobs:
        yield job, evaluate_job(job)


def _fetched(c: Candidate) -> Candidate:
    """``c`` with its weights on this disk (a mirror of remote storage holds a stand-in)."""
    if (c.path / ckpt.MODEL_FILE).is_file():
        return c
    return Candidate(storage.fetch_weights(c.path), c.method, c.trial, c.status, c.metrics, c.config)


def slug(method: str) -> str:
    return method.replace(" (", "_").replace(")", "").replace(" ", "_")


# ---------------------------------------------------------------------- results


# The last column of every row: a line a killed run cut short lacks it, however far it got.
COMPLETE = "complete"


def _read_rows(path: Path, fields: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV this module appended to; a line a killed run cut short is left out."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r.get(COMPLETE) == "1" and all(r.get(k) not in (None, "") for k in fields)]


class _Appender:
    """Appends one CSV row per finished evaluation, flushed at once; ``complete`` is written last."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = path, [*columns, COMPLETE]
        new = not path.is_file() or path.stat().st_size == 0
        if not new:
            with path.open() as f:
                header = f.readline().strip().split(",")
            if header != self.columns:
                raise UserError(f"--out {path.parent}: {path.name} was written with other columns; pass another --out")
            with path.open("rb+") as f:  # a line cut short by a kill: end it, so the next row starts clean
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()
            self.file.flush()

    def add(self, row: dict) -> None:
        self.writer.writerow({**row, COMPLETE: 1})
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _metric_columns(metrics: Iterable[str]) -> list[str]:
    return sorted(k for k in metrics if k.endswith(("_acc", "_f1")))


def _floats(row: dict[str, str], columns: Sequence[str]) -> dict[str, float]:
    return {c: float(row[c]) for c in columns if row.get(c) not in (None, "")}


def _export(dst: Path, state: dict, config: dict, metrics: dict) -> Path:
    ckpt.save_export(dst, model_state=state, config=config_from_dict(config), metrics=metrics)
    return dst


# ------------------------------------------------------------------------- wise


def run_wise(exp_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, alphas: Sequence[float],
             top_k: int = 1, select: str = "id_val_f1", mapper: Mapper = map_in_process,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """WiSE-FT for every method of ``exp_dirs``; returns what ``wise.json`` records."""
    check_selection_metric("--select", select)
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be >= 1")
    if not alphas:
        raise UserError("--alphas: an empty grid")
    groups = load_candidates(exp_dirs, select)
    chosen = {m: [_fetched(c) for c in cs[:top_k]] for m, cs in groups.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(chosen.values()))[0]
    columns = _metric_columns(first.metrics)
    csv_path = out / WISE_CSV
    done = {(r["checkpoint"], float(r["alpha"])): r for r in _read_rows(csv_path, ["checkpoint", "alpha", *columns])}
    jobs, rows = [], []
    for method, cands in chosen.items():
        for rank, c in enumerate(cands, 1):
            for a in alphas:
                key = (str(c.path), float(a))
                base = {"method": method, "rank": rank, "trial": c.trial, "checkpoint": str(c.path), "alpha": a}
                if key in done:
                    rows.append({**base, **_floats(done[key], columns)})
                else:
                    jobs.append({"config": c.config, "theta1": str(c.path), "alpha": float(a), "row": base})
    total, finished = len(rows) + len(jobs), len(rows)
    if rows:
        logger.info("wise: %d of %d evaluations found in %s; running the other %d", len(rows), total, csv_path,
                    len(jobs))
    appender = _Appender(csv_path, ["method", "rank", "trial", "checkpoint", "alpha", *columns])
    if progress:
        progress(finished, total)
    try:
        for job, result in mapper(jobs):
            metrics = result["metrics"]
            row = {**job["row"], **{c: metrics[c] for c in columns if c in metrics}}
            _save_predictions(wise_prediction_file(out, job["theta1"], job["alpha"]), result["predictions"])
            appender.add(row)
            rows.append(row)
            finished += 1
            if progress:
                progress(finished, total)
    finally:
        appender.close()
    summary = {"experiments": [str(e) for e in exp_dirs], "alphas": list(alphas), "top_k": top_k, "select": select,
               "methods": {}}
    mode = default_mode(select)
    for method, cands in chosen.items():
        mine = [r for r in rows if r["method"] == method and select in r]
        best = best_of(sorted(mine, key=lambda r: (r["rank"], r["alpha"])), lambda r: r[select], mode)
        cand = next(c for c in cands if str(c.path) == best["checkpoint"])
        alone = next((r for r in mine if r["checkpoint"] == best["checkpoint"] and r["alpha"] == 1.0), None)
        zero = next((r for r in mine if r["alpha"] == 0.0), None)
        metrics = {c: best[c] for c in columns if c in best}
        record = {"checkpoint": best["checkpoint"], "trial": best["trial"], "alpha": best["alpha"],
                  "selected_on": select, "metrics": metrics,
                  "fine_tuned": {c: alone[c] for c in columns} if alone else cand.metrics,
                  "zero_shot": {c: zero[c] for c in columns} if zero else None}
        state = weight_space.interpolate(_evaluator(json.dumps(cand.config, sort_keys=True)).theta0,
                                         _weights(str(cand.path)), best["alpha"])
        dst = _export(out / f"wise_{slug(method)}", state, cand.config, {
            **metrics, "wise": {"theta0": "/".join(cand.theta0), "theta1": best["checkpoint"],
                                "alpha": best["alpha"], "selected_on": select}})
        record["export"] = str(dst)
        summary["methods"][method] = record
    write_json(out / WISE_JSON, summary)
    return summary


# ------------------------------------------------------------------------- soup


def _soup_key(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:16]


def run_soup(exp_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, method: str | None = None,
             greedy: bool = True, select: str = "id_val_f1", include_stopped: bool = False,
             mix_methods: bool = False, mapper: Mapper = map_in_process,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Greedy (or uniform) soups, one per method (or one of all with ``mix_methods``)."""
    check_selection_metric("--select", select)
    groups = check_candidates(exp_dirs, select, include_stopped=include_stopped, method=method)
    if method is not None:
        groups = {method: groups[method]}
    groups = {m: [_fetched(c) for c in cs] for m, cs in groups.items()}
    if mix_methods:
        mode = default_mode(select)
        everything = [c for cs in groups.values() for c in cs]
        groups = {"mixed": sorted(everything, key=lambda c: c.metrics[select], reverse=mode == "max")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = _metric_columns(next(iter(groups.values()))[0].metrics)
    csv_path = out / SOUP_CSV
    cache = {r["key"]: _floats(r, columns) for r in _read_rows(csv_path, ["key", *columns])}
    appender = _Appender(csv_path, ["key", "soup", "ingredients", *columns])
    evaluated = [0]
    summary = {"experiments": [str(e) for e in exp_dirs], "recipe": "greedy" if greedy else "uniform",
               "select": select, "include_stopped": include_stopped, "soups": {}}

    def evaluate(name: str, cands: Sequence[Candidate]) -> dict[str, float]:
        paths = [str(c.path) for c in cands]
        key = _soup_key(paths)
        if key not in cache:
            job = {"config": cands[0].config, "ingredients": paths}
            for _, result in mapper([job]):
                cache[key] = {c: result["metrics"][c] for c in columns if c in result["metrics"]}
            appender.add({"key": key, "soup": name, "ingredients": ";".join(paths), **cache[key]})
        evaluated[0] += 1
        if progress:
            progress(evaluated[0], None)
        return cache[key]

    try:
        for name, cands in groups.items():
            by_path = {str(c.path): c for c in cands}
            if greedy:
                picked, steps = weight_space.greedy_soup(
                    [(str(c.path), c.metrics[select]) for c in cands],
                    lambda names: evaluate(name, [by_path[n] for n in names])[select], mode=default_mode(select))
                ingredients = [by_path[p] for p in picked]
            else:
                ingredients, steps = list(cands), []
            metrics = (ingredients[0].metrics if len(ingredients) == 1 else evaluate(name, ingredients))
            metrics = {c: metrics[c] for c in columns if c in metrics}
            weights = [1.0 / len(ingredients)] * len(ingredients)
            record = {"ingredients": [{"checkpoint": str(c.path), "trial": c.trial, "method": c.method,
                                       "weight": w, select: c.metrics[select]} for c, w in zip(ingredients, weights)],
                      "candidates": len(cands), "metrics": metrics,
                      "steps": [{"candidate": s.candidate, select: s.value, "accepted": s.accepted} for s in steps],
                      "best_ingredient": {c: cands[0].metrics.get(c) for c in columns}}
            state = weight_space.average([_weights(str(c.path)) for c in ingredients], weights)
            dst = _export(out / f"soup_{slug(name)}", state, ingredients[0].config, {
                **metrics, "soup": {"recipe": summary["recipe"], "selected_on": select,
                                    "ingredients": record["ingredients"]}})
            record["export"] = str(dst)
            summary["soups"][name] = record
    finally:
        appender.close()
    write_json(out / SOUP_JSON, summary)
    return summary

