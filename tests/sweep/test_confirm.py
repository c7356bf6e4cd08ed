"""Answers with error bars, through a real local Ray: a two-objective sweep, confirmation seeds, reproducibility."""

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from dps_tune.sweep import confirm, results
from support.cli import cli_argv, kill_after_first_checkpoint_deletion, run_cli
from support.experiments import restore_points_left, write_experiment
from support.worlds import SWEEP_WORLD, tiny_raw

pytestmark = pytest.mark.slow


def write_space(tmp, name, tune, search=None, **overrides):
    raw = tiny_raw(**{"data.synthetic": SWEEP_WORLD, "data.batch_size": 16, "optim.epochs": 2, "optim.lr": 1e-3,
                      **overrides})
    raw["search"] = search or {"lr": {"loguniform": [5e-4, 3e-3]}, "algorithm": {"choice": ["ce", "flyp"]}}
    raw["tune"] = {"num_samples": 2, "max_concurrent_trials": 2, "grace_period": 2, "keep_checkpoints": 1,
                   "seed": 3, **tune}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def two_objective(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mo")
    space = write_space(tmp, "mo", {"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max", "max"],
                                    "num_samples": 3})
    proc = run_cli("sweep", space, "--storage", tmp / "runs", "--name", "mo", "--no-dashboard")
    return tmp / "runs" / "mo", proc


def test_a_two_objective_sweep_has_a_two_direction_study_and_a_pareto_view(two_objective, tmp_path):
    exp, proc = two_objective
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert len(study.trials) == 3 and all(t.values is None or len(t.values) == 2 for t in study.trials)
    # ASHA and the checkpoint ranking ran on the mean of the objectives, reported with every result
    for t in results.load_trials(exp):
        for h in t.history:
            assert h["objective_mean"] == pytest.approx((h["id_val_f1"] + h["ood_val_f1"]) / 2)
    out = run_cli("results", exp, "--pareto").stdout
    assert "non-dominated trials on id_val_f1 (max), ood_val_f1 (max)" in out
    front = results.pareto_table(exp)
    table = results.results_table(exp)
    for _, row in table.iterrows():  # every trial off the front is beaten on both by one on it
        if row["trial_id"] not in set(front["trial_id"]):
            assert any((f["id_val_f1"] >= row["id_val_f1"]) and (f["ood_val_f1"] >= row["ood_val_f1"])
                       for _, f in front.iterrows())
    # best and the ensembles still select on one metric named on the command line
    assert "best by ood_val_f1" in run_cli("best", exp, "--metric", "ood_val_f1").stdout
    run_cli("report", exp, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert 'id="plot-pareto"' in page and "95% CI" in page
    boot = run_cli("results", exp, "--bootstrap", "--resamples", "200").stdout
    assert "ood_test_acc 95% CI" in boot and "[" in boot


def test_confirm_retrains_each_method_with_fresh_seeds_and_pairs_them(two_objective, tmp_path):
    exp, _ = two_objective
    proc = run_cli("confirm", exp, "--seeds", "2", "--select", "id_val_f1", "--storage", tmp_path, "--name", "conf",
                   "--no-dashboard")
    conf = tmp_path / "conf"
    summary = json.loads((conf / "confirm.json").read_text())
    methods = set(summary["methods"]) - {"zero-shot"}
    assert methods <= {"ce", "flyp"} and methods and "zero-shot" in summary["methods"]
    for method in methods:
        row = summary["methods"][method]
        assert row["seeds"] == [1, 2]
        r = row["ood_test_acc"]
        assert r["low"] <= r["mean"] <= r["high"] and r["n"] == 2
    table = results.results_table(conf)
    assert len(table) == 2 * len(methods) and set(table["status"]) == {"completed"}
    assert sorted(table["seed"]) == sorted([1, 2] * len(methods))
    if methods == {"ce", "flyp"}:
        pair = next(p for p in summary["pairs"] if p["metric"] == "ood_test_acc")
        by = {(r["algorithm"], r["seed"]): r["ood_test_acc"] for _, r in table.iterrows()}
        diffs = [by[("flyp", s)] - by[("ce", s)] for s in (1, 2)]
        assert pair["a"] == "flyp" and pair["b"] == "ce" and pair["seeds"] == [1, 2]
        assert pair["mean"] == pytest.approx(sum(diffs) / 2)
        assert "Holm-adjusted over the family" in proc.stdout
    # A WiSE-FT mix of each confirmed seed: at alpha 1 it is the seed's own model, image for image.
    for method in methods:
        mix, fine_tuned, zero_shot = confirm.wise_mix_sides(conf, method, 1.0)
        assert mix.shape == fine_tuned.shape == (2, zero_shot.shape[1]) and zero_shot.shape[0] == 1
        assert np.array_equal(mix, fine_tuned)
    assert confirm.wise_mix_sides(conf, "dps (top)", 0.5) is None  # no such method confirmed
    # an experiment like any other
    run_cli("best", conf, "--export", tmp_path / "best")
    run_cli("report", conf, "--out", tmp_path / "conf.html")


def test_a_sweep_with_the_same_seed_gives_the_same_values_and_metrics(two_objective, tmp_path):
    """The module's two-objective sweep, run again from its own search-space file: the same searched values
    (method and learning rate), and the same figures, trial for trial."""
    exp, _ = two_objective
    run_cli("sweep", exp.parent.parent / "mo.yaml", "--storage", tmp_path / "runs", "--name", "mo",
            "--no-dashboard")
    runs = []
    for where in (exp, tmp_path / "runs" / "mo"):
        trials = results.load_trials(where)
        runs.append(sorted((t.param("algorithm"), t.param("optim.lr"),
                            tuple(sorted((k, v) for k, v in t.last.items() if k.endswith(("_acc", "_f1")))))
                           for t in trials))
    assert len(runs[0]) == 3 and runs[0] == runs[1]


@pytest.mark.parametrize("args,message", [
    (["--seeds", "1"], "--seeds 1: at least 2"),
    (["--select", "id_test_acc"], "a test split never selects"),
])
def test_bad_confirm_input_is_one_line(two_objective, tmp_path, args, message):
    exp, _ = two_objective
    proc = run_cli("confirm", exp, *args, "--storage", tmp_path, "--name", "x", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_confirm_refuses_an_experiment_nobody_has_reported_in(tmp_path):
    exp = tmp_path / "empty"
    exp.mkdir()
    (exp / "dps_tune_sweep.json").write_text(json.dumps({"name": "empty", "base": tiny_raw(), "tune": {}}))
    trial = exp / "trainable_0"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    with pytest.raises(Exception, match="no trial has reported yet"):
        confirm.select_variants([exp], "id_val_f1")


def test_a_killed_confirmation_is_finished_by_resume_without_redoing_training(two_objective, tmp_path):
    """SIGKILL of `confirm` (the driver and its Ray) right after its first checkpoint deletion; `resume` finishes
    it and writes its summary."""
    exp, _ = two_objective
    conf = tmp_path / "conf"
    # Three epochs, a checkpoint at each: every trial deletes one (keep_checkpoints 1 keeps the best and the latest).
    kill_after_first_checkpoint_deletion("confirm", exp, "--seeds", "3", "--storage", tmp_path, "--name", "conf",
                                         "--no-dashboard", "--set", "tune.resume_every=1", "--set", "epochs=3")
    assert not (conf / "confirm.json").exists()
    saved = restore_points_left(conf)

    again = run_cli("resume", conf, "--no-dashboard")
    assert "Holm-adjusted" in again.stdout or "seeds" in again.stdout, again.stdout[-2000:]
    summary = json.loads((conf / "confirm.json").read_text())
    assert summary["methods"] and summary["selected"]
    trained = {m: row for m, row in summary["methods"].items() if m != "zero-shot"}
    for row in trained.values():
        assert row["seeds"] == [1, 2, 3]
    table = results.results_table(conf)
    assert set(table["status"]) == {"completed"} and len(table) == 3 * len(trained)
    for trial in results.load_trials(conf):
        raw = [json.loads(line)["step"] for line in (trial.path / "result.json").read_text().splitlines()
               if line.strip()]
        for step in raw:
            if step <= saved.get(trial.path.name, 0):  # trained before the kill: reported once, not redone
                assert raw.count(step) == 1, (trial.trial_id, raw)


def test_a_confirmation_killed_after_a_trial_s_last_report_ends_that_trial_without_training_it_again(
        two_objective, tmp_path):
    """A seed's trial has reported its last epoch (one epoch here; its checkpoint holds weights only: nothing
    follows it to resume) and Ray's saved state names that checkpoint, but the trial has not ended when the
    driver and its Ray are SIGKILLed. `resume` ends that trial on its report, without training it again."""
    import os
    import signal
    import subprocess
    import time

    from dps_tune.sweep import ray_tune

    exp, _ = two_objective
    conf, held = tmp_path / "conf", tmp_path / "held"
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(cli_argv("confirm", exp, "--seeds", "2", "--select", "id_val_f1", "--storage",
                                          tmp_path, "--name", "conf", "--no-dashboard", "--set", "epochs=1"),
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                 env={**os.environ, ray_tune.HOLD_AT_END_ENV: str(held)})
    def held_at_end() -> list[str]:  # the trials Ray's saved state names RUNNING on their last epoch's checkpoint
        points = ray_tune.restore_points(str(conf)) if conf.is_dir() else {}
        return [t for t, (status, name) in points.items() if status == "RUNNING" and name
                and json.loads(next(conf.glob(f"*_{t}_*/{name}/metrics.json")).read_text())["epoch"] == 1]

    try:
        deadline = time.time() + 900
        while not held_at_end() and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started, as a lost machine takes them
        first.wait(timeout=60)
    at_end = held_at_end()  # as the kill left it: what `resume` restores
    assert at_end, f"no trial held at its last epoch: {(tmp_path / 'first.err').read_text()[-3000:]}"
    assert len(list(held.glob("*.held"))) >= len(at_end)
    saved = restore_points_left(conf)

    # The trials' own lines, read from their log files in a Ray temporary folder of this test's own. Ray also
    # forwards them to the terminal, but not always before the driver ends: seen under a loaded suite, both
    # lines of trials that end at once were missing from the driver's stderr.
    import shutil
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay short
    try:
        again = run_cli("resume", conf, "--no-dashboard", env={"RAY_TMPDIR": str(ray_tmp)})
        logged = sum(f.read_text(errors="replace").count("had trained to its last epoch (1)")
                     for f in ray_tmp.glob("ray/session_2*/logs/worker-*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert logged == len(at_end), again.stderr[-3000:]
    summary = json.loads((conf / confirm.CONFIRM_JSON).read_text())
    trained = set(summary["methods"]) - {"zero-shot"}
    assert trained and all(summary["methods"][m]["seeds"] == [1, 2] for m in trained)
    table = results.results_table(conf)
    assert set(table["status"]) == {"completed"} and len(table) == 2 * len(trained), table
    for trial in results.load_trials(conf):
        raw = [json.loads(line)["step"] for line in (trial.path / "result.json").read_text().splitlines()
               if line.strip()]
        if trial.trial_id in at_end:  # its one epoch, reported before the kill and never again
            assert len(raw) == 1, (trial.trial_id, raw)
        for step in raw:  # any other: what Ray's saved state knew of is not redone (a report it missed may be)
            if step <= saved.get(trial.path.name, 0):
                assert raw.count(step) == 1, (trial.trial_id, raw)


def test_ctrl_c_pauses_a_confirmation_that_resume_finishes(two_objective, tmp_path):
    """Ctrl-C (SIGINT to `confirm`'s process group, as a terminal sends it) after its first checkpoint: one block
    naming the resume command, exit 130; `resume` then trains every (method, seed) once, each interrupted trial
    from its checkpoint, and writes the confirmation's summary."""
    import os
    import signal
    import subprocess
    import time

    from dps_tune.sweep import ray_tune

    exp, _ = two_objective
    conf = tmp_path / "conf"
    proc = subprocess.Popen(cli_argv("confirm", exp, "--seeds", "2", "--select", "id_val_f1", "--storage", tmp_path,
                                     "--name", "conf", "--no-dashboard", "--set", "tune.resume_every=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list(conf.glob("*/checkpoint_*/metrics.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, f"the confirmation ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
    assert list(conf.glob("*/checkpoint_*/metrics.json")), "no checkpoint in 10 minutes"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    # Lines forwarded from the trials' worker processes may hold Ray's own SIGTERM noise; dps-tune's do not.
    own = "\n".join(line for line in err.splitlines() if "(trainable pid=" not in line)
    assert "Traceback" not in own and "Tuner.restore" not in err, err[-3000:]
    assert "saving the confirmation run" in err, err[-3000:]
    start = err.index("dps-tune: confirmation run interrupted")
    block = err[start:].strip().splitlines()
    assert len(block) == 2 and "trial(s) finished" in block[0] and "to go" in block[0], block
    assert int(block[0].split(", ")[-1].split(" to go")[0]) > 0, block
    assert block[1].strip().endswith(f"resume {conf}"), block
    assert "experiment:" not in out and not (conf / confirm.CONFIRM_JSON).exists()  # no summary of a finished run
    assert json.loads((conf / "dps_tune_sweep.json").read_text())["status"] == "interrupted"
    assert "interrupted" in set(results.results_table(conf)["status"])
    to_resume = [t for t, (status, name) in ray_tune.restore_points(str(conf)).items()
                 if name is not None and status != "TERMINATED"]

    again = run_cli("resume", conf, "--no-dashboard")
    assert again.stderr.count("resumes from epoch 1") == len(to_resume), again.stderr[-3000:]
    assert "mean [95% CI]" in again.stdout and "(confirm.json, confirm.csv;" in again.stdout, again.stdout[-2000:]
    summary = json.loads((conf / confirm.CONFIRM_JSON).read_text())
    trained = set(summary["methods"]) - {"zero-shot"}
    assert trained and "zero-shot" in summary["methods"] and summary["pairs"]
    assert all(summary["methods"][m]["seeds"] == [1, 2] for m in trained), summary["methods"]
    assert summary["selected"] == json.loads((conf / "dps_tune_sweep.json").read_text())["confirm"]["selected"]
    assert (conf / confirm.CONFIRM_CSV).is_file()
    table = results.results_table(conf)
    assert set(table["status"]) == {"completed"}, table
    assert sorted(zip(table["algorithm"], table["seed"])) == sorted((m, s) for m in trained for s in (1, 2))
    for trial in results.load_trials(conf):  # no hole in any trial's reported history
        assert [h["epoch"] for h in trial.history] == [1.0, 2.0], (trial.trial_id, trial.history)
    run_cli("best", conf, "--export", tmp_path / "best")
    run_cli("report", conf, "--out", tmp_path / "conf.html")


def test_confirm_runs_the_controls_at_dps_selected_configuration_and_seeds(tmp_path):
    """DPS (top)'s winner is retrained with random, bottom and masking 1.0 at its own lr, wd, masking and seeds."""
    import torch
    from safetensors.torch import save_file

    from dps_tune import models

    theta0 = models.pretrained_state_dict("tiny-vit", "none", seed=0)
    g = torch.Generator().manual_seed(0)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}, str(ref))
    dps = {"algorithm": "dps", "dps.reference": str(ref), "optim.epochs": 1, "dps.quota": "per_tensor"}
    exp = write_experiment(tmp_path, "dps", [
        ("top_a", {**dps, "dps.masking": 0.3, "optim.lr": 2e-3, "optim.wd": 0.05}, 1, 0.9),  # the selected one
        ("top_b", {**dps, "dps.masking": 0.6, "optim.lr": 1e-3}, 1, 0.5),
        # a random arm tuned on its own scores higher: its configuration must not be what the controls use
        ("rand", {**dps, "dps.suppress": "random", "dps.masking": 0.8, "optim.lr": 5e-4}, 1, 1.5),
    ])
    proc = run_cli("confirm", exp, "--seeds", "2", "--storage", tmp_path, "--name", "conf", "--no-dashboard")
    conf = tmp_path / "conf"
    trials = results.load_trials(conf)
    configs = {}
    for t in trials:
        cfg = json.loads((t.path / "dps_tune_config.json").read_text())
        configs[(results.method_name(cfg), cfg["seed"])] = cfg
    methods = {"dps (top)", "dps (random)", "dps (bottom)", "dps (masking 1.0)"}
    assert set(configs) == {(m, s) for m in methods for s in (1, 2)}
    for (method, seed), cfg in configs.items():
        assert (cfg["optim"]["lr"], cfg["optim"]["wd"], cfg["dps"]["quota"]) == (2e-3, 0.05, "per_tensor"), method
        assert cfg["dps"]["reference"] == str(ref)
        assert cfg["dps"]["masking"] == (1.0 if method == "dps (masking 1.0)" else 0.3)
        assert cfg["dps"]["suppress"] == {"dps (random)": "random", "dps (bottom)": "bottom"}.get(method, "top")
    # every trial reported what it held: the matched controls as many parameters as top, masking 1.0 all rows
    last = {(results.method_name(t.config), t.param("seed")): t.last for t in trials}
    for seed in (1, 2):
        held = {m: last[(m, seed)]["dps_params_held"] for m in methods}
        assert held["dps (top)"] == held["dps (random)"] == held["dps (bottom)"] < held["dps (masking 1.0)"]
        assert last[("dps (masking 1.0)", seed)]["dps_rows_held"] == last[("dps (masking 1.0)", seed)]["dps_rows_ranked"]
    summary = json.loads((conf / "confirm.json").read_text())
    assert set(summary["methods"]) == methods | {"zero-shot"}
    family = summary["pairs"]
    assert {(p["a"], p["b"]) for p in family} == {("dps (top)", "dps (random)"), ("dps (top)", "dps (bottom)"),
                                                   ("dps (top)", "dps (masking 1.0)")} | {
        (m, "zero-shot") for m in methods}
    assert all(p["family"] == len(family) == 14 and p["adjusted_p"] >= p["p"] for p in family)
    assert "Holm-adjusted over the family of 14" in proc.stdout and "(2 seeds)" in proc.stdout
    assert "control at dps (top)'s configuration" in proc.stdout
