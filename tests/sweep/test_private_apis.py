"""The private parts of Ray and Optuna that dps_tune builds on, checked in seconds, without a Ray run.

An upgrade of either package that moves one of them breaks a named test here, rather
than a slow end-to-end sweep with a puzzling error.
"""

import importlib
import inspect

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search.concurrency_limiter import ConcurrencyLimiter

from dps_tune.sweep import ray_tune
from dps_tune.sweep.ray_tune import searcher as searcher_module


def searcher(**kwargs) -> ray_tune.PrunedOptunaSearch:
    from optuna.distributions import FloatDistribution

    return ray_tune.PrunedOptunaSearch(space={"lr": FloatDistribution(1e-4, 1e-2, log=True)}, metric="id_val_acc",
                                       mode="max", seed=0, max_t=3, **kwargs)


def test_optuna_search_keeps_its_study_trials_and_finished_set_where_the_searcher_reads_them():
    s = searcher()
    assert isinstance(s._ot_study, optuna.Study)
    assert s._ot_trials == {} and s._completed_trials == set()
    assert s.suggest("t1") is not None
    assert isinstance(s._ot_trials["t1"], optuna.Trial) and s._ot_trials["t1"]._trial_id is not None


def test_an_early_stop_is_told_pruned_with_its_curve_and_an_error_is_left_running():
    s = searcher()
    s.suggest("stopped")
    s.suggest("errored")
    s.on_trial_result("stopped", {"id_val_acc": 0.4, "training_iteration": 1, "epoch": 1})
    s.on_trial_complete("stopped", {"id_val_acc": 0.5, "training_iteration": 2, "epoch": 2})
    s.on_trial_complete("errored", {"id_val_acc": 0.5, "training_iteration": 1, "epoch": 1}, error=True)
    trials = {t.user_attrs["ray_trial_id"]: t for t in s._ot_study.get_trials(deepcopy=False)}
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].intermediate_values == {1: 0.4, 2: 0.5}
    assert trials["errored"].state == TrialState.RUNNING and trials["errored"].user_attrs["status"] == "errored"
    assert "stopped" in s._completed_trials


def test_the_concurrency_limiter_keeps_the_attributes_the_limiter_subclass_reads():
    limiter = searcher_module.Limiter(searcher(), max_concurrent=1)
    assert isinstance(limiter, ConcurrencyLimiter)
    assert limiter.live_trials == set() and isinstance(limiter._limit_concurrency, bool)
    assert isinstance(limiter.searcher, ray_tune.PrunedOptunaSearch)


def test_the_stored_experiment_state_is_read_through_functions_that_still_exist():
    from ray.tune.execution import experiment_state
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    assert callable(experiment_state._find_newest_experiment_checkpoint)
    assert callable(_TrainingRunMetadata.from_json_state)
    meta = _TrainingRunMetadata()
    assert hasattr(meta, "checkpoint_manager")


@pytest.mark.parametrize("target", [
    "ray.train._internal.checkpoint_manager:_delete_fs_path",  # the kill-after-deletion tests patch it
    "ray.tune.tune:_setup_signal_catching",  # Ctrl-C: Ray's handler, which hands SIGINT back to ours
])
def test_a_function_the_tests_or_the_ctrl_c_handling_rely_on_exists(target):
    module, name = target.split(":")
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("module,line", [
    ("ray.tune.tune", "Stop signal received"),  # turned into dps-tune's own Ctrl-C line
    ("ray.tune.tune", "Experiment has been interrupted"),  # names Tuner.restore: hidden
    ("ray.tune.tune", "Trials did not complete"),
    ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics"),  # hidden once stopped
    ("ray._private.worker", "Unhandled error"),  # a trial stopped by a full storage: hidden
])
def test_the_ray_log_lines_dps_tune_rewords_are_still_what_ray_says(module, line):
    assert line in inspect.getsource(importlib.import_module(module))


def test_the_loopback_switch_is_read_where_the_embedded_ray_sets_it():
    """ray_tune.connection.loopback_only turns this off, so that Ray keeps 127.0.0.1 rather than the machine's address."""
    from ray._private import ray_constants, services

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address)
