"""The one confirmation flow `dps-tune confirm` and the demo share: selection, checks, then the run (Ray stood in for)."""

from __future__ import annotations

import pytest

from dps_tune.errors import ConfigError
from dps_tune.sweep import confirm, ray_tune
from support.experiments import write_experiment


@pytest.fixture
def runs(monkeypatch):
    """What run_points was asked to train, instead of training it."""
    calls = []

    def run_points(base, variants, seeds, tune_cfg, **kwargs):
        calls.append({"base": base, "variants": variants, "seeds": seeds, "tune": tune_cfg, **kwargs})
        return "/runs/confirmed"

    monkeypatch.setattr(ray_tune, "run_points", run_points)
    return calls


@pytest.fixture
def exp(tmp_path):
    return write_experiment(tmp_path, "exp", [("t0", {"optim.lr": 0.01}, 2, 0.6),
                                              ("t1", {"algorithm": "flyp", "optim.lr": 0.02}, 2, 0.8)])


def test_the_flow_selects_checks_announces_and_runs_each_configuration(exp, runs):
    seen = []
    location, variants = confirm.run_confirmation(
        [exp], "id_val_f1", [1, 2], name="c", storage_path="/runs", tune_overrides={"cpus_per_trial": 2.0},
        config_overrides={"optim.epochs": 3}, announce=lambda vs: seen.append([v.method for v in vs]))
    assert location == "/runs/confirmed" and seen == [["ce", "flyp"]] and [v.method for v in variants] == ["ce", "flyp"]
    (call,) = runs
    assert call["base"].optim.epochs == 3 and call["base"].algorithm == "ce" and call["seeds"] == [1, 2]
    assert call["variants"] == [{}, {"algorithm": "flyp", "optim.lr": 0.02}]  # each against the base (ce's)
    t = call["tune"]
    assert (t.metric, t.mode, t.keep_checkpoints, t.max_t, t.cpus_per_trial) == ("id_val_f1", "max", 1, 0, 2.0)
    record = call["confirm"]
    assert record.select == "id_val_f1" and record.seeds == (1, 2) and record.experiments == (str(exp),)
    assert [s["method"] for s in record.selected] == ["ce", "flyp"] and call["name"] == "c"


def test_methods_skipped_are_neither_announced_nor_run(exp, runs):
    _, variants = confirm.run_confirmation([exp], "id_val_f1", [1, 2], name="c", storage_path=None, skip=("flyp",))
    assert [v.method for v in variants] == ["ce"] and runs[0]["variants"] == [{}]


def test_a_selected_configuration_the_run_cannot_select_on_is_refused_before_the_run(exp, runs):
    """The check the demo's own copy of the flow lacked: every selected configuration against the run's tune block."""
    with pytest.raises(ConfigError, match="tune.metric = 'id_val_f1'"):
        confirm.run_confirmation([exp], "id_val_f1", [1, 2], name="c", storage_path=None,
                                 config_overrides={"data.eval_splits": ["ood_val", "ood_test"]})
    assert not runs
