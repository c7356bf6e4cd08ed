"""Ray Tune end to end, on the CPU: real local Ray, real Optuna study, real files on disk."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import open_clip
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from dps_tune import models
from dps_tune.data import datasets as data_mod
from dps_tune.sweep import ray_tune, results
from dps_tune.checkpoint import load_checkpoint
from dps_tune.evaluate import evaluate_splits, tokenize_prompts
from support.cli import cli_argv, kill_after_first_checkpoint_deletion, run_cli
from support.experiments import restore_points_left
from support.ray_head import ray_head
from support.worlds import SWEEP_WORLD, tiny_raw

pytestmark = pytest.mark.slow


def space(tmp: Path, name: str, *, algorithm="ce", search=None, tune=None, **overrides) -> Path:
    raw = tiny_raw(algorithm=algorithm, **{"data.synthetic": SWEEP_WORLD, "data.batch_size": 16, "optim.epochs": 3,
                                           "optim.lr": 1e-3, **overrides})
    raw["search"] = search if search is not None else {"lr": {"loguniform": [3e-4, 3e-3]},
                                                       "wd": {"uniform": [0.0, 0.3]}}
    raw["tune"] = {"metric": "id_val_acc", "num_samples": 6, "max_concurrent_trials": 2, "grace_period": 1,
                   "reduction_factor": 2, "keep_checkpoints": 1, "max_failures": 1,
                   # train state at every report: the crash and resume tests below count on it
                   "resume_every": 1, **(tune or {})}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def ce_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ce")
    # As from a Linux shell without the loopback switch the tests set (1 is Ray's default there).
    proc = run_cli("sweep", space(tmp, "ce"), "--storage", tmp / "runs", "--name", "ce", "--no-dashboard",
                   env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    return tmp / "runs" / "ce", proc


def test_sweep_end_to_end(ce_sweep, tmp_path):
    exp, proc = ce_sweep
    assert "id_val acc" in proc.stdout and "ood_val acc" in proc.stdout  # Tune's progress table
    table = results.results_table(exp)
    assert len(table) == 6
    for col in ("id_val_acc", "id_val_f1", "id_test_acc", "ood_val_acc", "ood_test_acc", "ood_test_f1"):
        assert table[col].notna().all(), col
    assert (table["status"] == "early-stopped").sum() >= 1, table
    assert set(table["status"]) <= {"completed", "early-stopped"}
    # The embedded Ray served this machine alone, on loopback: every trial ran on a node at 127.0.0.1.
    rows = [json.loads(line) for f in exp.glob("*/result.json") for line in f.read_text().splitlines() if line]
    assert rows and {r["node_ip"] for r in rows} == {"127.0.0.1"}, {r["node_ip"] for r in rows}

    # the study saw ASHA's stops as pruned trials, with their learning curves
    study = optuna.load_study(study_name="ce", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(study.trials) == 6
    assert states.count(TrialState.PRUNED) == (table["status"] == "early-stopped").sum()
    assert states.count(TrialState.COMPLETE) == (table["status"] == "completed").sum()
    for t in study.trials:
        assert t.intermediate_values, t.number
        if t.state == TrialState.PRUNED:
            assert t.value is not None and len(t.intermediate_values) < 3

    # `results` on the command line, and its CSV
    out = run_cli("results", exp, "--csv", tmp_path / "r.csv").stdout
    assert "ood_test_acc" in out and "early-stopped" in out
    assert len((tmp_path / "r.csv").read_text().strip().splitlines()) == 7

    # TensorBoard event files for every trial
    assert len(list(exp.glob("*/events.out.tfevents.*"))) == 6

    # keep_checkpoints 1 keeps the best report by tune.metric, plus the latest one (what resume needs)
    for trial in results.load_trials(exp):
        kept = {json.loads(p.read_text())["step"] for p in trial.path.glob("checkpoint_*/metrics.json")}
        best = max(trial.history, key=lambda h: h["id_val_acc"])  # first of equals, as Ray ranks them
        best_steps = {h["step"] for h in trial.history if h["id_val_acc"] == best["id_val_acc"]}
        assert trial.history[-1]["step"] in kept and kept & best_steps and len(kept) <= 2, (trial.trial_id, kept)
    # every trial finished or was stopped by ASHA: none of them keeps train state
    assert list(exp.glob("*/checkpoint_*/model.safetensors")) and not list(exp.glob("*/checkpoint_*/train_state.pt"))

    # `best --export` reloads through plain open_clip and reproduces its metrics
    run_cli("best", exp, "--export", tmp_path / "best")
    recorded = json.loads((tmp_path / "best" / "metrics.json").read_text())
    # the best over every kept checkpoint of every trial, not over the trials' last results
    kept = [json.loads(p.read_text()) for p in exp.glob("*/checkpoint_*/metrics.json")]
    assert len(kept) >= 6 and recorded["id_val_acc"] == max(m["id_val_acc"] for m in kept)
    assert recorded == next(m for m in kept if m["step"] == recorded["step"] and m == recorded)
    cfg = load_checkpoint(tmp_path / "best", with_state=False).config
    model = open_clip.create_model("tiny-vit", pretrained=str(tmp_path / "best" / "model.safetensors"))
    spec = data_mod.load_dataset(cfg.data)
    prompts = tokenize_prompts(models.get_tokenizer("tiny-vit"), spec.classnames, spec.templates)
    loaders = {s: data_mod.eval_loader(r, models.eval_transform(model), batch_size=64, workers=0)
               for s, r in spec.splits.items()}
    again = evaluate_splits(model, prompts, loaders)
    for key, value in again.items():
        assert value == recorded[key], key


def test_dps_stage_ranks_once_and_an_errored_dps_sweep_resumes_with_its_ranking(ce_sweep, tmp_path):
    exp, _ = ce_sweep
    search = {"masking": {"uniform": [0.1, 0.9]}, "suppress": {"choice": ["top", "random"]}}
    path = space(tmp_path, "dps", algorithm="dps", search=search, tune={"num_samples": 3},
                 **{"dps.reference_experiment": str(exp), "dps.reference_metric": "id_val_acc",
                    "dps.ranking_cache": str(tmp_path / "rankings")})
    first = run_cli("sweep", path, "--storage", tmp_path / "runs", "--name", "dps1", "--no-dashboard")
    text = first.stdout + first.stderr
    assert text.count("DPS ranking: computed") == 1
    assert text.count("ranking cache miss") == 1  # the driver's, before any trial started
    trial_lines = [x for x in text.splitlines() if "(trainable" in x]
    assert sum("DPS: suppressing" in x for x in trial_lines) == 3  # every trial used the shared ranking...
    assert not [x for x in trial_lines if "ranking cache" in x or "tensors in" in x]  # ...and none looked it up
    assert len(list((tmp_path / "rankings").glob("*.pt"))) == 1
    table = results.results_table(tmp_path / "runs" / "dps1")
    assert len(table) == 3 and set(table["algorithm"]) == {"dps"} and table["masking"].notna().all()
    # what each trial held, in its results and in the Optuna study the dashboard shows
    assert table["params_held"].between(0, 1).all()
    assert (table["params_held"] + table["params_train"]).to_numpy() == pytest.approx([1.0] * 3)
    study = optuna.load_study(study_name="dps1", storage=f"sqlite:///{tmp_path / 'runs' / 'dps1' / 'optuna.db'}")
    held = sorted(t.user_attrs["dps_params_held_frac"] for t in study.trials)
    assert held == pytest.approx(sorted(table["params_held"]))
    assert all("dps_held_frac_token_embedding" in t.user_attrs for t in study.trials)

    # A later sweep on the same pair reuses the ranking. Its trials error out (a crash after epoch 2, no
    # retries); resume resolves the same reference and hands every trial the ranking again (a cache hit).
    path = space(tmp_path, "dpsr", algorithm="dps", search={"masking": {"uniform": [0.2, 0.8]}},
                 tune={"num_samples": 2, "grace_period": 3, "max_failures": 0},
                 **{"dps.reference_experiment": str(exp), "dps.reference_metric": "id_val_acc",
                    "dps.ranking_cache": str(tmp_path / "rankings")})
    env = {"DPS_TUNE_INJECT_CRASH_AT_EPOCH": "2", "DPS_TUNE_INJECT_CRASH_MARKER_DIR": str(tmp_path / "markers")}
    first = run_cli("sweep", path, "--storage", tmp_path / "runs", "--name", "dpsr", "--no-dashboard", env=env,
                    check=False)
    assert first.returncode == 1, first.stderr[-2000:]
    assert "DPS ranking: cache hit" in first.stderr and "DPS ranking: computed" not in first.stdout + first.stderr
    assert len(list((tmp_path / "rankings").glob("*.pt"))) == 1
    pinned = json.loads((tmp_path / "runs" / "dpsr" / "dps_tune_sweep.json").read_text())["base"]["dps"]
    assert pinned["reference"].startswith(str(exp)) and pinned["reference_experiment"] is None
    again = run_cli("resume", tmp_path / "runs" / "dpsr", "--no-dashboard", env=env)
    assert "DPS ranking: cache hit" in again.stderr
    assert sum("DPS: suppressing" in x for x in again.stderr.splitlines() + again.stdout.splitlines()) == 2
    table = results.results_table(tmp_path / "runs" / "dpsr")
    assert set(table["status"]) == {"completed"} and set(table["algorithm"]) == {"dps"}, table


def test_crashed_trial_is_retried_from_its_checkpoint(tmp_path):
    path = space(tmp_path, "crash", search={"lr": {"uniform": [1e-3, 2e-3]}},
                 tune={"num_samples": 2, "grace_period": 3, "max_failures": 1})
    env = {"DPS_TUNE_INJECT_CRASH_AT_EPOCH": "2", "DPS_TUNE_INJECT_CRASH_MARKER_DIR": str(tmp_path / "markers")}
    run_cli("sweep", path, "--storage", tmp_path / "runs", "--name", "crash", "--no-dashboard", env=env)
    assert len(list((tmp_path / "markers").glob("*.crashed"))) == 2  # both trials crashed once
    for trial in results.load_trials(tmp_path / "runs" / "crash"):
        lines = [json.loads(x) for x in (trial.path / "result.json").read_text().splitlines()]
        epochs = [x["epoch"] for x in lines]
        assert epochs == [1.0, 2.0, 3.0], epochs  # epoch 3 came after the retry, not a restart at 1
        assert (trial.path / "error.txt").exists()
    table = results.results_table(tmp_path / "runs" / "crash")
    assert set(table["status"]) == {"completed"}


def test_errored_trials_resume_from_their_train_state_and_the_economy_writes_weights_for_the_top_k_only(tmp_path):
    """Default checkpoint economy, train state every 2 epochs; each trial crashes once after epoch 2 with no
    retries left, so it ends in error; `resume` continues it from its train state."""
    path = space(tmp_path, "economy", search={"lr": {"uniform": [1e-3, 2e-3]}}, **{"optim.epochs": 4},
                 tune={"num_samples": 2, "grace_period": 4, "max_failures": 0, "resume_every": 2,
                       "keep_checkpoints": 1})
    env = {"DPS_TUNE_INJECT_CRASH_AT_EPOCH": "2", "DPS_TUNE_INJECT_CRASH_MARKER_DIR": str(tmp_path / "markers")}
    exp = tmp_path / "runs" / "economy"
    first = run_cli("sweep", path, "--storage", tmp_path / "runs", "--name", "economy", "--no-dashboard",
                    env=env, check=False)
    assert first.returncode == 1 and "2 trial(s) failed" in first.stderr, first.stderr[-2000:]
    assert set(results.results_table(exp)["status"]) == {"error"}
    for trial in results.load_trials(exp):  # errored at epoch 2: its train state of epoch 2 is kept
        states = list(trial.path.glob("checkpoint_*/train_state.pt"))
        assert len(states) == 1 and json.loads((states[0].parent / "metrics.json").read_text())["epoch"] == 2.0
    again = run_cli("resume", exp, "--no-dashboard", env=env)
    assert again.stderr.count("resumes from epoch 2.0") == 2, again.stderr[-3000:]
    table = results.results_table(exp)
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    # the study was told each trial's real outcome once, not FAIL at the first error
    study = optuna.load_study(study_name="economy", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, study.trials
    assert not list(exp.glob("*/checkpoint_*/train_state.pt"))  # finished: no train state left
    for trial in results.load_trials(exp):
        lines = [json.loads(x) for x in (trial.path / "result.json").read_text().splitlines()]
        assert [x["epoch"] for x in lines] == [1.0, 2.0, 3.0, 4.0]  # went on from epoch 2
        best = -1.0
        for line in lines:  # a checkpoint only where the report could enter the top 1, or at the end
            wrote = bool(line.get("checkpoint_dir_name"))
            assert wrote == (line["id_val_acc"] > best or line["epoch"] in (2.0, 4.0)), (trial.trial_id, lines)
            best = max(best, line["id_val_acc"])
        kept = [json.loads(p.read_text()) for p in trial.path.glob("checkpoint_*/metrics.json")]
        assert max(m["id_val_acc"] for m in kept) == max(x["id_val_acc"] for x in lines)


def test_killed_driver_resumes(tmp_path):
    """SIGKILL right after the first superseded checkpoint is deleted; `resume` finishes every trial from there."""
    path = space(tmp_path, "resume", tune={"num_samples": 4, "grace_period": 4}, **{"optim.epochs": 4})
    exp = tmp_path / "runs" / "resume"
    kill_after_first_checkpoint_deletion("sweep", path, "--storage", tmp_path / "runs", "--name", "resume",
                                         "--no-dashboard")
    assert json.loads((exp / "dps_tune_sweep.json").read_text())["status"] == "running"
    saved = restore_points_left(exp)
    assert saved
    run_cli("resume", exp, "--no-dashboard")
    table = results.results_table(exp)
    assert len(table) == 4 and table["trial_id"].is_unique
    assert set(table["status"]) == {"completed"}, table
    for trial in results.load_trials(exp):
        steps = [h["step"] for h in trial.history]
        assert steps == sorted(set(steps)) and len(steps) == 4
        # Every line the trial ever wrote, not the de-duplicated history: a step up to its
        # saved checkpoint was reported once, so the trial went on from there, not from scratch.
        raw = [json.loads(line)["step"] for line in (trial.path / "result.json").read_text().splitlines()
               if line.strip()]
        for step in raw:
            if step <= saved.get(trial.path.name, 0):
                assert raw.count(step) == 1, (trial.trial_id, raw)


def test_the_same_name_launched_twice_at_once_refuses_the_second_and_spares_the_first(tmp_path):
    """Two `dps-tune sweep --name twice` at once: the second exits 2 in one line, touching nothing; the first ends well."""
    from dps_tune.paths import cache_dir
    from dps_tune.sweep import storage

    path = space(tmp_path, "twice", tune={"num_samples": 2}, **{"optim.epochs": 2})
    runs = tmp_path / "runs"
    exp = runs / "twice"
    first = subprocess.Popen(cli_argv("sweep", path, "--storage", runs, "--name", "twice", "--no-dashboard"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = cache_dir() / "locks" / f"{storage._key(str(exp))}.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first launch never took the experiment's lock"
    # While the first is starting Ray, or already training: either way the second is refused.
    second = run_cli("sweep", path, "--storage", runs, "--name", "twice", "--no-dashboard", check=False)
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1 and str(exp) in err[0], second.stderr
    assert "another dps-tune process" in err[0] or "exists already" in err[0]
    out, errs = first.communicate(timeout=1200)
    assert first.returncode == 0, errs[-3000:]
    table = results.results_table(exp)
    assert len(table) == 2 and set(table["status"]) <= {"completed", "early-stopped"}, table
    assert json.loads((exp / "dps_tune_sweep.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("problem,message", [
    ({"search": {"nonsense": {"uniform": [0, 1]}}}, "search: unknown key 'nonsense'"),
    ({"search": {"lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
    ({"tune": {"gpus_per_trial": 1}}, "tune.gpus_per_trial = 1: the cluster has 0 GPU(s)"),
])
def test_bad_launch_is_a_one_line_error(problem, message, tmp_path):
    path = space(tmp_path, "bad", search=problem.get("search"), tune=problem.get("tune"))
    proc = run_cli("sweep", path, "--storage", tmp_path / "runs", "--no-dashboard", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("dps-tune: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_sweep_on_a_running_cluster(tmp_path):
    """--address: code reaches the cluster's workers through runtime_env, not through the driver's process."""
    import shutil

    # The driver runs a copy of the package that records, in any process started by the
    # cluster, which file it was imported from. The editable checkout the workers could also
    # reach records nothing: a record proves the workers got the driver's code via runtime_env.
    shipped, marks = tmp_path / "shipped", tmp_path / "marks"
    marks.mkdir()
    shutil.copytree(Path(__file__).resolve().parents[2] / "dps_tune", shipped / "dps_tune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (shipped / "dps_tune" / "__init__.py").open("a") as init:
        init.write("\nimport os as _os\nif _os.environ.get('DPS_TUNE_TEST_MARKS'):\n"
                   "    open(_os.path.join(_os.environ['DPS_TUNE_TEST_MARKS'], str(_os.getpid())), 'w')"
                   ".write(__file__)\n")
    # A node of this test's own (support/ray_head.py): `ray stop` would stop the other xdist worker's Ray too.
    with ray_head(env={"DPS_TUNE_TEST_MARKS": str(marks)}) as head:
        port = head["gcs"]
        path = space(tmp_path, "cluster", tune={"num_samples": 2})
        # The cluster asks for a token; with RAY_ADDRESS set and RAY_AUTH_MODE unset, Ray
        # does not send it. That is one line saying what to set, not a traceback, and no experiment.
        # (Ray retries the refused connection once a second, 20 times by default; 3 tell the same.)
        proc = run_cli("sweep", path, "--storage", tmp_path / "runs", "--name", "noauth", check=False, timeout=300,
                       env={"RAY_AUTH_MODE": None, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_NUM_REDIS_GET_RETRIES": "3"})
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("dps-tune: error:")]
        assert len(errors) == 1 and f"RAY_ADDRESS 127.0.0.1:{port}" in errors[0], proc.stderr[-3000:]
        assert "RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in proc.stderr
        assert not (tmp_path / "runs" / "noauth").exists()
        # Ray sends its token to an explicit address only when told to (RAY_AUTH_MODE=token).
        # From another directory, so the driver imports the copy and not this checkout.
        proc = run_cli("sweep", path, "--address", f"127.0.0.1:{port}", "--storage", tmp_path / "runs", "--name", "c",
                       check=False, cwd=tmp_path, env={"RAY_AUTH_MODE": "token", "PYTHONPATH": str(shipped)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        table = results.results_table(tmp_path / "runs" / "c")
        assert len(table) == 2 and table["id_val_acc"].notna().all()
        imported_from = [m.read_text() for m in marks.iterdir()]
        assert imported_from, "no cluster worker imported the driver's copy of dps_tune"
        assert all(not p.startswith(str(shipped)) for p in imported_from), imported_from  # a shipped copy


def test_ctrl_c_pauses_a_sweep_that_resume_finishes(tmp_path):
    """Ctrl-C (SIGINT to the sweep's process group, twice, as an impatient user at a terminal) after the first
    checkpoint: one block naming the resume command, exit 130; `resume` then finishes every trial once."""
    path = space(tmp_path, "pause", tune={"num_samples": 3, "grace_period": 2}, **{"optim.epochs": 2})
    exp = tmp_path / "runs" / "pause"
    proc = subprocess.Popen(cli_argv("sweep", path, "--storage", tmp_path / "runs", "--name", "pause",
                                     "--no-dashboard"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list(exp.glob("*/checkpoint_*/metrics.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before its first checkpoint"
    assert list(exp.glob("*/checkpoint_*/metrics.json")), "no checkpoint in 10 minutes"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # a second Ctrl-C while it saves
    except ProcessLookupError:
        pass
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    # dps-tune's own lines hold no traceback. Lines forwarded from the trials' worker processes may: Ray ends
    # them with SIGTERM, and its handler's SystemExit can land in a weakref callback, which Python prints.
    own = "\n".join(line for line in err.splitlines() if "(trainable pid=" not in line)
    assert "Traceback" not in own and "Tuner.restore" not in err, err[-3000:]
    assert "dps-tune: sweep interrupted" in err, err[-3000:]
    block = err[err.index("dps-tune: sweep interrupted"):].strip().splitlines()
    assert len(block) == 2 and "to go" in block[0] and "trial(s) finished" in block[0], err[-2000:]
    assert block[1].strip().endswith(f"resume {exp}"), block
    assert "experiment:" not in out  # no summary of a finished sweep
    meta = json.loads((exp / "dps_tune_sweep.json").read_text())
    assert meta["status"] == "interrupted" and meta["interrupted"], meta
    table = results.results_table(exp)
    assert "interrupted" in set(table["status"]) and "early-stopped" not in set(table["status"]), table
    assert "interrupted" in run_cli("results", exp).stdout
    study = optuna.load_study(study_name="pause", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert TrialState.FAIL not in {t.state for t in study.trials}  # nothing told finished that did not finish

    run_cli("resume", exp, "--no-dashboard")
    study = optuna.load_study(study_name="pause", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 3, study.trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials), study.trials
    table = results.results_table(exp)
    assert len(table) == 3 and set(table["status"]) <= {"completed", "early-stopped"}, table
    for trial in results.load_trials(exp):  # no hole in any trial's reported history
        epochs = [h["epoch"] for h in trial.history]
        assert epochs == [float(e) for e in range(1, len(epochs) + 1)], (trial.trial_id, epochs)
    run_cli("results", exp)
    run_cli("best", exp, "--export", tmp_path / "best")
    run_cli("report", exp, "--out", tmp_path / "r.html")


def test_a_full_storage_stops_the_sweep_in_one_line_and_resume_finishes_it(tmp_path, small_disk):
    """Two trials of two epochs on a 45 MiB tmpfs: one trial's first checkpoint (weights and train state, 41 MB)
    fits, and nothing more: not its second (13.5 MB of weights), nor the other trial's first. So the disk fills
    whether the trials overlap or, on a loaded machine, run one after the other on a reused actor. One line names
    the storage; after it grows, `resume` finishes both trials from what was whole (or from the start)."""
    disk, grow = small_disk("45m")
    path = space(tmp_path, "full", search={"lr": {"uniform": [1e-3, 2e-3]}}, **{"optim.epochs": 2},
                 tune={"num_samples": 2, "grace_period": 2, "max_failures": 0})
    exp = disk / "full"
    first = run_cli("sweep", path, "--storage", disk, "--name", "full", "--no-dashboard", check=False)
    err = first.stderr.strip().splitlines()
    assert first.returncode == 2, first.stderr[-3000:]
    assert err[-1].startswith(f"dps-tune: error: storage {exp} is full (") and "MB free of 47" in err[-1], err[-3:]
    assert err[-1].endswith(f"continue it with `dps-tune resume {exp}`"), err[-1]
    # no traceback, not even one in Ray's own format (frames, without a "Traceback" line)
    assert "Traceback" not in first.stderr and '  File "' not in first.stderr, first.stderr[-3000:]
    for error in exp.glob("*/error.txt"):  # the trials' errors name the disk
        assert "the storage is full" in error.read_text(), error.read_text()[-1500:]
    # nothing half-written is left where a reader takes it for a checkpoint
    for ckpt in exp.glob("*/checkpoint_*"):
        assert (ckpt / "metrics.json").is_file() and (ckpt / "model.safetensors").stat().st_size > 13_000_000, ckpt

    saved = restore_points_left(exp)  # each trial's newest complete train state that Ray's saved state knows
    # A trial that finished before the disk filled (trials start staggered on a loaded machine) is not run again.
    to_resume = [t for t, (status, name) in ray_tune.restore_points(str(exp)).items()
                 if name is not None and status != "TERMINATED"]

    grow("400m")
    again = run_cli("resume", exp, "--no-dashboard")
    assert again.stderr.count("resumes from epoch 1") == len(to_resume), again.stderr[-3000:]
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 2 and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    table = results.results_table(exp)
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table
    for trial in results.load_trials(exp):
        assert [h["epoch"] for h in trial.history] == [1.0, 2.0], trial.history
        raw = [json.loads(line)["step"] for line in (trial.path / "result.json").read_text().splitlines() if line]
        assert all(raw.count(step) == 1 for step in raw if step <= saved.get(trial.path.name, 0)), raw
    run_cli("results", exp)
    run_cli("best", exp, "--export", tmp_path / "best")
    run_cli("report", exp, "--out", tmp_path / "r.html")


def test_a_trial_the_study_already_holds_as_finished_keeps_its_record_and_the_sweep_goes_on(tmp_path):
    """The study reaches the storage when a trial ends; Ray's experiment state, later. A driver killed between the
    two leaves a trial the study holds as finished and Ray runs on at `resume`: its results must not fail the sweep
    (Optuna refuses to update a finished trial), and the study keeps the end it has."""
    import optuna.distributions as od

    db = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = ray_tune.PrunedOptunaSearch(space={"optim.lr": od.FloatDistribution(1e-4, 1e-2, log=True)},
                                           metric="id_val_acc", mode="max", seed=0, study_name="s", storage=db,
                                           max_t=3)
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"id_val_acc": 0.5, "training_iteration": 1, "epoch": 1.0})
    stored = optuna.load_study(study_name="s", storage=db)
    stored.tell(stored.trials[0].number, 0.7)  # its end, as the study on the storage holds it
    again = {"id_val_acc": 0.6, "training_iteration": 3, "epoch": 3.0}
    searcher.on_trial_result("t1", again)  # the rerun from its checkpoint
    searcher.on_trial_complete("t1", again)
    trial = optuna.load_study(study_name="s", storage=db).trials[0]
    assert trial.state == TrialState.COMPLETE and trial.value == 0.7 and trial.intermediate_values == {1: 0.5}
