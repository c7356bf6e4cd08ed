"""What `sweep` and `resume` check before Ray does any work, without starting Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray import tune

from dps_tune import cli
from dps_tune.config import config_from_dict, to_dict
from dps_tune.errors import LaunchError
from dps_tune.sweep import ray_tune  # imported, never skipped: a broken module fails these tests
from dps_tune.sweep.ray_tune import StorageFull, connection, launch
from dps_tune.sweep.ray_tune import trial as trial_module
from support.worlds import tiny_raw


def _sweep_dir(tmp_path, meta_text: str | None = None):
    exp = tmp_path / "runs" / "exp"
    exp.mkdir(parents=True)
    meta = {"name": "exp", "base": to_dict(config_from_dict(tiny_raw())), "tune": {}, "search": {},
            "status": "running"}
    (exp / "dps_tune_sweep.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
    return exp


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A stand-in for a connected two-node cluster; Tune's restore records that it was reached."""
    reached = []
    monkeypatch.setattr(connection, "connect", lambda address, dashboard: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path, **kwargs: True))

    def restore(path, **kwargs):
        reached.append(path)
        raise LaunchError("restore reached")

    monkeypatch.setattr(tune.Tuner, "restore", staticmethod(restore))
    return reached


def test_resume_takes_shared_storage_for_a_local_path_on_several_nodes(tmp_path, two_node_cluster, capsys):
    exp = _sweep_dir(tmp_path)
    assert cli.main(["resume", str(exp), "--address", "auto"]) == 2
    assert "a local path, but the cluster has 2 nodes" in capsys.readouterr().err
    assert not two_node_cluster
    assert cli.main(["resume", str(exp), "--address", "auto", "--shared-storage"]) == 2
    assert "restore reached" in capsys.readouterr().err
    assert two_node_cluster == [str(exp.resolve())]


@pytest.mark.parametrize("command", ["results", "best", "resume", "report"])
@pytest.mark.parametrize("content", ['{"name": "exp", "base": {"algo', "", "[1, 2]"])
def test_a_damaged_sweep_file_is_one_line(tmp_path, command, content, capsys):
    """A dps_tune_sweep.json cut short (or not an object) names the file; no JSON traceback."""
    exp = _sweep_dir(tmp_path, content)
    extra = ["--out", str(tmp_path / "r.html")] if command == "report" else []
    assert cli.main([command, str(exp), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dps_tune_sweep.json" in err[0] and str(exp) in err[0], err


def test_the_sweep_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A driver killed while it records the end of a sweep leaves the previous file whole."""
    import pathlib
    import types

    exp = _sweep_dir(tmp_path)
    before = (exp / "dps_tune_sweep.json").read_text()
    real_write = pathlib.Path.write_text

    def dies_halfway(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # the driver is stopped mid-write

    monkeypatch.setattr(pathlib.Path, "write_text", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        launch._finish(exp, str(exp), types.SimpleNamespace(errors=[]), "sweep")
    monkeypatch.undo()
    assert (exp / "dps_tune_sweep.json").read_text() == before
    assert not list(exp.glob(".*.tmp-*"))  # nothing half-written is left to mistake for it


@pytest.mark.parametrize("error,raised", [(RuntimeError("a trial's own bug"), None),
                                          (OSError(28, "No space left on device"), StorageFull)])
def test_the_end_of_a_run_with_errored_trials_is_recorded(tmp_path, error, raised):
    """Errored trials finish the run with their count recorded (`resume` continues them); one that failed on a
    full storage stops it as StorageFull. The first case once died of a NameError in the driver instead."""
    import types

    exp = _sweep_dir(tmp_path)
    result = types.SimpleNamespace(errors=[error])
    if raised is None:
        launch._finish(exp, str(exp), result, "sweep")
    else:
        with pytest.raises(raised):
            launch._finish(exp, str(exp), result, "sweep")
    recorded = json.loads((exp / "dps_tune_sweep.json").read_text())
    assert recorded["status"] == "finished" and recorded["errors"] == 1, recorded


@pytest.mark.parametrize("problem", [
    {"search": {"lr": {"loguniform": [1e-3, 1e-4]}}},  # a reversed range
    {"tune": {"metric": "ood_test_f1"}},  # selection on a test split
    {"dps.reference": "/nonexistent/ref", "algorithm": "dps"},  # a reference that is not there
])
def test_a_refused_sweep_creates_nothing(problem, tmp_path, write_yaml, capsys):
    raw = tiny_raw(**{k: v for k, v in problem.items() if k not in ("search", "tune")})
    raw["search"] = problem.get("search", {"lr": {"loguniform": [1e-4, 1e-3]}})
    raw["tune"] = problem.get("tune", {})
    assert cli.main(["sweep", str(write_yaml(raw)), "--storage", str(tmp_path / "runs"), "--name", "x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("gpus,share", [(0.5, 0.5), (0.25, 0.25), (1.0, None), (2.0, None), (0.0, None)])
def test_a_fractional_gpu_request_becomes_the_trials_memory_share(gpus, share, monkeypatch):
    """tune.gpus_per_trial below 1 reaches run_trial as memory_fraction; whole GPUs are not capped."""
    from dps_tune.config import TuneConfig

    seen = {}
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: seen.update(kw) or fn)
    monkeypatch.setattr(tune, "with_resources", lambda fn, res: seen.update(resources=res) or fn)
    launch._build_trainable(config_from_dict(tiny_raw()), None, TuneConfig(gpus_per_trial=gpus))
    assert seen["gpu_share"] == share and seen["resources"] == {"cpu": 1.0, "gpu": gpus}

    ran = {}
    monkeypatch.setattr(trial_module, "run_trial", lambda cfg, report, **kw: ran.update(kw))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "get_context", lambda: type("C", (), {"get_trial_id": lambda self: "t"})())
    ray_tune.trainable({}, base=config_from_dict(tiny_raw()), ranking=None, gpu_share=seen["gpu_share"],
                       tune_cfg=seen["tune_cfg"])
    assert ran["memory_fraction"] == share and ran["keep"].keep == 2  # the checkpoint economy, tune's defaults


def test_a_sweep_whose_experiment_another_process_drives_is_refused_before_ray(tmp_path, write_yaml, capsys):
    """The experiment's lock is held (as by a sweep still starting Ray): one line, nothing created, Ray untouched."""
    from dps_tune.sweep import storage

    raw = tiny_raw()
    raw["search"] = {"lr": {"loguniform": [1e-4, 1e-3]}}
    runs = tmp_path / "runs"
    with storage.driver_lock(str((runs / "busy").resolve())):
        assert cli.main(["sweep", str(write_yaml(raw)), "--storage", str(runs), "--name", "busy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another dps-tune process" in err[0] and "busy" in err[0], err
    assert not runs.exists()
    assert not ray.is_initialized()


def test_a_cluster_s_workers_get_the_whole_package_through_runtime_env(monkeypatch):
    """The package the driver ships is dps_tune itself, wherever the module that ships it sits in it."""
    import dps_tune

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    connection.connect("127.0.0.1:6379", dashboard=False)
    assert seen["address"] == "127.0.0.1:6379"
    assert seen["runtime_env"] == {"py_modules": [str(Path(dps_tune.__file__).resolve().parent)]}


def test_ray_s_unhandled_error_of_a_trial_stopped_by_a_full_storage_is_not_shown():
    """Ray logs the stopped trial's error with its frames ("Unhandled error …", no "Traceback" line) now and then,
    after the run has said it in one line; any other unhandled error still shows."""
    import logging

    from dps_tune.sweep.ray_tune.interrupts import _RayLines

    def record(text: str) -> logging.LogRecord:
        return logging.LogRecord("ray._private.worker", logging.ERROR, "worker.py", 439, text, None, None)

    lines = _RayLines("sweep")
    full = ("Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::ImplicitFunc.train() (pid=1)\n"
            '  File "trial.py", line 100, in report\nRuntimeError: the storage is full (6.3 MB free of 47.2 MB, at /x)')
    assert lines.filter(record(full)) is False
    other = "Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::f() ValueError: a bug"
    assert lines.filter(record(other)) is True
