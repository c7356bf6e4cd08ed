"""A sweep on a storage URI, end to end: Ray writes through pyarrow, and so does every dps_tune command.

``file://`` URIs go through exactly the code an ``s3://`` or ``gs://`` URI does
(``pyarrow.fs.FileSystem.from_uri``), on this machine's disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import optuna
import pytest
from safetensors.torch import load_file

from support.cli import run_cli
from test_ray_tune import space

pytestmark = pytest.mark.slow


def test_sweep_results_best_report_and_resume_on_a_file_uri(tmp_path):
    store = tmp_path / "bucket"
    uri = f"file://{store}"
    path = space(tmp_path, "remote", tune={"num_samples": 2, "max_concurrent_trials": 2}, **{"optim.epochs": 2})
    proc = run_cli("sweep", path, "--storage", uri, "--name", "exp", "--no-dashboard")
    exp_uri = f"{uri}/exp"
    assert f"experiment: {exp_uri}" in proc.stdout

    # Everything a reader needs is on the storage itself, not only on the driver's disk.
    exp = store / "exp"
    meta = json.loads((exp / "dps_tune_sweep.json").read_text())
    assert meta["status"] == "finished" and meta["name"] == "exp"
    assert (exp / "optuna.db").stat().st_size > 0
    trial_dirs = [p.parent for p in exp.glob("*/params.json")]
    assert len(trial_dirs) == 2 and all((t / "dps_tune_config.json").is_file() for t in trial_dirs)

    out = run_cli("results", exp_uri).stdout
    assert "ood_test_acc" in out and out.count("completed") + out.count("early-stopped") == 2

    best = run_cli("best", exp_uri, "--export", tmp_path / "best").stdout
    assert f"{exp_uri}/" in best  # it names the checkpoint where it is, on the storage
    chosen = best.split(": ", 1)[1].splitlines()[0].strip()
    on_storage = load_file(chosen.removeprefix("file://") + "/model.safetensors")
    exported = load_file(str(tmp_path / "best" / "model.safetensors"))
    assert on_storage.keys() == exported.keys() and all((on_storage[k] == exported[k]).all() for k in exported)

    run_cli("report", exp_uri, "--out", tmp_path / "report.html")
    assert "results-table" in (tmp_path / "report.html").read_text()

    # A finished sweep resumes to the same end: nothing is lost, nothing runs again, and no Ray starts (none
    # writes a session into the Ray temporary folder it is given).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay short
    try:
        again = run_cli("resume", exp_uri, "--no-dashboard", env={"RAY_TMPDIR": str(ray_tmp)})
        assert not list(ray_tmp.rglob("session_*")), list(ray_tmp.rglob("*"))[:10]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert f"every trial of {exp_uri} has finished: nothing to resume" in again.stderr, again.stderr[-2000:]
    assert "ood_test_acc" in again.stdout  # its summary, as after a sweep
    assert json.loads((exp / "dps_tune_sweep.json").read_text())["status"] == "finished"
    assert len(list(exp.glob("*/params.json"))) == 2

    # Deleted from the storage and run again under its name: a fresh study, the same searched
    # values (tune.seed), not the old study's trials feeding the new search.
    first = sorted(json.loads(p.read_text())["optim.lr"] for p in exp.glob("*/params.json"))
    shutil.rmtree(exp)
    run_cli("sweep", path, "--storage", uri, "--name", "exp", "--no-dashboard")
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 2
    assert sorted(json.loads(p.read_text())["optim.lr"] for p in exp.glob("*/params.json")) == first


def test_a_storage_uri_that_names_a_file_or_nothing_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (f"file://{tmp_path / 'afile'}", f"file://{tmp_path / 'nothing'}"):
        proc = run_cli("results", target, check=False, timeout=120)
        assert proc.returncode == 2 and "no such directory on the storage" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_subtree_filesystem_passed_as_the_storage(tmp_path, monkeypatch):
    """The Python API takes any pyarrow filesystem (here a SubTreeFileSystem), which Ray gets as its own."""
    import pyarrow.fs as pafs

    from dps_tune.sweep import ray_tune, results, storage
    from dps_tune.sweep.search_space import load_sweep

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    root = storage.mount("unit-subtree", fs)
    sweep = load_sweep(space(tmp_path, "subtree", tune={"num_samples": 2}, **{"optim.epochs": 1}))
    try:
        location = ray_tune.run_sweep(sweep, storage_path=f"{root}/runs", name="exp", dashboard=False)
    finally:
        ray_tune.shutdown()
    assert location == f"{root}/runs/exp"
    exp = tmp_path / "bucket" / "runs" / "exp"  # inside the subtree: Ray and dps_tune wrote through fs
    assert json.loads((exp / "dps_tune_sweep.json").read_text())["status"] == "finished"
    assert (exp / "optuna.db").is_file() and len(list(exp.glob("*/dps_tune_config.json"))) == 2
    view = storage.local_view(location)
    table = results.results_table(view)
    assert len(table) == 2 and table["ood_test_acc"].notna().all()
    best = storage.fetch_weights(results.best_checkpoint(view, "id_val_acc"))
    assert load_file(str(best / "model.safetensors")).keys()
