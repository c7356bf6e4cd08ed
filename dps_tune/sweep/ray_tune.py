"""The one module that talks to Ray: trainable, Optuna + ASHA, launch, resume.

Ray's reporting API has changed several times; everything Ray-specific stays behind
this door. The training core (:func:`dps_tune.train.run_trial`) knows nothing of it:
each trial receives a frozen :class:`~dps_tune.config.Config` (the sweep's base with
the DPS reference resolved), its searched values, and the DPS ranking computed once
on the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

# Set before Ray reads them. The legacy progress reporter is the one that takes our ID/OOD
# columns; frequent experiment-state saves mean a killed driver loses (almost) nothing.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Snapshots are forced whenever a trial checkpoints; with few kept checkpoints that is by design.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# An embedded Ray starts no idle workers ahead of need: Tune gives every trial actor a runtime
# environment of its own (PL_DISABLE_FORK), so a prestarted plain worker never runs a trial; two of
# them were half the worker processes of a small sweep (each importing Ray for nothing).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

import optuna  # noqa: E402
import ray  # noqa: E402
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from dps_tune import checkpoint as ckpt  # noqa: E402
from dps_tune import preflight, retention, suppression  # noqa: E402
from dps_tune.config import (Config, TuneConfig, merge_dotted, to_dict, tune_config_from_dict,  # noqa: E402
                             with_overrides)
from dps_tune.errors import Interrupted, LaunchError, UserError, first_line  # noqa: E402
from dps_tune.files import disk_full, json_object_or_none, space_left  # noqa: E402
from dps_tune.objectives import OBJECTIVE_MEAN, objective_mean, objectives, scalar_objective  # noqa: E402
from dps_tune.paths import is_remote  # noqa: E402
from dps_tune.sweep import reference, storage, test_figures  # noqa: E402
from dps_tune.sweep.results import TRIAL_CONFIG_FILE, flat_params, open_sweep  # noqa: E402
from dps_tune.sweep.sweep_file import SWEEP_FILE, Confirmation, SweepFile  # noqa: E402
from dps_tune.sweep.search_space import SearchSpace, Sweep, parse_search, to_optuna  # noqa: E402
from dps_tune.train import run_trial  # noqa: E402

logger = logging.getLogger(__name__)

OPTUNA_FILE = "optuna.db"
# Testing hook for retries: crash each trial once, right after it reports this epoch.
CRASH_AT_EPOCH_ENV = "DPS_TUNE_INJECT_CRASH_AT_EPOCH"
CRASH_MARKER_ENV = "DPS_TUNE_INJECT_CRASH_MARKER_DIR"
# Testing hook for a driver killed between a trial's last report and its end: after reporting
# its last epoch, each trial writes <dir>/<trial id>.held and waits there until it is killed.
HOLD_AT_END_ENV = "DPS_TUNE_INJECT_HOLD_AT_END_DIR"
PROGRESS_METRICS = {
    "epoch": "epoch",
    "train_loss": "loss",
    "id_val_acc": "id_val acc",
    "id_val_f1": "id_val F1",
    "ood_val_acc": "ood_val acc",
    "ood_val_f1": "ood_val F1",
}


# --------------------------------------------------------------------------- trainable


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
        # Superseded checkpoints and train state are deleted by the driver (_CheckpointPruner), never here.
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


def _full(error: BaseException | str) -> bool:
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


class _ResolvedConfigWriter(tune.Callback):
    """Writes each trial's resolved config (base + searched values) into its directory."""

    def __init__(self, base: Config):
        self.base = to_dict(base)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Through the trial's own storage filesystem: a local disk, file://, s3:// or gs:// alike.
        text = json.dumps(merge_dotted(self.base, flat_params(trial.config)), indent=2) + "\n"
        storage.write_fs_text(trial.storage.storage_filesystem, f"{trial.path}/{TRIAL_CONFIG_FILE}", text)


class _CheckpointPruner(tune.Callback):
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
_STORAGE_FULL = threading.Event()


class _FullStorageStops(tune.Callback):
    """A trial that failed because the storage is full stops the whole run: every other would fail the same way.

    It stops as Ctrl-C does (SIGINT to this process, which Ray handles): Ray saves the
    experiment state with the other trials still to finish, and ``_finish`` says so in
    one line (:class:`StorageFull`). The trials' errors are in their error.txt.
    """

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = trial.error_file
        text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
        if _full(text) and not _STORAGE_FULL.is_set():
            _STORAGE_FULL.set()
            os.kill(os.getpid(), signal.SIGINT)

    on_trial_recover = on_trial_error


class _CheckpointRecorder(tune.Callback):
    """Tells the Optuna study where each trial's newest checkpoint is (a user attribute).

    It finds the Optuna trial by the ``ray_trial_id`` attribute the searcher sets, through
    the study's file, so it holds nothing that a resumed sweep would have to restore.
    """

    def __init__(self, db: Path, study_name: str):
        self.url, self.study_name = f"sqlite:///{db}", study_name

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        path = storage.join(trial.path, Path(checkpoint.path).name)
        try:
            study = optuna.storages.RDBStorage(self.url)
            study_id = study.get_study_id_from_name(self.study_name)
            for t in study.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("ray_trial_id") == trial.trial_id:
                    study.set_trial_user_attr(t._trial_id, "checkpoint", path)
        except Exception as exc:  # the study is a record; a failed write must not stop the sweep
            logger.warning("could not record trial %s's checkpoint in the study: %s", trial.trial_id,
                           first_line(exc))


class _StudyUploader(tune.Callback):
    """Copies the driver's Optuna study to remote storage whenever a trial ends, so readers see it."""

    def __init__(self, local: Path, location: str):
        self.local, self.location = local, location

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _upload_state(self.local, self.location)

    on_trial_error = on_trial_complete


def _upload_state(local: Path, location: str) -> None:
    """The sweep file and the study of a remote experiment, from its local staging folder to the storage."""
    if not is_remote(location):
        return
    for name in (SWEEP_FILE, OPTUNA_FILE):
        if (local / name).is_file():
            storage.upload(local / name, storage.join(location, name))


# ------------------------------------------------------------------------- searcher


class PrunedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna about ASHA's early stops as *pruned* trials.

    Ray's OptunaSearch records a trial the scheduler stopped as COMPLETE, with the value
    of its last (low-fidelity) epoch, which misleads TPE. Here a trial that ended without
    error before its last epoch is told as PRUNED and keeps its intermediate values.
    """

    def __init__(self, *args: Any, max_t: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._max_t = max_t
        self._last_step: dict[str, int] = {}
        self._told_before: set[str] = set()

    def _finished_before(self, trial_id: str) -> None:
        """The study already holds this trial's end: it reached the storage after Ray's last saved experiment
        state (a driver killed between the two), so `resume` runs the trial on from its checkpoint. The
        study keeps the outcome it has; the rerun's results go to Ray's files only."""
        logger.info("trial %s: the study already holds its end; its record there is kept", trial_id)
        self._told_before.add(trial_id)
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._told_before:
            return
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            self._finished_before(trial_id)
            return
        if isinstance(self.metric, str):
            self._last_step[trial_id] = result.get("training_iteration", 0)
        self._attrs(trial_id, result, "running")

    def _attrs(self, trial_id: str, result: dict | None, status: str) -> None:
        """Every ID/OOD metric, what DPS holds, the epoch and the status as user attributes, for optuna-dashboard."""
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return
        try:
            for key, value in (result or {}).items():
                if key.endswith(("_acc", "_f1")) or key.startswith("dps_") or key in (
                        "epoch", "train_loss", OBJECTIVE_MEAN):
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        trial.set_user_attr(key, float(value))
            trial.set_user_attr("status", status)
            trial.set_user_attr("ray_trial_id", trial_id)
        except Exception as exc:  # the study is a record; a failed write must not stop the sweep
            logger.warning("could not record trial %s's attributes in the study: %s", trial_id, first_line(exc))


    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials or trial_id in self._told_before:
            return
        known = trial_id not in self._completed_trials
        single = isinstance(self.metric, str)  # Optuna keeps no learning curves for several objectives
        if known and result and single and self.metric in result:
            # The result that made ASHA stop the trial (or its last one) never reached
            # on_trial_result: record it, so the study holds the whole learning curve.
            step = result.get("training_iteration", 0)
            if step > self._last_step.get(trial_id, 0):
                try:
                    self._ot_trials[trial_id].report(result[self.metric], step)
                except UpdateFinishedTrialError:
                    self._finished_before(trial_id)
                    return
                self._last_step[trial_id] = step
        if known:
            finish = min(self._max_t, (result or {}).get("max_epoch", self._max_t))
            status = ("errored" if error else "completed" if (result or {}).get("epoch", 0) >= finish
                      else "stopped by ASHA")
            self._attrs(trial_id, result, status)
        if known and error:  # left RUNNING, for `resume` to continue and tell its real outcome
            return
        if known and not error and result and "epoch" in result:
            finish = min(self._max_t, result.get("max_epoch", self._max_t))
            if result["epoch"] < finish:
                try:
                    self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.PRUNED)
                except (ValueError, RuntimeError) as exc:  # e.g. a study that refuses pruned trials
                    logger.warning("could not record trial %s as pruned: %s", trial_id, first_line(exc))
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result, error)


class _Limiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter, except that the end of a trial it already let go (one that errored, and that
    `resume` then continued) still reaches the searcher, which left its Optuna trial RUNNING for it."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials or not self._limit_concurrency:
            super().on_trial_complete(trial_id, result, error)
        else:
            self.searcher.on_trial_complete(trial_id, result, error)


# ---------------------------------------------------------------------------- launch


def _loopback_only() -> None:
    """The embedded Ray serves this machine alone, so each of its processes binds to 127.0.0.1.

    Ray swaps 127.0.0.1 for the machine's own address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is 0: every process it starts reads that from the environment, and this one read it
    once, when Ray was imported.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# True while this process's Ray is one it started for itself (no address): see evaluates_here.
_EMBEDDED = threading.Event()


def _connect(address: str | None, dashboard: bool) -> None:
    """Start a local Ray (no address and no ``RAY_ADDRESS``) or connect to a running cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _EMBEDDED.set()
        _loopback_only()
        # "local": without it, ray.init joins a cluster that `ray start` left running on this machine
        # (/tmp/ray/ray_current_cluster), someone else's perhaps.
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1",
                       logging_level=logging.WARNING, log_to_driver=True)
        url = getattr(ctx, "dashboard_url", None)
        if dashboard and url:
            print(f"Ray dashboard: http://{url} (token auth: `ray get-auth-token`)", file=sys.stderr)
        return
    package_dir = str(Path(__file__).resolve().parents[1])
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 runtime_env={"py_modules": [package_dir]})
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, OSError) as exc:
        hint = ""
        if address != "auto" and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = ("; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or ~/.ray/auth_token): Ray sends its token to an explicit address only then")
        source = "--address" if address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
        raise LaunchError(f"{source} {address}: cannot connect to the Ray cluster ({first_line(exc, 200)}){hint}") from None


def _check_resources(sweep_tune, storage: str, shared_storage: bool) -> None:
    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    if sweep_tune.gpus_per_trial > gpus:
        raise LaunchError(f"tune.gpus_per_trial = {sweep_tune.gpus_per_trial:g}: the cluster has {gpus:g} GPU(s); "
                          "no trial could ever start")
    if sweep_tune.cpus_per_trial > cpus:
        raise LaunchError(f"tune.cpus_per_trial = {sweep_tune.cpus_per_trial:g}: the cluster has {cpus:g} CPU(s); "
                          "no trial could ever start")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not is_remote(storage) and not shared_storage:
        raise LaunchError(f"--storage {storage}: a local path, but the cluster has {len(nodes)} nodes; Ray Tune needs "
                          "storage every node can reach (s3://, gs://, or an NFS mount passed with --shared-storage)")


def _resolve_dps(cfg: Config, space: SearchSpace) -> reference.ResolvedDPS:
    """Resolve the DPS reference and compute the ranking once, before any trial starts."""
    start = time.perf_counter()
    resolved = reference.resolve(cfg, space)
    if resolved.ranking is None:
        return resolved
    if cfg.dps.reference is None:
        print(f"DPS reference: best checkpoint of {cfg.dps.reference_experiment} by {cfg.dps.reference_metric}: "
              f"{resolved.config.dps.reference}", file=sys.stderr)
    print(f"DPS ranking: {'cache hit' if resolved.cache_hit else 'computed'} "
          f"({sum(s.numel() for s in resolved.ranking.values())} rows, {time.perf_counter() - start:.2f} s); "
          "shared with every trial through the object store", file=sys.stderr)
    return resolved


def _build_trainable(base: Config, ranking: suppression.Scores | None, tune_cfg: TuneConfig) -> Any:
    share = tune_cfg.gpus_per_trial if 0 < tune_cfg.gpus_per_trial < 1 else None
    fn = tune.with_parameters(trainable, base=base, ranking=ranking, gpu_share=share, tune_cfg=tune_cfg)
    return tune.with_resources(fn, {"cpu": tune_cfg.cpus_per_trial, "gpu": tune_cfg.gpus_per_trial})


def _new_experiment(storage_path: str | None, name: str) -> tuple[str, str, Path]:
    """The storage root, the experiment's location on it, and the driver's local folder for it; checked.

    Side-effect free, so a refused launch leaves nothing, not even a lock file;
    :func:`_launching` takes the lock and repeats the check under it.
    """
    storage_path = storage_path or str(Path("runs").resolve())
    if not is_remote(storage_path):
        storage_path = str(Path(storage_path).expanduser().resolve())
    location = storage.join(storage_path, name)
    if not is_remote(storage_path) and Path(storage_path).exists() and not Path(storage_path).is_dir():
        raise LaunchError(f"--storage {storage_path}: a file, not a directory")
    if not is_remote(location) and Path(location).exists() and not Path(location).is_dir():
        raise LaunchError(f"--name {name}: {location} is a file, not an experiment directory")
    _refuse_existing(location)
    # The driver's own files: in the experiment on a local disk, staged locally for a URI.
    local = storage.staging_dir(location) if is_remote(location) else Path(location)
    return storage_path, location, local


def _refuse_existing(location: str) -> None:
    if storage.exists(storage.join(location, SWEEP_FILE)):
        raise LaunchError(f"experiment {location} exists already: continue it with "
                          f"`dps-tune resume {shlex.quote(location)}` or pass another --name")


@contextlib.contextmanager
def _launching(storage_path: str | None, name: str) -> Iterator[tuple[str, str, Path]]:
    """:func:`_new_experiment`, held under the experiment's lock for the whole run (:func:`storage.driver_lock`)."""
    storage_path, location, local = _new_experiment(storage_path, name)
    with storage.driver_lock(location):
        _refuse_existing(location)  # another launch may have got there between the check and the lock
        storage.check_round_trip(location)
        if is_remote(location) and local.exists():
            # Left from an experiment of this name that is gone from the storage: its Optuna
            # study would feed the new search (and break `tune.seed`'s reproducibility).
            shutil.rmtree(local)
        yield storage_path, location, local


def run_sweep(sweep: Sweep, *, address: str | None = None, storage_path: str | None = None,
              name: str | None = None, dashboard: bool = True, shared_storage: bool = False) -> str:
    """Launch a sweep and wait for it; returns where the experiment is (a path, or a URI on remote storage)."""
    name = name or f"{sweep.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _launching(storage_path, name) as (storage_path, location, local):
        _connect(address, dashboard)
        _check_resources(sweep.tune, storage_path, shared_storage)
        resolved = _resolve_dps(sweep.config, sweep.space)
        base = resolved.config

        t = sweep.tune
        local.mkdir(parents=True, exist_ok=True)
        searcher = None
        metrics, modes = objectives(t)
        scalar, scalar_mode = scalar_objective(t)
        if sweep.space:
            study_storage = optuna.storages.RDBStorage(f"sqlite:///{local / OPTUNA_FILE}")
            one = len(metrics) == 1
            searcher = _Limiter(
                PrunedOptunaSearch(space=to_optuna(sweep.space), metric=metrics[0] if one else list(metrics),
                                   mode=modes[0] if one else list(modes), seed=t.seed, study_name=name,
                                   storage=study_storage, max_t=sweep.max_t),
                max_concurrent=t.max_concurrent_trials)
        # ASHA needs one number: the objective itself, or with several, tune.asha_metric.
        scheduler = ASHAScheduler(time_attr="epoch", metric=scalar, mode=scalar_mode, max_t=sweep.max_t,
                                  grace_period=min(t.grace_period, sweep.max_t), reduction_factor=t.reduction_factor)
        SweepFile.new(name, base, t, search=sweep.raw_search, space_file=str(sweep.path), max_t=sweep.max_t,
                      trials=t.num_samples).write(local)
        _upload_state(local, location)
        tuner = tune.Tuner(
            _build_trainable(base, resolved.ranking, t),
            param_space={},
            # reuse_actors: a finished trial's worker process takes the next trial, so torch and
            # open_clip are imported once per worker, not once per trial.
            # The ConcurrencyLimiter bounds concurrency when there is a searcher; Tune otherwise.
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
                                        max_concurrent_trials=None if searcher else t.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=_run_config(name, storage_path, sweep.space.keys, t, base, local, location,
                                   with_study=searcher is not None),
        )
        with _ctrl_c_pauses("sweep"), _full_storage_stops(location, "sweep"):
            _finish(local, location, tuner.fit(), "sweep")
        return location


def run_points(base: Config, variants: list[dict[str, Any]], seeds: list[int], tune_cfg: TuneConfig, *,
               ranking: suppression.Scores | None, name: str, storage_path: str | None = None,
               address: str | None = None, dashboard: bool = True, shared_storage: bool = False,
               confirm: Confirmation | None = None) -> str:
    """Train every variant (dotted overrides of ``base``) with every seed: one Ray Tune run, a grid.

    No search and no early stopping (`dps-tune confirm`). The experiment directory is
    a sweep's: ``params.json`` holds ``{"variant": {...}, "seed": N}``; its sweep file
    records ``confirm``.
    """
    with _launching(storage_path, name) as (storage_path, location, local):
        _connect(address, dashboard)
        _check_resources(tune_cfg, storage_path, shared_storage)
        local.mkdir(parents=True, exist_ok=True)
        epochs = max(with_overrides(base, v).optim.epochs for v in variants)
        SweepFile.new(name, base, tune_cfg, max_t=epochs, trials=len(variants) * len(seeds),
                      confirm=confirm).write(local)
        _upload_state(local, location)
        tuner = tune.Tuner(
            _build_trainable(base, ranking, tune_cfg),
            param_space={"variant": tune.grid_search(variants), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=tune_cfg.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=_run_config(name, storage_path, ["seed"], tune_cfg, base, local, location),
        )
        with _ctrl_c_pauses("confirmation run"), _full_storage_stops(location, "confirmation run"):
            _finish(local, location, tuner.fit(), "confirmation run")
        return location


def _run_config(name: str, storage_path: str, searched_keys: list[str], t: TuneConfig, base: Config, local: Path,
                location: str, with_study: bool = False) -> Any:
    filesystem = None
    if is_remote(storage_path):  # Ray gets the filesystem dps_tune opened: a URI's query options are in it
        filesystem, storage_path = storage.resolve(storage_path)
    scalar, scalar_mode = scalar_objective(t)
    columns = dict(PROGRESS_METRICS)
    if scalar == OBJECTIVE_MEAN:
        columns[OBJECTIVE_MEAN] = "objective mean"
    reporter = tune.CLIReporter(
        metric_columns=columns,
        parameter_columns={k: k.rsplit(".", 1)[-1] for k in searched_keys},
        max_report_frequency=10, metric=scalar, mode=scalar_mode, sort_by_metric=True, max_progress_rows=30)
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        # Ray keeps every checkpoint: _CheckpointPruner deletes, when that is safe.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=scalar,
                                                checkpoint_score_order=scalar_mode),
        failure_config=tune.FailureConfig(max_failures=t.max_failures),
        progress_reporter=reporter,
        callbacks=[_ResolvedConfigWriter(base), _StudyUploader(local, location), _FullStorageStops(),
                   _CheckpointPruner(t),
                   *([_CheckpointRecorder(local / OPTUNA_FILE, name)] if with_study else []),
                   *_tracker_callbacks(t.loggers, name)],
        verbose=1,
    )


def _tracker_callbacks(loggers: tuple[str, ...], name: str) -> list[Any]:
    """Ray's own MLflow and W&B callbacks: a run per trial, with its searched parameters and every metric.

    Both are configured the way their users expect, through the trackers' environment
    variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_PROJECT``,
    ``WANDB_GROUP``, ``WANDB_MODE``, ``WANDB_API_KEY``, ...); the MLflow experiment and the W&B
    group default to the sweep's name, the W&B project to ``dps_tune``.
    """
    callbacks = []
    if "mlflow" in loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        # MLFLOW_EXPERIMENT_ID, when set, wins over the name (Ray checks it first).
        callbacks.append(MLflowLoggerCallback(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", name),
                                              tags={"dps_tune.sweep": name}))
    if "wandb" in loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        # The group is WANDB_GROUP or the sweep's name (Ray's default).
        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "dps_tune")))
    return callbacks


class _RayLines(logging.Filter):
    """Ray's lines on Ctrl-C name its own Python API (``Tuner.restore``): say it in dps-tune's words instead.
    A trial's failure on a full storage is no traceback: the run stops with one line (:class:`StorageFull`).
    Once stopped, Ray's warning that trials not yet started have no results is no news either."""

    stopped = False

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and _full(record.exc_info[1]):
            return False
        if self.stopped and text.startswith("Failed to fetch metrics"):
            return False
        if text.startswith("Stop signal received"):
            self.stopped = True
            if _STORAGE_FULL.is_set():
                return False
            print(f"dps-tune: Ctrl-C: stopping the trials and saving the {self.what}, so that `resume` continues it",
                  file=sys.stderr, flush=True)
            return False
        return not text.startswith(("Experiment has been interrupted", "Trials did not complete"))


# Ctrl-C presses since the run began; the third quits at once (see _ctrl_c_pauses).
_PRESSES = [0]


def _put_off_ctrl_c(doing: str, after: str = "") -> Any:
    """A SIGINT handler that puts off the first Ctrl-C while ``doing`` and quits on the next."""

    def later(signum: int, frame: Any) -> None:
        _PRESSES[0] += 1
        if _PRESSES[0] > 1:
            raise KeyboardInterrupt
        print(f"dps-tune: still {doing}; Ctrl-C once more quits at once{after}", file=sys.stderr, flush=True)

    return later


@contextlib.contextmanager
def _ctrl_c_pauses(what: str) -> Iterator[None]:
    """Ctrl-C while the trials run is a pause: Ray's own handler (installed by ``fit``) stops them and saves
    the experiment state, then hands SIGINT back to this one, which puts off a second Ctrl-C while that is
    under way, so what is saved is whole. A third quits at once (the last saved state still resumes).
    :func:`shutdown` goes on counting, so that a second Ctrl-C while Ray stops does not hide the pause."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PRESSES[0] = 0
    _STORAGE_FULL.clear()
    quiet = _RayLines(what)
    ray_logs = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.execution.tune_controller",
                                                     "ray.tune.analysis.experiment_analysis")]
    previous = signal.signal(signal.SIGINT, _put_off_ctrl_c(f"saving the {what}'s state",
                                                                 " (`resume` then goes on from the last state saved)"))
    for log in ray_logs:
        log.addFilter(quiet)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for log in ray_logs:
            log.removeFilter(quiet)


def _finish(local: Path, location: str, result: Any, what: str) -> None:
    """Record the end of a run, finished or interrupted; raise :class:`Interrupted` for the second.

    The experiment state Ray saved last tells which trials ended (finished, stopped or
    errored). When some did not, or were never started, the run was interrupted (Ctrl-C):
    their Optuna trials stay RUNNING, for the resumed run to tell; so do errored trials,
    which `resume` continues. Other Optuna trials still RUNNING are ones a killed driver
    left behind: FAIL. A full storage, behind the trials' errors, is :class:`StorageFull`.
    """
    sweep = SweepFile.load(local, location)
    states = restore_points(location)
    ended = [t for t, (status, _) in states.items() if status in ("TERMINATED", "ERROR")]
    total = sweep.planned_trials or len(states)
    interrupted = len(ended) < total
    errors = len(result.errors)
    sweep = sweep.interrupted_now(set(states) - set(ended), errors) if interrupted else sweep.finished_now(errors)
    full = _STORAGE_FULL.is_set() or any(_full(e) for e in result.errors)
    if not interrupted and not full:  # kept checkpoints get their test figures once (see map_jobs)
        test_figures.complete(location, lambda jobs: map_jobs(test_figures.evaluate_job, jobs),
                              say=lambda line: print(line, file=sys.stderr, flush=True))
    sweep.write(local)
    db = local / OPTUNA_FILE
    if db.exists():
        study = optuna.storages.RDBStorage(f"sqlite:///{db}")
        study_id = study.get_study_id_from_name(sweep.name)
        errored = {t for t, (status, _) in states.items() if status == "ERROR"}
        for trial in study.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if interrupted and trial.user_attrs.get("status") != "errored":
                study.set_trial_user_attr(trial._trial_id, "status", "interrupted")
            elif trial.user_attrs.get("ray_trial_id") not in errored and not interrupted:
                study.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    _upload_state(local, location)
    if full:
        raise StorageFull(location, what)
    if interrupted:
        raise Interrupted(what, location, len(ended), total - len(ended))


class StorageFull(UserError):
    """The experiment's storage filled up: one line naming it and its free space, and how to go on."""

    def __init__(self, location: str, what: str):
        super().__init__(f"storage {location} is full ({space_left(location)}): the {what} stopped; make "
                         f"room, then continue it with `dps-tune resume {shlex.quote(location)}`")


@contextlib.contextmanager
def _full_storage_stops(location: str, what: str) -> Iterator[None]:
    """A full storage met by the driver itself (its callbacks, Ray's logs, the sweep file) is :class:`StorageFull`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise StorageFull(location, what) from None


@dataclasses.dataclass(frozen=True)
class Resumable:
    """A sweep to continue, read and checked: where it is, its sweep file, config, tune settings and space."""

    location: str
    sweep: SweepFile
    config: Config
    tune: TuneConfig
    space: SearchSpace


def load_resumable(exp: str | os.PathLike) -> Resumable:
    """Read what resuming ``exp`` (a path or a URI) needs, checking it before Ray starts."""
    location = str(exp) if is_remote(exp) else str(Path(exp).resolve())
    _, sweep = open_sweep(location)
    if sweep.tune is None:
        raise UserError(f"experiment {location!r}: {SWEEP_FILE} has no tune block; it cannot be resumed")
    cfg = sweep.base_config()
    preflight.check_config(cfg)
    tune_cfg = tune_config_from_dict(sweep.tune)
    preflight.check_loggers(tune_cfg.loggers)
    space = parse_search(sweep.search, cfg)
    restore_at, filesystem = _restore_point(location)
    if not tune.Tuner.can_restore(restore_at, storage_filesystem=filesystem):
        raise UserError(f"experiment {location!r}: Ray has no experiment state to restore (a sweep that never "
                        "started a trial, or a directory copied without its experiment_state files)")
    return Resumable(location, sweep, cfg, tune_cfg, space)


def _restore_point(location: str) -> tuple[str, Any]:
    """Where Ray restores ``location`` from, and the filesystem object for a URI or a mounted one (else None)."""
    if is_remote(location):
        filesystem, path = storage.resolve(location)
        return path, filesystem
    return location, None


def resume_sweep(exp: str | os.PathLike | Resumable, *, address: str | None = None, dashboard: bool = True,
                 shared_storage: bool = False) -> str:
    """Continue an interrupted sweep: unfinished and errored trials go on from their last checkpoints."""
    job = exp if isinstance(exp, Resumable) else load_resumable(exp)
    with storage.driver_lock(job.location):
        location, cfg, tune_cfg, space = job.location, job.config, job.tune, job.space
        storage.check_round_trip(location)
        restore_at, filesystem = _restore_point(location)
        local = storage.staging_dir(location) if is_remote(location) else Path(location)
        if is_remote(location):  # the restored searcher writes to the study where the sweep left it
            storage.download(storage.join(location, OPTUNA_FILE), local / OPTUNA_FILE)
        _connect(address, dashboard)
        _check_resources(tune_cfg, location, shared_storage=shared_storage)
        # The stored base names the reference checkpoint the sweep started with, so the
        # ranking is the same one (and usually a cache hit).
        resolved = _resolve_dps(cfg, space)
        local.mkdir(parents=True, exist_ok=True)
        job.sweep.running().write(local)
        _upload_state(local, location)
        trainable = _build_trainable(resolved.config, resolved.ranking, tune_cfg)
        tuner = tune.Tuner.restore(restore_at, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=filesystem)
        what = "confirmation run" if job.sweep.confirm is not None else "sweep"
        with _ctrl_c_pauses(what), _full_storage_stops(location, what):
            _finish(local, location, tuner.fit(), what)
        return location


# ------------------------------------------------------------------------ tasks


def evaluates_here(address: str | None = None) -> bool:
    """Whether :func:`map_jobs` runs its jobs in this process rather than as Ray tasks.

    It does where Ray is (or would be) this process's own, on a machine without a GPU. A
    task there adds a worker process that imports torch and loads the model and the data
    again, about 10 CPU-seconds, and a task's one CPU runs torch on one thread; this
    process has them already and runs torch on every core. Measured on 2 cores: a tiny
    sweep's test figures took 11.5 s as tasks and 0.6 s here; WiSE-FT over the demo's
    three experiments (15 evaluations of 4,000 images) 65.4 s and 109 CPU-seconds as
    tasks, 66.4 s and 77 CPU-seconds here. A cluster (``address``, ``RAY_ADDRESS``) or a
    GPU gets Ray tasks; ``wise --ray-tasks`` asks for them on many cores.
    """
    if ray.is_initialized():
        return _EMBEDDED.is_set() and ray.cluster_resources().get("GPU", 0) < 1
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    import torch

    return not torch.cuda.is_available()


def map_jobs(fn: Any, jobs: list[dict], *, address: str | None = None, gpus: float | None = None,
             tasks: bool | None = None) -> Any:
    """Run ``fn(job)`` for every job; yield ``(job, result)`` as each one finishes.

    ``tasks`` None: as Ray tasks unless :func:`evaluates_here` says this process serves
    better; True: always as Ray tasks; False: always here, one after another.
    Ray tasks connect like a sweep (embedded Ray, ``--address`` or ``RAY_ADDRESS``). Each
    asks for one CPU and, where the cluster has GPUs, ``gpus`` (default one) of a GPU. Ray
    reuses worker processes, so what ``fn`` caches (a model, the evaluation data) serves
    the next job on the same worker. A failing job stops the run with its first line.
    """
    if not jobs:
        return
    if tasks is False or (tasks is None and evaluates_here(address)):
        for job in jobs:
            yield job, fn(job)
        return
    _connect(address, dashboard=False)
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    remote = ray.remote(num_cpus=1, num_gpus=(1 if gpus is None else gpus) if has_gpu else 0,
                        max_retries=1)(fn)
    pending = {remote.remote(job): job for job in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, UserError):
                    raise cause from None
                raise LaunchError(f"an evaluation task failed ({type(cause).__name__}: {first_line(cause, 300)})"
                                  ) from None
            yield job, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def shutdown() -> None:
    """Stop this process's Ray. A Ctrl-C meanwhile is put off once, as while a run saves its state."""
    if not ray.is_initialized():
        return
    _EMBEDDED.clear()
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = signal.signal(signal.SIGINT, _put_off_ctrl_c("stopping Ray"))
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
