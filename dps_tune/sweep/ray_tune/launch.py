"""Launching, confirming and resuming a sweep: checked inputs, the Tuner, and the record of how it ended."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from dps_tune import preflight, suppression
from dps_tune.config import Config, TuneConfig, tune_config_from_dict, with_overrides
from dps_tune.errors import Interrupted, LaunchError, UserError
from dps_tune.objectives import OBJECTIVE_MEAN, objectives, scalar_objective
from dps_tune.paths import is_remote
from dps_tune.sweep import reference, storage, test_figures
import dps_tune.sweep.ray_tune.connection as connection  # the module: tests replace its connect
from dps_tune.sweep.ray_tune.callbacks import (OPTUNA_FILE, STORAGE_FULL, CheckpointPruner, CheckpointRecorder,
                                               FullStorageStops, ResolvedConfigWriter, StudyUploader, restore_points,
                                               upload_state)
from dps_tune.sweep.ray_tune.interrupts import StorageFull, ctrl_c_pauses, full_storage_stops
from dps_tune.sweep.ray_tune.searcher import Limiter, PrunedOptunaSearch
from dps_tune.sweep.ray_tune.tasks import map_jobs
from dps_tune.sweep.ray_tune.trial import is_full_storage, trainable
from dps_tune.sweep.results import open_sweep
from dps_tune.sweep.sweep_file import FINISHED, SWEEP_FILE, Confirmation, SweepFile
from dps_tune.sweep.search_space import SearchSpace, Sweep, parse_search, to_optuna

PROGRESS_METRICS = {
    "epoch": "epoch",
    "train_loss": "loss",
    "id_val_acc": "id_val acc",
    "id_val_f1": "id_val F1",
    "ood_val_acc": "ood_val acc",
    "ood_val_f1": "ood_val F1",
}


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
        connection.connect(address, dashboard)
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
            searcher = Limiter(
                PrunedOptunaSearch(space=to_optuna(sweep.space), metric=metrics[0] if one else list(metrics),
                                   mode=modes[0] if one else list(modes), seed=t.seed, study_name=name,
                                   storage=study_storage, max_t=sweep.max_t),
                max_concurrent=t.max_concurrent_trials)
        # ASHA needs one number: the objective itself, or with several, tune.asha_metric.
        scheduler = ASHAScheduler(time_attr="epoch", metric=scalar, mode=scalar_mode, max_t=sweep.max_t,
                                  grace_period=min(t.grace_period, sweep.max_t), reduction_factor=t.reduction_factor)
        SweepFile.new(name, base, t, search=sweep.raw_search, space_file=str(sweep.path), max_t=sweep.max_t,
                      trials=t.num_samples).write(local)
        upload_state(local, location)
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
        with ctrl_c_pauses("sweep"), full_storage_stops(location, "sweep"):
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
        connection.connect(address, dashboard)
        _check_resources(tune_cfg, storage_path, shared_storage)
        local.mkdir(parents=True, exist_ok=True)
        epochs = max(with_overrides(base, v).optim.epochs for v in variants)
        SweepFile.new(name, base, tune_cfg, max_t=epochs, trials=len(variants) * len(seeds),
                      confirm=confirm).write(local)
        upload_state(local, location)
        tuner = tune.Tuner(
            _build_trainable(base, ranking, tune_cfg),
            param_space={"variant": tune.grid_search(variants), "seed": tune.grid_search(seeds)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=tune_cfg.max_concurrent_trials,
                                        reuse_actors=True),
            run_config=_run_config(name, storage_path, ["seed"], tune_cfg, base, local, location),
        )
        with ctrl_c_pauses("confirmation run"), full_storage_stops(location, "confirmation run"):
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
        # Ray keeps every checkpoint: CheckpointPruner deletes, when that is safe.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=scalar,
                                                checkpoint_score_order=scalar_mode),
        failure_config=tune.FailureConfig(max_failures=t.max_failures),
        progress_reporter=reporter,
        callbacks=[ResolvedConfigWriter(base), StudyUploader(local, location), FullStorageStops(),
                   CheckpointPruner(t),
                   *([CheckpointRecorder(local / OPTUNA_FILE, name)] if with_study else []),
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
    full = STORAGE_FULL.is_set() or any(is_full_storage(e) for e in result.errors)
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
    upload_state(local, location)
    if full:
        raise StorageFull(location, what)
    if interrupted:
        raise Interrupted(what, location, len(ended), total - len(ended))


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


def _nothing_to_resume(location: str) -> bool:
    """Whether the sweep at ``location`` has ended whole: finished with no trial in an error, as its file says
    (read again under the driver lock), every trial ended in Ray's saved state, and none left running in the
    study. Resuming it would train nothing, so it starts no Ray."""
    import tempfile

    _, sweep = open_sweep(location)
    if sweep.status != FINISHED or sweep.errors:
        return False
    states = restore_points(location)
    if not states or any(status != "TERMINATED" for status, _ in states.values()):
        return False
    with tempfile.TemporaryDirectory() as tmp:  # the study as the storage holds it (a copy, read only)
        db = Path(tmp) / OPTUNA_FILE
        if not storage.download(storage.join(location, OPTUNA_FILE), db):
            return False
        study = optuna.storages.RDBStorage(f"sqlite:///{db}")
        try:
            running = study.get_all_trials(study.get_study_id_from_name(sweep.name), deepcopy=False,
                                           states=(TrialState.RUNNING,))
        except KeyError:  # no study of that name: let the resume say what is wrong
            return False
        finally:
            study.engine.dispose()
    return not running


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
        if _nothing_to_resume(location):
            print(f"every trial of {location} has finished: nothing to resume", file=sys.stderr, flush=True)
            return location
        storage.check_round_trip(location)
        restore_at, filesystem = _restore_point(location)
        local = storage.staging_dir(location) if is_remote(location) else Path(location)
        if is_remote(location):  # the restored searcher writes to the study where the sweep left it
            storage.download(storage.join(location, OPTUNA_FILE), local / OPTUNA_FILE)
        connection.connect(address, dashboard)
        _check_resources(tune_cfg, location, shared_storage=shared_storage)
        # The stored base names the reference checkpoint the sweep started with, so the
        # ranking is the same one (and usually a cache hit).
        resolved = _resolve_dps(cfg, space)
        local.mkdir(parents=True, exist_ok=True)
        job.sweep.running().write(local)
        upload_state(local, location)
        restored = _build_trainable(resolved.config, resolved.ranking, tune_cfg)
        tuner = tune.Tuner.restore(restore_at, trainable=restored, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=filesystem)
        what = "confirmation run" if job.sweep.confirm is not None else "sweep"
        with ctrl_c_pauses(what), full_storage_stops(location, what):
            _finish(local, location, tuner.fit(), what)
        return location
