"""Test-split figures for the checkpoints an experiment kept, computed once when its trials end.

No selection may read a test split, so a trial's reports evaluate the validation
splits alone (``train.eval_test: end``, the default) and its last report, at the end
of training, every split. A checkpoint kept from an earlier report (the best one by
the selection metric, say, or the last one of a trial that ASHA stopped or an error
ended) is evaluated on the test splits here, once, before the sweep command returns:
its ``metrics.json`` and ``predictions.safetensors`` gain the test figures.

iWildCam's two test splits are 70% of its evaluation images (50,945 of 73,220), so
evaluating them at every report spends most of a sweep's evaluation time on figures
nobody selects on. ``python -m dps_tune.bench eval`` prints the saving.

Ray-free: the evaluations are jobs that a mapper runs (Ray tasks, or this process).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from dps_tune.files import json_object_or_none, read_json_object
from dps_tune.layout import CONFIG_FILE, METRICS_FILE, OPEN_CLIP_KEY, PREDICTIONS_FILE
from dps_tune.objectives import is_test_split
from dps_tune.paths import is_remote
from dps_tune.sweep import storage

logger = logging.getLogger(__name__)

Mapper = Callable[[list[dict]], Iterable[tuple[dict, dict]]]


def _missing_splits(ckpt: Path) -> list[str]:
    """The test splits of ``ckpt``'s config that its ``metrics.json`` has no figures for."""
    config, metrics = json_object_or_none(ckpt / CONFIG_FILE), json_object_or_none(ckpt / METRICS_FILE)
    if config is None or metrics is None:
        return []  # a damaged checkpoint: the commands that read it say so
    splits = config.get("data", {}).get("eval_splits") or []
    if config.get("data", {}).get("dataset") == "csv":
        splits = [name for name, _ in config["data"].get("eval_csvs") or []]
    return [s for s in splits if is_test_split(s) and f"{s}_acc" not in metrics]


def pending_jobs(exp_dir: str | Path) -> list[dict]:
    """One job per kept checkpoint of ``exp_dir`` (a local folder or a mirror) that lacks test figures."""
    jobs = []
    for metrics_path in sorted(Path(exp_dir).rglob(METRICS_FILE)):
        ckpt = metrics_path.parent
        if ckpt.name.startswith(".") or not storage.has_weights(ckpt):
            continue
        splits = _missing_splits(ckpt)
        if splits:
            jobs.append({"checkpoint": str(ckpt), "source": storage.source(ckpt), "splits": splits})
    return jobs


@functools.lru_cache(maxsize=2)
def _evaluator(config_json: str):
    from dps_tune import weight_space
    from dps_tune.config import config_from_dict

    return weight_space.Evaluator(config_from_dict(json.loads(config_json)))


def evaluate_job(job: dict) -> dict[str, Any]:
    """Evaluate one checkpoint on ``job["splits"]``: ``{"metrics": {...}, "predictions": {split: [true, pred]}}``.

    Runs in a Ray task or in this process alike. The evaluator (model and data) is
    cached per process and keyed by what evaluation depends on, so the checkpoints of
    every trial of a sweep share one.
    """
    from dps_tune import checkpoint as ckpt

    path = Path(job["checkpoint"])
    local = path if (path / ckpt.MODEL_FILE).is_file() else storage.fetch_weights(path)
    config = read_json_object(path / CONFIG_FILE, f"checkpoint {str(path)!r}")
    config.pop(OPEN_CLIP_KEY, None)
    evaluation = {k: config[k] for k in ("model", "pretrained", "seed", "data", "train") if k in config}
    ev = _evaluator(json.dumps(evaluation, sort_keys=True))
    predictions: dict = {}
    state = ckpt.load_checkpoint(local, with_state=False).model_state
    metrics = ev(state, splits=job["splits"], predictions=predictions)
    return {"metrics": metrics,
            "predictions": {s: [t.tolist(), p.tolist()] for s, (t, p) in predictions.items()}}


def record(job: dict, result: dict[str, Any]) -> None:
    """Write ``result`` into the checkpoint of ``job``, on this disk and, for a mirror, on the storage."""
    import torch

    from dps_tune import checkpoint as ckpt

    path = Path(job["checkpoint"])
    predictions = {s: (torch.tensor(t), torch.tensor(p)) for s, (t, p) in result["predictions"].items()}
    ckpt.add_figures(path, result["metrics"], predictions)
    if is_remote(job["source"]):  # a mirror: the storage holds the real checkpoint
        for name in (PREDICTIONS_FILE, METRICS_FILE):
            if (path / name).is_file():
                storage.upload(path / name, storage.join(job["source"], name))


def complete(location: str, mapper: Mapper, *, say: Callable[[str], None] | None = None) -> int:
    """Give every kept checkpoint of the experiment at ``location`` its test figures; returns how many were done."""
    exp = storage.local_view(location)
    jobs = pending_jobs(exp)
    if not jobs:
        return 0
    if say:
        say(f"test splits: evaluating {len(jobs)} kept checkpoint(s) once, now that their trials are over")
    done = 0
    for job, result in mapper(jobs):
        record(job, result)
        done += 1
    logger.info("test figures recorded for %d checkpoint(s) of %s", done, location)
    return done
