"""`tune.loggers`: every trial a run in MLflow and in W&B, read back from what each tracker wrote.

One small sweep logs to both: MLflow to a local SQLite store, read through MLflow's own
client, and W&B in offline mode (no network), read from its run files.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dps_tune.objectives import metric_names
from support.cli import run_cli
from support.worlds import TINY_WORLD, tiny_raw

pytestmark = pytest.mark.slow

SEARCHED = ("optim.lr", "optim.wd")


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]  # ident, magic 0xBEE1, version 0
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_run(run_file: Path) -> tuple[str, str, dict, list[dict]]:
    """(run id, group, config, history rows) of one offline W&B run."""
    def items(update) -> dict:  # a key is either plain or a path (nested_key)
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}

    config, history, run_id, group = {}, [], None, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, group = record.run.run_id, record.run.run_group
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "history":
            history.append(items(record.history.item))
    return run_id, group, config, history


def test_every_trial_reaches_mlflow_and_wandb(tmp_path):
    import mlflow

    raw = tiny_raw(**{"data.synthetic": TINY_WORLD, "optim.epochs": 1})
    raw["search"] = {"optim.lr": {"loguniform": [3e-4, 3e-3]}, "optim.wd": {"uniform": [0.0, 0.3]}}
    raw["tune"] = {"metric": "id_val_f1", "num_samples": 2, "max_concurrent_trials": 2, "loggers": ["mlflow", "wandb"]}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    run_cli("sweep", space, "--storage", tmp_path / "runs", "--name", "tracked", "--no-dashboard", env=env)

    # What the sweep itself recorded: each trial's searched values and last report.
    exp = tmp_path / "runs" / "tracked"
    trials = {}
    for params in exp.glob("*/params.json"):
        last = json.loads(params.with_name("result.json").read_text().splitlines()[-1])
        trials[last["trial_id"]] = (json.loads(params.read_text()), last)
    assert len(trials) == 2
    metrics = metric_names()  # every ID/OOD split's acc and F1
    assert len(metrics) == 8 and all(m in last for _, last in trials.values() for m in metrics)

    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tracked")  # named after the sweep
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        (trial_id,) = [t for t in trials if t in run.data.tags["trial_name"]]
        params, last = trials[trial_id]
        assert run.data.tags["dps_tune.sweep"] == "tracked"
        for key in SEARCHED:
            assert float(run.data.params[key]) == pytest.approx(params[key]), key
        for m in metrics:
            assert run.data.metrics[m] == pytest.approx(last[m]), m
            history = client.get_metric_history(run.info.run_id, m)
            assert len(history) == last["training_iteration"], m  # every report, not only the last

    run_files = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2, run_files
    seen = set()
    for run_file in run_files:
        run_id, group, config, history = wandb_run(run_file)
        params, last = trials[run_id]  # Ray names the W&B run after the trial id
        seen.add(run_id)
        assert group == "tracked"
        for key in SEARCHED:
            assert config[key] == pytest.approx(params[key]), key
        assert len(history) == last["training_iteration"]
        for m in metrics:
            assert history[-1][m] == pytest.approx(last[m]), m
    assert seen == set(trials)


def test_a_tracker_that_is_not_installed_is_one_line_before_ray_starts(tmp_path):
    """``sys.modules[name] = None`` is how Python marks a package as not importable."""
    raw = tiny_raw(**{"data.synthetic": TINY_WORLD})
    raw["search"] = {"optim.lr": {"loguniform": [3e-4, 3e-3]}}
    raw["tune"] = {"loggers": ["mlflow", "wandb"]}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    script = ("import sys; sys.modules['wandb'] = None\n"
              "from dps_tune.cli import main\n"
              "code = main(sys.argv[1:])\n"
              "print('ray imported' if 'ray' in sys.modules else 'ray not imported')\n"
              "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, "sweep", str(space), "--storage", str(tmp_path / "runs"),
                           "--name", "t"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["dps-tune: error: tune.loggers = 'wandb': the wandb package is not installed "
                                        "(pip install 'dps_tune[wandb]')"]
    assert proc.stdout.strip() == "ray not imported"
    assert not (tmp_path / "runs").exists()
