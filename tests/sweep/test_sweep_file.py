"""The sweep file: one typed record, read and written in one place, with its version and its objective."""

from __future__ import annotations

import json
import re

import pytest

from support.worlds import tiny_raw
from dps_tune import cli
from dps_tune.config import TuneConfig, config_from_dict, to_dict
from dps_tune.errors import UserError
from dps_tune.sweep.sweep_file import SWEEP_FILE, VERSION, Confirmation, SweepFile
from support.experiments import write_experiment

# What `dps-tune sweep` wrote before the file had a version: run_sweep's keys, then _finish's.
OLD_FILE = {
    "name": "old", "base": to_dict(config_from_dict(tiny_raw())),
    "tune": to_dict(TuneConfig(metric=("id_val_f1", "ood_val_f1"), mode=("max", "max"), num_samples=3)),
    "search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "space_file": "/spaces/old.yaml", "max_t": 4,
    "status": "interrupted", "trials": 3, "started": "2024-05-01 10:00:00", "interrupted": ["a1b2_00002"],
    "finished": "2024-05-01 10:20:00", "errors": 1,
}


def test_a_new_file_reads_back_as_it_was_written(tmp_path):
    sweep = SweepFile.new("exp", config_from_dict(tiny_raw()), TuneConfig(metric="ood_val_acc", num_samples=5),
                          max_t=3, trials=5, search={"seed": {"choice": [0, 1]}}, space_file="/s.yaml",
                          confirm=Confirmation("id_val_f1", (1, 2), ({"method": "ce", "trial": "t0"},), ("/runs/a",)))
    path = sweep.write(tmp_path)
    assert path == tmp_path / SWEEP_FILE
    raw = json.loads(path.read_text())
    assert raw["version"] == VERSION and raw["status"] == "running" and raw["trials"] == 5
    assert raw["confirm"] == {"select": "id_val_f1", "seeds": [1, 2], "experiments": ["/runs/a"],
                              "selected": [{"method": "ce", "trial": "t0"}]}
    assert "finished" not in raw and "interrupted" not in raw  # a run that has not ended says nothing of its end
    assert SweepFile.read(tmp_path) == sweep
    assert sweep.base_config() == config_from_dict(tiny_raw())


def test_a_file_without_a_version_reads_and_is_written_back_with_one(tmp_path):
    """The file as dps_tune wrote it before versions: every key reads; rewritten, it keeps them and gains one."""
    (tmp_path / SWEEP_FILE).write_text(json.dumps({**OLD_FILE, "note": "by hand"}))
    sweep = SweepFile.read(tmp_path)
    assert sweep.version == 0 and sweep.name == "old" and sweep.max_t == 4 and sweep.trials == 3
    assert sweep.status == "interrupted" and sweep.ended and sweep.interrupted == ("a1b2_00002",)
    assert sweep.errors == 1 and sweep.space_file == "/spaces/old.yaml" and sweep.confirm is None
    assert sweep.search == OLD_FILE["search"] and sweep.tune == OLD_FILE["tune"]
    sweep.write(tmp_path)
    assert json.loads((tmp_path / SWEEP_FILE).read_text()) == {**OLD_FILE, "note": "by hand", "version": VERSION}


def test_a_run_that_ends_records_how(tmp_path):
    sweep = SweepFile.new("exp", config_from_dict(tiny_raw()), TuneConfig(num_samples=4), max_t=2, trials=4)
    assert not sweep.ended and sweep.planned_trials == 4
    stopped = sweep.interrupted_now({"t3", "t1"}, errors=0)
    assert stopped.status == "interrupted" and stopped.interrupted == ("t1", "t3") and stopped.ended
    done = stopped.running().finished_now(errors=2)
    assert done.status == "finished" and done.interrupted == () and done.errors == 2 and done.finished
    done.write(tmp_path)
    assert json.loads((tmp_path / SWEEP_FILE).read_text())["interrupted"] == []
    assert SweepFile.read(tmp_path) == done
    # A file that never recorded its trials counts its tune block's samples.
    assert SweepFile(name="x", base={}, tune={"num_samples": 6}).planned_trials == 6


@pytest.mark.parametrize("content,says", [
    ({"name": "x", "version": VERSION + 1, "base": {}}, f"version {VERSION + 1}; this dps_tune reads versions up to"),
    ({"name": "x", "version": "1", "base": {}}, "not a version number"),
    ({"name": "x"}, "incomplete (no base config)"),
    ({"name": "x", "base": {}, "tune": ["id_val_f1"]}, "incomplete (no base config)"),
])
def test_a_file_this_version_cannot_read_is_one_line_naming_the_experiment(tmp_path, content, says):
    (tmp_path / SWEEP_FILE).write_text(json.dumps(content))
    with pytest.raises(UserError, match=f"experiment 'the exp': {SWEEP_FILE} .*{re.escape(says)}"):
        SweepFile.read(tmp_path, "the exp")


def test_a_folder_without_the_file_is_none_or_not_an_experiment(tmp_path):
    assert SweepFile.read(tmp_path) is None
    with pytest.raises(UserError, match="not a dps_tune experiment"):
        SweepFile.load(tmp_path)


def _with_tune(tune):
    return SweepFile(name="x", base={}, tune=tune)


@pytest.mark.parametrize("tune,given,expected", [
    # Its own objective: the tune block's, with its mode.
    ({"metric": "ood_val_f1", "mode": "min"}, (None, None), ("ood_val_f1", "min")),
    ({"metric": "train_loss"}, (None, None), ("train_loss", "min")),  # no mode: the metric's default
    ({"metric": ["id_val_f1", "train_loss"], "mode": ["max", "min"], "asha_metric": "train_loss"}, (None, None),
     ("train_loss", "min")),
    ({"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max", "max"]}, (None, None), ("objective_mean", "max")),
    # Without a tune block: the default metric with its default mode.
    (None, (None, None), ("id_val_f1", "max")),
    ({}, (None, None), ("id_val_f1", "max")),
    # A metric given takes its own default mode, not the sweep's.
    ({"metric": "ood_val_f1", "mode": "min"}, ("id_val_acc", None), ("id_val_acc", "max")),
    ({"metric": "ood_val_f1", "mode": "max"}, ("train_loss", None), ("train_loss", "min")),
    # A mode given wins, with the sweep's metric or with a metric given.
    ({"metric": "ood_val_f1", "mode": "max"}, (None, "min"), ("ood_val_f1", "min")),
    (None, (None, "min"), ("id_val_f1", "min")),
    ({"metric": "ood_val_f1"}, ("id_val_acc", "min"), ("id_val_acc", "min")),
])
def test_the_objective_an_experiment_is_ranked_by(tune, given, expected):
    assert _with_tune(tune).objective(*given) == expected


def test_results_bootstrap_takes_mode_without_metric(tmp_path, capsys):
    """`results --bootstrap --mode min` ranks by the sweep's metric in that mode, as `results` and `best` do."""
    exp = write_experiment(tmp_path, "exp", [("t0", {}, 2, 0.5), ("t1", {}, 2, 0.9)])
    assert cli.main(["results", str(exp), "--bootstrap", "--mode", "min"]) == 0
    out = capsys.readouterr().out
    assert "best on id_val_f1 (min)" in out, out
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["t0"], ["t1"])]
    assert rows == ["t0", "t1"], out  # the worse trial first
