"""The trial: Ray Tune's function trainable around :func:`dps_tune.train.run_trial`, and where a trial resumes.

The testing hooks below (a crash after an epoch, a hold after the last one) are read from
the environment of the worker process, so the suite can break a trial where it wants.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import tune

from dps_tune import checkpoint as ckpt
from dps_tune import retention, suppression
from dps_tune.config import Config, TuneConfig, with_overrides
from dps_tune.files import disk_full, json_object_or_none, space_left
from dps_tune.objectives import OBJECTIVE_MEAN, objective_mean, objectives, scalar_objective
from dps_tune.sweep import storage
from dps_tune.sweep.results import flat_params
from dps_tune.train import run_trial

logger = logging.getLogger(__name__)

# Testing hook for retries: crash each trial once, right after it reports this epoch.
CRASH_AT_EPOCH_ENV = "DPS_TUNE_INJECT_CRASH_AT_EPOCH"
CRASH_MARKER_ENV = "DPS_TUNE_INJECT_CRASH_MARKER_DIR"
# Testing hook for a driver killed between a trial's last report and its end: after reporting
# its last epoch, each trial writes <dir>/<trial id>.held and waits there until it is killed.
HOLD_AT_END_ENV = "DPS_TUNE_INJECT_HOLD_AT_END_DIR"


def _worker_logging() -> None:
    log = logging.getLogger("dps_tune")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    for name in ("ray.train", "ray.tune"):  # one "checkpoint created" line per report is noise
        logging.getLogger(name).setLevel(logging.WARNING)


def _maybe_inject_crash(trial_id: str, epoch: float) -> None:
    at = os.environ.get(CRASH_AT_EPOCH_ENV)
    marker_dir = os.environ.get(CRASH_MARKER_ENV)
    if not at or not marker_dir or epoch != float(at):
        return
    marker = Path(marker_dir) / f"{trial_id}.crashed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(epoch))
    raise RuntimeError(f"injected crash after epoch {at} ({CRASH_AT_EPOCH_ENV})")


def _maybe_hold_at_end(trial_id: str, epoch: float, last_epoch: float) -> None:
    marker_dir = os.environ.get(HOLD_AT_END_ENV)
    if not marker_dir or epoch < last_epoch:
        return
    marker = Path(marker_dir) / f"{trial_id}.held"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(epoch))
    while True:
        time.sleep(1)


def trainable(params: dict[str, Any], *, base: Config, ranking: suppression.Scores | None,
              gpu_share: float | None, tune_cfg: TuneConfig) -> None:
    """Ray Tune function trainable: one trial of the frozen ``base`` config with ``params`` applied.

    ``params`` holds the searched values under dotted config keys. When Ray retries or
    restores the trial, it goes on from the newest of its checkpoints that holds train
    state (under the economy scheme that need not be the latest one). A trial restored on
    the checkpoint of its last epoch (the driver stopped after that report, before the
    trial's end) has nothing left to train: it ends there, on that report.
    """
    _worker_logging()
    cfg = with_overrides(base, flat_params(params))
    trial_id = tune.get_context().get_trial_id()
    keep = _retention(cfg, tune_cfg)
    derive = _objective_mean(tune_cfg)
    last_epoch = _last_epoch(cfg, tune_cfg)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # Superseded checkpoints and train state are deleted by the driver (CheckpointPruner), never here.
        metrics = {**metrics, "max_epoch": cfg.optim.epochs}
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        try:
            tune.report(metrics, checkpoint=checkpoint)
        except OSError as exc:
            if not disk_full(exc):
                raise
            raise RuntimeError(_lost_checkpoint(metrics["epoch"])) from None
        _maybe_inject_crash(trial_id, metrics["epoch"])
        _maybe_hold_at_end(trial_id, metrics["epoch"], last_epoch)

    latest = tune.get_checkpoint()
    if latest is not None and _trained_to(latest) >= last_epoch:
        # Its last report and checkpoint are in Ray's state already; training again would redo the whole
        # trial (the last checkpoint holds no train state: nothing follows it) and report every epoch twice.
        logger.info("trial %s had trained to its last epoch (%g) before it was stopped; it ends on that "
                    "checkpoint (%s)", trial_id, last_epoch, latest.path)
        return
    start = _resume_point(latest, keep) if latest is not None else None
    if start is None:
        if latest is not None:
            logger.warning("trial %s: no kept checkpoint holds train state (tune.resume_every_minutes = %g); "
                           "it starts over from epoch 0", trial_id, tune_cfg.resume_every_minutes)
        run_trial(cfg, report, ranking=ranking, memory_fraction=gpu_share, keep=keep, derive=derive)
        return
    with start.as_directory() as path:
        logger.info("trial %s resumes from epoch %s (%s)", trial_id, _epoch_of(path), start.path)
        run_trial(cfg, report, resume_from=path, ranking=ranking, memory_fraction=gpu_share, keep=keep,
                  derive=derive)


FULL = "the storage is full"  # how a trial's error names a full storage


def is_full_storage(error: BaseException | str) -> bool:
    """Whether a trial's error (the exception, or the text of its error.txt) is a full storage."""
    return FULL in str(error) or "No space left on device" in str(error) or (
        isinstance(error, BaseException) and disk_full(error))


def _lost_checkpoint(epoch: float) -> str:
    """A checkpoint the full storage cut short: removed, so nothing reads it; the trial's error names the disk."""
    from ray.train._internal.session import get_session

    where = get_session().storage
    storage.delete_checkpoint(where.storage_filesystem, where.checkpoint_fs_path)
    local = isinstance(where.storage_filesystem, storage.pafs.LocalFileSystem)
    space = space_left(where.trial_fs_path) if local else "free space not known"
    return (f"{FULL} ({space}, at {where.trial_fs_path}): the checkpoint of epoch {epoch:g} was not "
            "saved; make room, then `dps-tune resume` goes on from the last one that was")


def _objective_mean(t: TuneConfig) -> Any:
    """With several objectives, what adds ``objective_mean`` (ASHA's one number) to every evaluation."""
    if len(objectives(t)[0]) == 1:
        return None
    return lambda metrics: {OBJECTIVE_MEAN: objective_mean(metrics, t)}


def _last_epoch(cfg: Config, t: TuneConfig) -> float:
    """Where a trial ends: its last epoch, or the scheduler's ``max_t`` when that comes first."""
    return min(cfg.optim.epochs, t.max_t) if t.max_t else cfg.optim.epochs


def _trained_to(checkpoint: tune.Checkpoint) -> float:
    """The epoch of a checkpoint's metrics (read on its own filesystem); 0 when they cannot be read."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{ckpt.METRICS_FILE}") as f:
            metrics = json.loads(f.read().decode())
        return float(metrics.get("epoch", 0)) if isinstance(metrics, dict) else 0.0
    except (OSError, ValueError, TypeError):
        return 0.0


def _retention(cfg: Config, t: TuneConfig) -> retention.Retention | None:
    if t.checkpoint_scheme == "full":
        return None
    last = _last_epoch(cfg, t)
    metric, mode = scalar_objective(t)
    return retention.Retention(metric=metric, mode=mode, keep=t.keep_checkpoints, last_epoch=last,
                               resume_every=t.resume_every, resume_every_minutes=t.resume_every_minutes)


def _resume_point(latest: tune.Checkpoint, keep: retention.Retention | None) -> tune.Checkpoint | None:
    """The newest kept checkpoint of this trial with train state; tells ``keep`` what Ray keeps."""
    trial_path, latest_name = latest.path.rstrip("/").rsplit("/", 1)
    # Only what Ray's experiment state knows: a checkpoint written after its last save (a
    # killed driver) is one Ray does not track, and its results were never logged.
    kept = [k for k in storage.checkpoint_dirs(latest.filesystem, trial_path)
            if k[0].rstrip("/").rsplit("/", 1)[1] <= latest_name]
    with_state = [(path, metrics) for path, metrics, state in kept if state]
    if keep is not None:
        resumed = float(with_state[-1][1].get("epoch", 0)) if with_state else 0.0
        keep.restore([(metrics, state) for _, metrics, state in kept], resumed_epoch=resumed)
    if not with_state:
        return None
    return tune.Checkpoint(with_state[-1][0], filesystem=latest.filesystem)


def _epoch_of(path: str) -> Any:
    return (json_object_or_none(Path(path) / ckpt.METRICS_FILE) or {}).get("epoch", "?")
