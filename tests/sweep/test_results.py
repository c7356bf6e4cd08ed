"""dps_tune.sweep.results on small experiment directories written here, in the layout a sweep leaves: no Ray.

The layout, as a finished sweep holds it: ``dps_tune_sweep.json``; per trial
``params.json`` (the searched values), ``result.json`` (one JSON line per report, Ray's
keys beside the trial's metrics) and ``checkpoint_NNNNNN/`` with ``model.safetensors``,
``config.json``, ``metrics.json`` and, since 0.2, ``predictions.safetensors``. A report
holds the validation splits; the test splits of a kept checkpoint are in its
``metrics.json`` only.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dps_tune.checkpoint import write_predictions
from dps_tune.errors import UserError
from dps_tune.sweep import results
from dps_tune.sweep.sweep_file import SWEEP_FILE, SweepFile
from support.experiments import write_experiment, write_wise_output

DPS = {"algorithm": "dps", "dps.reference": "ce_best"}


def edit_meta(exp: Path, **changes) -> None:
    path = exp / SWEEP_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tune(exp: Path, **changes) -> None:
    meta = json.loads((exp / SWEEP_FILE).read_text())
    edit_meta(exp, tune={**meta["tune"], **changes})


def trial_dir(exp: Path, trial_id: str) -> Path:
    (found,) = exp.glob(f"trainable_{trial_id}_*")
    return found


def rows_of(tdir: Path) -> list[dict]:
    return [json.loads(line) for line in (tdir / "result.json").read_text().splitlines() if line.strip()]


def write_rows(tdir: Path, rows: list[dict]) -> None:
    (tdir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def add_checkpoint(tdir: Path, name: str, metrics: dict, weights: str = "model.safetensors") -> Path:
    """A kept checkpoint beside the trial's first one: its config, ``metrics``, and an empty weights file."""
    ckpt = tdir / name
    ckpt.mkdir()
    shutil.copy(tdir / "checkpoint_000000" / "config.json", ckpt / "config.json")
    (ckpt / "metrics.json").write_text(json.dumps(metrics))
    (ckpt / weights).write_bytes(b"")
    return ckpt


# ------------------------------------------------------------------ trials


def test_trials_are_read_in_trial_id_order_with_the_base_config_under_their_params(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("b2", {"optim.lr": 2e-3}, 4, 0.5), ("a1", {"optim.lr": 1e-3}, 2, 0.9)])
    # Ray names a trial's directory after the trainable: the order of the names is not the trials' order.
    trial_dir(exp, "b2").rename(exp / "ImplicitFunc_b2_00000")
    (exp / "driver_artifacts").mkdir()  # no params.json: not a trial
    a1, b2 = results.load_trials(exp)
    assert (a1.trial_id, b2.trial_id) == ("a1", "b2") and a1.path == trial_dir(exp, "a1")
    assert b2.path == exp / "ImplicitFunc_b2_00000"
    assert a1.param("optim.lr") == 1e-3 and b2.param("optim.lr") == 2e-3
    assert a1.param("optim.wd") == 0.1 and a1.param("model") == "tiny-vit"  # the base config's
    assert a1.param("optim.nothing") is None and a1.param("model.deeper") is None
    assert [h["step"] for h in a1.history] == [4, 8] and a1.last["epoch"] == 2.0
    assert [h["epoch"] for h in b2.history] == [1.0, 2.0, 3.0, 4.0]
    assert not a1.errored and not a1.interrupted


def test_a_cut_line_is_skipped_and_a_step_reported_again_keeps_its_newest_report(tmp_path):
    """A killed driver cuts its last line short; the resumed trial reports, after it, a step it reported before."""
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 3, 0.5)])
    tdir = trial_dir(exp, "t1")
    rows = rows_of(tdir)
    again = {**rows[1], "id_val_acc": 0.99}
    text = (tdir / "result.json").read_text() + json.dumps(rows[2])[:40] + "\n" + json.dumps(again) + "\n"
    (tdir / "result.json").write_text(text)
    (trial,) = results.load_trials(exp)
    assert [h["step"] for h in trial.history] == [4, 8, 12]
    assert trial.history[1]["id_val_acc"] == 0.99


def test_errored_interrupted_and_report_less_trials(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("e1", {}, 2, 0.5), ("i1", {}, 2, 0.5), ("n1", {}, 0, 0.5)])
    (trial_dir(exp, "e1") / "error.txt").write_text("RuntimeError: boom")
    edit_meta(exp, interrupted=["i1"])
    by_id = {t.trial_id: t for t in results.load_trials(exp)}
    assert by_id["e1"].errored and not by_id["e1"].interrupted
    assert by_id["i1"].interrupted and not by_id["i1"].errored
    silent = by_id["trainable_n1_00002"]  # no report yet: named after its directory
    assert silent.history == [] and silent.last == {} and not silent.interrupted


def test_a_sweep_without_trials_is_one_error(tmp_path):
    exp = write_experiment(tmp_path, "exp", [])
    with pytest.raises(UserError, match="no dps_tune trials"):
        results.load_trials(exp)


def test_a_report_gains_the_test_figures_of_its_kept_checkpoint(tmp_path):
    """As a sweep leaves them: the report has the validation splits, the checkpoint's metrics.json the test splits."""
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 3, 0.5)])
    tdir = trial_dir(exp, "t1")
    write_rows(tdir, [{k: v for k, v in r.items() if "_test_" not in k} for r in rows_of(tdir)])
    kept = json.loads((tdir / "checkpoint_000000" / "metrics.json").read_text())
    assert kept["step"] == 12 and kept["id_test_acc"] > 0
    # what the report already holds stays the report's; what is not a finite number is not added
    (tdir / "checkpoint_000000" / "metrics.json").write_text(json.dumps(
        {**kept, "id_val_acc": -1.0, "ood_test_f1": float("nan"), "note": "text"}))
    (trial,) = results.load_trials(exp)
    last = trial.history[-1]
    assert last["id_test_acc"] == kept["id_test_acc"] and last["ood_test_acc"] == kept["ood_test_acc"]
    assert last["id_val_acc"] == rows_of(tdir)[-1]["id_val_acc"]
    assert "ood_test_f1" not in last and "note" not in last
    assert all("id_test_acc" not in h for h in trial.history[:-1])  # no checkpoint at those steps


def test_a_confirmation_trial_s_variant_is_unpacked_into_its_config(tmp_path):
    """`confirm` searches ``seed`` and a ``variant`` dict (the selected trial's params)."""
    assert results.flat_params({"seed": 1, "variant": {"optim.lr": 2e-3, "algorithm": "flyp"}}) == {
        "optim.lr": 2e-3, "algorithm": "flyp", "seed": 1}
    assert results.flat_params({"seed": 2, "variant": {}}) == {"seed": 2}
    assert results.flat_params({"optim.lr": 1e-3}) == {"optim.lr": 1e-3}
    exp = write_experiment(tmp_path, "conf", [("c1", {}, 2, 0.5)])
    (trial_dir(exp, "c1") / "params.json").write_text(json.dumps(
        {"seed": 3, "variant": {"optim.lr": 2e-3, "algorithm": "flyp"}}))
    (trial,) = results.load_trials(exp)
    assert (trial.param("seed"), trial.param("optim.lr"), trial.param("algorithm")) == (3, 2e-3, "flyp")


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_are_the_complete_ones_with_their_metrics(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 2, 0.5), ("t2", {}, 2, 0.7)])
    t1 = trial_dir(exp, "t1")
    mirror = add_checkpoint(t1, "checkpoint_000001", {"step": 8}, weights="model.safetensors.remote")
    add_checkpoint(t1, ".checkpoint_000002.tmp", {"step": 12})  # being written
    (t1 / "checkpoint_000003").mkdir()  # metrics, no weights: not a model
    (t1 / "checkpoint_000003" / "metrics.json").write_text(json.dumps({"step": 16}))
    add_checkpoint(t1, "checkpoint_000004", {}).joinpath("metrics.json").write_text('{"step": 2')  # cut short
    found = results.checkpoints(exp)
    assert [p for p, _ in found] == [t1 / "checkpoint_000000", mirror, trial_dir(exp, "t2") / "checkpoint_000000"]
    assert found[1][1] == {"step": 8} and found[0][1]["step"] == 8 and "id_val_f1" in found[0][1]
    assert [p for p, _ in results.checkpoints(t1)] == [t1 / "checkpoint_000000", mirror]  # one trial's
    with pytest.raises(UserError, match="no such directory"):
        results.checkpoints(tmp_path / "nowhere")


def test_checkpoint_json_reads_metrics_or_config_and_names_a_damaged_one(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("t1", {"optim.lr": 2e-3}, 2, 0.5)])
    ckpt = trial_dir(exp, "t1") / "checkpoint_000000"
    assert results.checkpoint_json(ckpt)["step"] == 8
    assert results.checkpoint_json(ckpt, "config.json")["optim"]["lr"] == 2e-3
    (ckpt / "metrics.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="checkpoint") as err:
        results.checkpoint_json(ckpt)
    assert str(ckpt) in str(err.value)


@pytest.fixture
def peaked(tmp_path) -> Path:
    """``peak``'s best kept checkpoint is the best of all, but its last report is the worst; ``steady`` ends best."""
    exp = write_experiment(tmp_path, "exp", [("peak", {}, 4, 1.0, {"peak": 2}), ("steady", {}, 4, 0.3),
                                             ("low", {}, 4, 0.1)])
    steady = trial_dir(exp, "steady")
    add_checkpoint(steady, "checkpoint_000001", {k: v for k, v in rows_of(steady)[-1].items() if k != "config"})
    return exp


def test_the_best_checkpoint_over_every_kept_one_or_of_the_trial_best_at_its_last_report(peaked):
    best = results.best_checkpoint(peaked, "id_val_f1")
    assert best == trial_dir(peaked, "peak") / "checkpoint_000000"
    assert results.checkpoint_json(best)["epoch"] == 2.0
    assert results.best_checkpoint(peaked, "id_val_f1", mode="min") == trial_dir(peaked, "low") / "checkpoint_000000"
    # by last report: the steady trial, and its newest kept checkpoint
    assert results.best_checkpoint(peaked, "id_val_f1", scope="last") == \
        trial_dir(peaked, "steady") / "checkpoint_000001"


def test_best_checkpoint_says_why_there_is_none(peaked):
    with pytest.raises(UserError, match="no checkpoint reports 'train_loss_x'"):
        results.best_checkpoint(peaked, "train_loss_x")
    with pytest.raises(UserError, match="no trial reports 'train_loss_x'"):
        results.best_checkpoint(peaked, "train_loss_x", scope="last")
    for ckpt in peaked.glob("*/checkpoint_*"):
        (ckpt / "metrics.json").write_text('{"id_val_f1": 0.')  # all cut short
    with pytest.raises(UserError, match="4 checkpoint\\(s\\) have an unreadable metrics.json"):
        results.best_checkpoint(peaked, "id_val_f1")
    for ckpt in trial_dir(peaked, "steady").glob("checkpoint_*"):
        shutil.rmtree(ckpt)
    with pytest.raises(UserError, match="trial steady: no checkpoint was kept"):
        results.best_checkpoint(peaked, "id_val_f1", scope="last")


# ------------------------------------------------------------------ the experiment


def test_the_sweep_file_is_none_without_the_file_and_an_error_when_it_is_damaged(tmp_path):
    assert SweepFile.read(tmp_path) is None
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 1, 0.5)])
    sweep = SweepFile.read(exp)
    assert sweep.name == "exp" and sweep.tune["metric"] == "id_val_f1" and sweep.base["model"] == "tiny-vit"
    (exp / SWEEP_FILE).write_text('{"name": "ex')
    with pytest.raises(UserError, match="experiment"):
        SweepFile.read(exp)


def test_open_sweep_refuses_whatever_is_not_one_in_one_line(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 1, 0.5)])
    folder, sweep = results.open_sweep(str(exp))
    assert folder == exp and sweep.name == "exp" and sweep.max_t == 4
    (tmp_path / "file").write_text("x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "baseless").mkdir()
    (tmp_path / "baseless" / SWEEP_FILE).write_text(json.dumps({"name": "b", "tune": {}}))
    (tmp_path / "bad_tune").mkdir()
    (tmp_path / "bad_tune" / SWEEP_FILE).write_text(json.dumps({"name": "b", "base": {}, "tune": []}))
    for where, says in [("nowhere", "no such directory"), ("file", "a file, not an experiment directory"),
                        ("plain", "not a dps_tune experiment"), ("baseless", "is incomplete"),
                        ("bad_tune", "is incomplete")]:
        with pytest.raises(UserError, match=says) as err:
            results.open_sweep(tmp_path / where)
        assert str(tmp_path / where) in str(err.value) and "\n" not in str(err.value)


def test_a_sweep_has_ended_when_it_finished_or_was_interrupted(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 1, 0.5)])
    sweep = SweepFile.read(exp)
    assert dataclasses.replace(sweep, status="finished").ended and dataclasses.replace(sweep, status="interrupted").ended
    assert not dataclasses.replace(sweep, status="running").ended and not dataclasses.replace(sweep, status=None).ended


@pytest.mark.parametrize("epoch,max_t,errored,interrupted,finished,status", [
    (4.0, None, False, False, True, "completed"),
    (4.0, None, True, False, True, "completed"),  # done before it failed
    (2.0, 2, False, False, False, "completed"),  # the sweep's max_t caps the epochs
    (2.0, 0, False, False, True, "early-stopped"),  # max_t 0: no cap
    (2.0, None, False, True, True, "interrupted"),
    (2.0, None, True, False, True, "error"),
    (2.0, None, True, False, False, "running"),  # Ray may retry it
    (2.0, None, False, False, True, "early-stopped"),
    (2.0, None, False, False, False, "running"),
])
def test_trial_status(epoch, max_t, errored, interrupted, finished, status):
    trial = results.Trial("t", Path("t"), {"optim": {"epochs": 4}}, [{"epoch": 1.0}, {"epoch": epoch}],
                          errored=errored, interrupted=interrupted)
    assert results.trial_status(trial, max_t, finished) == status


# ------------------------------------------------------------------ tables


@pytest.fixture
def mixed(tmp_path) -> Path:
    return write_experiment(tmp_path, "mixed", [
        ("ce1", {"algorithm": "ce", "optim.lr": 1e-3}, 4, 0.6),
        ("ce2", {"algorithm": "ce", "optim.lr": 3e-4}, 2, 0.9),
        ("dp1", {**DPS, "dps.masking": 0.9, "dps.suppress": "random"}, 4, 0.8),
        ("fl1", {"algorithm": "flyp", "optim.lr": 2e-3}, 4, 0.4, {"shift": {"ood_test": 0.3}}),
    ])


def test_results_table_is_one_row_a_trial_sorted_by_the_sweep_s_objective(mixed):
    table = results.results_table(mixed)
    assert list(table["trial_id"]) == ["dp1", "ce1", "ce2", "fl1"]  # by id_val_f1, max
    assert list(table["id_val_f1"]) == sorted(table["id_val_f1"], reverse=True)
    row = table.set_index("trial_id")
    assert row.loc["ce1", "lr"] == 1e-3 and row.loc["ce1", "algorithm"] == "ce" and row.loc["ce1", "wd"] == 0.1
    assert row.loc["dp1", "masking"] == 0.9 and row.loc["dp1", "suppress"] == "random"
    assert pd.isna(row.loc["ce1", "masking"]) and pd.isna(row.loc["ce1", "suppress"])  # they mean nothing to CE
    assert row.loc["dp1", "params_held"] == 0.95 and pd.isna(row.loc["ce1", "params_held"])
    assert row.loc["ce2", "epochs"] == 2.0 and row.loc["ce1", "epochs"] == 4.0
    assert row.loc["ce2", "status"] == "early-stopped" and row.loc["ce2", "early_stopped"]
    assert row.loc["ce1", "status"] == "completed" and not row.loc["ce1", "early_stopped"]
    for split in ("id_val", "id_test", "ood_val", "ood_test"):
        assert row.loc["ce1", f"{split}_acc"] == rows_of(trial_dir(mixed, "ce1"))[-1][f"{split}_acc"]
    assert "train_loss" not in table.columns and "config" not in table.columns


def test_results_table_follows_the_sweep_s_mode_or_the_metric_asked_for(mixed):
    assert list(results.results_table(mixed, "ood_test_acc")["trial_id"])[0] == "fl1"
    assert list(results.results_table(mixed, "ood_test_acc", "min")["trial_id"])[0] == "ce2"
    edit_tune(mixed, mode="min")
    assert list(results.results_table(mixed)["trial_id"]) == ["fl1", "ce2", "ce1", "dp1"]
    edit_meta(mixed, tune={})  # an older sweep file: the default metric
    assert list(results.results_table(mixed)["trial_id"]) == ["dp1", "ce1", "ce2", "fl1"]
    edit_meta(mixed, status="running")
    assert results.results_table(mixed).set_index("trial_id").loc["ce2", "status"] == "running"


@pytest.mark.parametrize("config,name", [
    ({"algorithm": "ce"}, "ce"),
    ({"algorithm": "flyp", "dps": {"masking": 1.0}}, "flyp"),
    ({"algorithm": "dps", "dps": {"masking": 0.9, "suppress": "random"}}, "dps (random)"),
    ({"algorithm": "dps", "dps": {"masking": 0.9}}, "dps (top)"),
    ({"algorithm": "dps", "dps": {"masking": 1.0, "suppress": "bottom"}}, "dps (masking 1.0)"),
])
def test_method_name(config, name):
    assert results.method_name(config) == name


def test_best_per_method_picks_each_method_s_best_kept_checkpoint_in_the_method_order(tmp_path):
    a = write_experiment(tmp_path, "a", [
        ("fl1", {"algorithm": "flyp"}, 4, 0.9),
        ("ce1", {"algorithm": "ce"}, 4, 0.4),
        ("mk1", {**DPS, "dps.masking": 1.0, "dps.suppress": "random"}, 4, 0.5),
    ])
    b = write_experiment(tmp_path, "b", [
        ("ce2", {"algorithm": "ce"}, 4, 0.7),
        ("dt1", {**DPS, "dps.masking": 0.5, "dps.suppress": "top"}, 4, 0.3),
        ("dt2", {**DPS, "dps.masking": 0.5, "dps.suppress": "top"}, 4, 0.6),
    ])
    best = results.best_per_method([a, b], "id_val_f1")
    assert [r["method"] for r in best] == ["ce", "flyp", "dps (top)", "dps (masking 1.0)"]  # results.METHOD_ORDER
    by = {r["method"]: r for r in best}
    assert (by["ce"]["trial"], by["dps (top)"]["trial"], by["flyp"]["trial"]) == ("ce2", "dt2", "fl1")
    assert by["ce"]["checkpoint"] == trial_dir(b, "ce2") / "checkpoint_000000"
    assert by["ce"]["id_test_acc"] == results.checkpoint_json(by["ce"]["checkpoint"])["id_test_acc"]
    assert results.best_per_method([a, b], "id_val_f1", mode="min")[0]["trial"] == "ce1"


def test_pareto_objectives_are_the_sweep_s_when_it_has_several(mixed):
    assert results.pareto_objectives(mixed) == (("id_val_f1", "ood_val_f1"), ("max", "max"))
    edit_tune(mixed, metric=["id_val_acc", "ood_test_f1"], mode=["max", "min"])
    assert results.pareto_objectives(mixed) == (("id_val_acc", "ood_test_f1"), ("max", "min"))


def test_the_pareto_table_is_the_trials_no_other_beats_on_every_objective(tmp_path):
    exp = write_experiment(tmp_path, "exp", [
        ("idg", {}, 4, 0.6, {"shift": {"id_val": 0.1}}),
        ("oog", {}, 4, 0.6, {"shift": {"ood_val": 0.1}}),
        ("mid", {}, 4, 0.55),  # beaten by both on both
        ("bal", {}, 4, 0.6, {"shift": {"id_val": 0.05, "ood_val": 0.05}}),
    ])
    assert set(results.pareto_table(exp)["trial_id"]) == {"idg", "oog", "bal"}
    assert set(results.pareto_table(exp, ("id_val_f1", "ood_val_f1"), ("min", "min"))["trial_id"]) == {"mid"}
    assert set(results.pareto_table(exp, ("id_val_f1",))["trial_id"]) == {"idg"}
    with pytest.raises(UserError, match="no trial reports 'dps_rows_held'"):
        results.pareto_table(exp, ("id_val_f1", "dps_rows_held"))


def test_the_bootstrap_table_gives_each_trial_s_best_checkpoint_with_intervals(tmp_path):
    exp = write_experiment(tmp_path, "exp", [("t1", {}, 4, 0.8), ("t2", {"algorithm": "flyp"}, 4, 0.5),
                                             ("t3", {}, 4, 0.3)])
    # t1 kept two checkpoints, as keep_checkpoints 2 keeps them: epoch 1 and its best, epoch 4
    t1 = trial_dir(exp, "t1")
    add_checkpoint(t1, "checkpoint_000001", results.checkpoint_json(t1 / "checkpoint_000000"))
    (t1 / "checkpoint_000000" / "metrics.json").write_text(json.dumps(
        {k: v for k, v in rows_of(t1)[0].items() if k != "config"}))
    right = {"t1/checkpoint_000000": (20, 10), "t1/checkpoint_000001": (30, 20), "t2/checkpoint_000000": (10, 36)}
    for where, (id_right, ood_right) in right.items():  # of 40 images, labels all 0: the first n predicted 0
        tid, name = where.split("/")
        preds = {split: (torch.zeros(40, dtype=torch.int32), (torch.arange(40) >= n).int()) for split, n in
                 (("id_test", id_right), ("ood_test", ood_right), ("id_val", 0))}
        write_predictions(preds, trial_dir(exp, tid) / name / "predictions.safetensors")
    table = results.bootstrap_table(exp, "id_val_f1", "max", resamples=200)
    assert list(table["trial_id"]) == ["t1", "t2", "t3"]
    row = table.set_index("trial_id")
    assert row.loc["t1", "id_test_acc"] == pytest.approx(0.75) and row.loc["t2", "ood_test_acc"] == pytest.approx(0.9)
    assert row.loc["t2", "method"] == "flyp" and row.loc["t1", "epoch"] == 4.0
    low, high = json.loads(row.loc["t1", "id_test_acc 95% CI"])
    assert low < 0.75 < high and high - low < 0.5
    assert "id_val_acc" not in table.columns  # only the test splits are resampled
    assert row.loc["t3", "note"].startswith("no predictions.safetensors") and math.isnan(row.loc["t3", "id_test_acc"])
    lowest = results.bootstrap_table(exp, "id_val_f1", "min", resamples=20)
    assert list(lowest["trial_id"]) == ["t1", "t3", "t2"]  # t1 by its epoch-1 checkpoint
    assert lowest["id_test_acc"][0] == pytest.approx(0.5) and lowest["epoch"][0] == 1.0


# ------------------------------------------------------------------ wise and soup outputs


def test_an_ensemble_output_is_known_by_its_summary_and_read_with_its_finished_rows(tmp_path):
    correct = {0.0: (np.array([1, 0, 1, 1]), np.array([0, 0, 1, 0])),
               1.0: (np.array([1, 1, 1, 1]), np.array([1, 0, 1, 0]))}
    wise = write_wise_output(tmp_path / "wise", correct)
    with (wise / results.WISE_CSV).open("a") as f:  # a row a killed run left unfinished
        f.write("ce,1,t0,/runs/ce/t0/checkpoint_000002,0.5,0.9,0.9,0\n")
    summary = results.read_ensemble(wise)
    assert results.ensemble_kind(wise) == "wise" and summary["kind"] == "wise" and summary["path"] == str(wise)
    assert [r["alpha"] for r in summary["rows"]] == [0.0, 1.0] and summary["rows"][1]["id_test_acc"] == 1.0
    assert "complete" not in summary["rows"][0] and summary["methods"]["ce"]["alpha"] == 1.0

    soup = tmp_path / "soup"
    soup.mkdir()
    (soup / results.SOUP_JSON).write_text(json.dumps({"soups": {"ce": {"ingredients": 2}}}))
    assert results.ensemble_kind(soup) == "soup"
    assert results.read_ensemble(soup) == {"soups": {"ce": {"ingredients": 2}}, "kind": "soup", "path": str(soup)}

    assert results.ensemble_kind(tmp_path) is None
    with pytest.raises(UserError, match="neither a sweep nor the output"):
        results.read_ensemble(tmp_path)
    (soup / results.SOUP_JSON).write_text('{"soups": ')
    with pytest.raises(UserError, match="unreadable"):
        results.read_ensemble(soup)
    (soup / results.SOUP_JSON).write_text("[]")
    with pytest.raises(UserError, match="not a JSON object"):
        results.read_ensemble(soup)


def test_each_wise_row_has_its_own_predictions_file():
    at = results.wise_prediction_file("/out", "/runs/a/checkpoint_000001", 0.5)
    assert at.parent == Path("/out") / results.WISE_PREDICTIONS and at.suffix == ".safetensors"
    assert results.wise_prediction_file("/out", "/runs/a/checkpoint_000001", 0.5000000000000001) == at
    others = {results.wise_prediction_file("/out", "/runs/a/checkpoint_000001", 0.25),
              results.wise_prediction_file("/out", "/runs/b/checkpoint_000001", 0.5)}
    assert at not in others and len(others) == 2


def test_the_per_image_correctness_of_a_wise_curve(tmp_path):
    correct = {0.0: (np.array([1, 0, 1, 1]), np.array([0, 0, 1, 0])),
               0.5: (np.array([1, 1, 0, 1]), np.array([1, 0, 1, 0]))}
    out = write_wise_output(tmp_path / "wise", correct)
    with (out / results.WISE_CSV).open("a") as f:  # another candidate's curve, not the one `wise` chose
        f.write("ce,2,t1,/runs/ce/t1/checkpoint_000001,0.25,0.5,0.5,1\n")
    got = results.wise_curve_correct(out, "ce")
    assert sorted(got) == [0.0, 0.5]
    for alpha, (id_c, ood_c) in correct.items():
        assert np.array_equal(got[alpha][0], id_c) and np.array_equal(got[alpha][1], ood_c)
    assert results.wise_curve_correct(out, "flyp") is None  # no such curve
    rows = results.read_ensemble(out)["rows"]
    assert results.curve_correct(out, rows, ("id_test", "id_val")) is None  # a split it did not record
    assert results.curve_correct(out, []) is None
    older = write_wise_output(tmp_path / "older", correct, with_predictions=False)  # a `wise` that recorded none
    assert results.wise_curve_correct(older, "ce") is None
