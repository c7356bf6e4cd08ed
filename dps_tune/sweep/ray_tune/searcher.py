"""Optuna behind Ray Tune: ASHA's early stops told to the study as pruned trials, and a trial's end told once."""

from __future__ import annotations

import logging
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from dps_tune.errors import first_line
from dps_tune.objectives import OBJECTIVE_MEAN

logger = logging.getLogger(__name__)


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


class Limiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter, except that the end of a trial it already let go (one that errored, and that
    `resume` then continued) still reaches the searcher, which left its Optuna trial RUNNING for it."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.live_trials or not self._limit_concurrency:
            super().on_trial_complete(trial_id, result, error)
        else:
            self.searcher.on_trial_complete(trial_id, result, error)
