"""The driver's Tune callbacks: the resolved config per trial, safe checkpoint pruning, the study's records,
and the stop on a full storage; and the restore points read from Ray's saved experiment state."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune

from dps_tune import checkpoint as ckpt
from dps_tune import retention
from dps_tune.config import Config, TuneConfig, merge_dotted, to_dict
from dps_tune.errors import first_line
from dps_tune.objectives import scalar_objective
from dps_tune.paths import is_remote
from dps_tune.sweep import storage
from dps_tune.sweep.ray_tune.trial import is_full_storage
from dps_tune.sweep.results import TRIAL_CONFIG_FILE, flat_params
from dps_tune.sweep.sweep_file import SWEEP_FILE

logger = logging.getLogger(__name__)

OPTUNA_FILE = "optuna.db"


class ResolvedConfigWriter(tune.Callback):
    """Writes each trial's resolved config (base + searched values) into its directory."""

    def __init__(self, base: Config):
        self.base = to_dict(base)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Through the trial's own storage filesystem: a local disk, file://, s3:// or gs:// alike.
        text = json.dumps(merge_dotted(self.base, flat_params(trial.config)), indent=2) + "\n"
        storage.write_fs_text(trial.storage.storage_filesystem, f"{trial.path}/{TRIAL_CONFIG_FILE}", text)


class CheckpointPruner(tune.Callback):
    """Deletes what the trials no longer need, once the experiment state on the storage no longer needs it.

    Per trial, a sweep keeps the ``keep`` best checkpoints by the metric (later winning
    ties) and the latest; under the economy scheme only the newest train state, and none
    once the trial ended (finished, or stopped by the scheduler; an errored trial keeps
    its own, for `dps-tune resume`).

    Ray would delete a superseded checkpoint the moment a newer one registers, and the
    trainable its train state the moment it reports the next; the experiment state that
    stops naming them reaches the storage seconds later. A driver killed in between left
    `resume` a restore point that was gone (the trial errored on every retry), or one
    without train state (it started over). So Ray deletes nothing (``num_to_keep=None``)
    and this callback applies the rule to the checkpoints up to the latest one *the
    experiment state on the storage* names: that one stays, and every newer one.
    """

    PERIOD_S = 1.0

    def __init__(self, t: TuneConfig):
        metric, mode = scalar_objective(t)
        self.metric, self.sign, self.keep = metric, (1.0 if mode == "max" else -1.0), t.keep_checkpoints
        self.economy = t.checkpoint_scheme == "economy"
        self._seen: Any = None  # the stored experiment state last pruned against
        self._last = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_seen": None, "_last": 0.0}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last >= self.PERIOD_S:
            self._prune(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._prune(trials)  # Ray has saved its final experiment state, and waited for it

    def _prune(self, trials: list) -> None:
        self._last = time.monotonic()
        if not trials:
            return
        fs = trials[0].storage.storage_filesystem
        stored = _stored_trials(fs, trials[0].storage.experiment_fs_path, self._seen)
        if stored is None:  # unchanged since the last pass, or not readable yet
            return
        self._seen, states = stored
        for trial in trials:
            status, latest = states.get(trial.trial_id, (None, None))
            if latest is not None:
                self._prune_trial(fs, trial.storage.trial_fs_path, status, latest)

    def _prune_trial(self, fs: Any, trial_path: str, status: str, latest: str) -> None:
        known = [c for c in storage.checkpoint_dirs(fs, trial_path) if c[0].rstrip("/").rsplit("/", 1)[1] <= latest]
        if not known or not known[-1][0].rstrip("/").endswith("/" + latest):
            return  # the restore point is not there: delete nothing that could stand in for it
        keep = retention.kept([retention.score(m, self.metric, self.sign) for _, m, _ in known], self.keep)
        for i, (path, _, _) in enumerate(known):
            if i not in keep:
                storage.delete_checkpoint(fs, path)
        if not self.economy:
            return
        with_state = [path for i, (path, _, state) in enumerate(known) if state and i in keep]
        ended = status == "TERMINATED"  # finished or stopped: it will not resume
        for path in with_state if ended else with_state[:-1]:
            storage.delete_file(fs, f"{path}/{ckpt.STATE_FILE}")


def restore_points(location: str) -> dict[str, tuple[str, str | None]]:
    """Ray's trial id -> (status, name of its latest checkpoint), as in the experiment state last saved to the
    storage of the experiment at ``location``: where `resume` would take each trial up."""
    stored = _stored_trials(*storage.resolve(location), None)
    return stored[1] if stored else {}


def _stored_trials(fs: Any, experiment_path: str, seen: Any) -> tuple[Any, dict[str, tuple[str, str | None]]] | None:
    """Each trial's status and latest checkpoint (its directory name) in the newest experiment state on the
    storage, with what identifies that state; None when it is the ``seen`` one, missing or being written."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    path = _find_newest_experiment_checkpoint(experiment_path, fs)
    if path is None:
        return None
    info = fs.get_file_info(path)
    key = (path, info.mtime_ns, info.size)
    if key == seen:
        return None
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        states = {}
        for trial_json, metadata_json in data.get("trial_data", []):
            trial = json.loads(trial_json)
            manager = _TrainingRunMetadata.from_json_state(metadata_json).checkpoint_manager
            latest = manager.latest_checkpoint_result if manager is not None else None
            name = latest.checkpoint.path.rstrip("/").rsplit("/", 1)[1] if latest and latest.checkpoint else None
            states[trial["trial_id"]] = (trial["status"], name)
    except (OSError, ValueError, KeyError, TypeError):  # one being written: the next pass reads it whole
        return None
    return key, states


# Set in the driver when a trial failed on a full storage; the run then stops as on Ctrl-C.
STORAGE_FULL = threading.Event()


class FullStorageStops(tune.Callback):
    """A trial that failed because the storage is full stops the whole run: every other would fail the same way.

    It stops as Ctrl-C does (SIGINT to this process, which Ray handles): Ray saves the
    experiment state with the other trials still to finish, and ``_finish`` says so in
    one line (:class:`StorageFull`). The trials' errors are in their error.txt.
    """

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = trial.error_file
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
        if is_full_storage(text) and not STORAGE_FULL.is_set():
            STORAGE_FULL.set()
            os.kill(os.getpid(), signal.SIGINT)

    on_trial_recover = on_trial_error


class CheckpointRecorder(tune.Callback):
    """Tells the Optuna study where each trial's newest checkpoint is (a user attribute).

    It finds the Optuna trial by the ``ray_trial_id`` attribute the searcher sets, through
    the study's file, so it holds nothing that a resumed sweep would have to restore.
    """

    def __init__(self, db: Path, study_name: str):
        self.url, self.study_name = f"sqlite:///{db}", study_name
        self._storage: optuna.storages.RDBStorage | None = None  # opened at the first checkpoint, then kept

    def __getstate__(self) -> dict:
        # Ray Tune pickles its callbacks with the tuner's state: the open database stays behind.
        return {**self.__dict__, "_storage": None}

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        path = storage.join(trial.path, Path(checkpoint.path).name)
        try:
            # Opening the storage checks its schema, about 0.05 s of CPU; a sweep checkpoints at every report.
            study = self._storage = self._storage or optuna.storages.RDBStorage(self.url)
            study_id = study.get_study_id_from_name(self.study_name)
            for t in study.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("ray_trial_id") == trial.trial_id:
                    study.set_trial_user_attr(t._trial_id, "checkpoint", path)
        except Exception as exc:  # the study is a record; a failed write must not stop the sweep
            logger.warning("could not record trial %s's checkpoint in the study: %s", trial.trial_id,
                           first_line(exc))


class StudyUploader(tune.Callback):
    """Copies the driver's Optuna study to remote storage whenever a trial ends, so readers see it."""

    def __init__(self, local: Path, location: str):
        self.local, self.location = local, location

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        upload_state(self.local, self.location)

    on_trial_error = on_trial_complete


def upload_state(local: Path, location: str) -> None:
    """The sweep file and the study of a remote experiment, from its local staging folder to the storage."""
    if not is_remote(location):
        return
    for name in (SWEEP_FILE, OPTUNA_FILE):
        if (local / name).is_file():
            storage.upload(local / name, storage.join(location, name))
