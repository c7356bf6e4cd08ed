"""Sweeps on real multi-process Ray clusters, all on loopback.

- ``ray job submit`` of ``dps-tune sweep`` to a ``ray start --head`` cluster with Ray's
  token authentication on; ``dps-tune results`` then reads the experiment.
- A ``ray.cluster_utils.Cluster`` with two worker nodes: the node that runs the trial is
  removed mid-trial, and the trial finishes on the other one from its newest train state.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.cli import cli_argv, run_cli
from support.ray_head import free_ports, ray_head
from support.worlds import SWEEP_WORLD, tiny_raw

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the environment's `ray` and `dps-tune`
WORLD = {**SWEEP_WORLD, "eval_per_class": 4}


def write_space(tmp: Path, **tune) -> Path:
    raw = tiny_raw(**{"data.synthetic": WORLD, "data.batch_size": 8})
    raw["search"] = {"optim.lr": {"loguniform": [3e-4, 3e-3]}}
    raw["tune"] = {"metric": "id_val_f1", "num_samples": 2, "max_concurrent_trials": 1, **tune}
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def token_env(monkeypatch):
    """Ray's token authentication, on for every process this test starts (no token file is written)."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ADDRESS": "",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # a job's `dps-tune`, as `make` installs it
    _reload_ray_auth()  # this process read RAY_AUTH_MODE once, when an earlier test first used Ray
    yield env
    monkeypatch.undo()
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray read RAY_AUTH_MODE and the token again (``ray.cluster_utils.Cluster`` runs in it)."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


def test_ray_job_submit_runs_a_sweep_on_a_token_authenticated_head(tmp_path, token_env):
    with ray_head(dashboard=True) as head:
        address = f"http://127.0.0.1:{head['dashboard']}"
        deadline = time.time() + 360  # a loaded 2-core machine takes minutes to start the dashboard
        while True:  # the job API answers once the dashboard is up
            probe = subprocess.run([BIN / "ray", "job", "list", "--address", address], capture_output=True,
                                   text=True, timeout=120)
            if probe.returncode == 0:
                break
            logs = "".join(p.read_text()[-2000:] for p in Path(head["temp"]).glob("session_*/logs/dashboard.err"))
            assert time.time() < deadline, probe.stderr[-1500:] + logs
            time.sleep(2)

        # Without the token the cluster refuses the job.
        refused = subprocess.run([BIN / "ray", "job", "list", "--address", address], capture_output=True, text=True,
                                 timeout=120, env={**os.environ, "RAY_AUTH_TOKEN": "not-the-token"})
        assert refused.returncode != 0

        space, runs = write_space(tmp_path), tmp_path / "runs"
        job = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
             "dps-tune", "sweep", str(space), "--storage", str(runs), "--name", "job", "--no-dashboard"],
            cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout, job.stdout[-3000:]
        # The trials ran on this cluster (its state API lists their actors), not on a Ray the job started.
        listed = subprocess.run([BIN / "ray", "list", "actors", "--address", address, "--format", "json",
                                 "--limit", "10000"], capture_output=True, text=True, timeout=120)
        classes = [a["class_name"] for a in json.loads(listed.stdout)]
        assert "ImplicitFunc" in classes, classes  # the trials' actor (reused from trial to trial)
        out = run_cli("results", runs / "job").stdout
        assert out.count("completed") == 2, out
        assert json.loads((runs / "job" / "dps_tune_sweep.json").read_text())["status"] == "finished"


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def ancestors(pid: int) -> set[int]:
    """The process ids above ``pid``, from /proc (field 4 of /proc/PID/stat is the parent)."""
    found = set()
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.add(pid)
    return found


def result_rows(exp: Path) -> list[dict]:
    (result,) = exp.glob("*/result.json")
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


def test_a_trial_finishes_on_the_other_node_when_its_node_is_removed(tmp_path, token_env, monkeypatch):
    from ray.cluster_utils import Cluster

    # Ray's own patience for a dead node: the suite's larger one (conftest) would keep this cluster
    # waiting minutes for the removed node's health checks to run out.
    monkeypatch.setenv("RAY_health_check_failure_threshold", "5")

    epochs = 12
    (gcs,) = free_ports(1)
    # The head runs the driver only (no CPU for trials); each worker node has room for the one trial.
    cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": "127.0.0.1", "gcs_server_port": gcs,
                                                            "num_cpus": 0, "include_dashboard": False})
    sweep = None
    try:
        workers = [cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        space = write_space(tmp_path, num_samples=1, grace_period=epochs, resume_every=1, max_failures=2)
        runs = tmp_path / "runs"
        exp = runs / "moved"
        sweep = subprocess.Popen(
            cli_argv("sweep", space, "--set", f"optim.epochs={epochs}", "--address", cluster.address, "--storage",
                     runs, "--shared-storage", "--name", "moved", "--no-dashboard"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        deadline = time.time() + 300
        while not (list(exp.glob("*/result.json")) and len(result_rows(exp)) >= 2):
            assert sweep.poll() is None and time.time() < deadline, sweep.stdout.read()[-4000:]
            time.sleep(0.5)
        trial_pid = result_rows(exp)[-1]["pid"]
        # Frozen first: a trial of this tiny world trains an epoch in a fifth of a second, and once it
        # had trained all of them before the removal reached its node (nothing was left to move).
        os.kill(trial_pid, signal.SIGSTOP)
        before = result_rows(exp)
        (node,) = [n for n in workers if raylet_pid(n) in ancestors(trial_pid)]
        cluster.remove_node(node, allow_graceful=False)  # the trial's node dies, mid-training,
        os.kill(trial_pid, signal.SIGKILL)  # and its processes with it

        out, _ = sweep.communicate(timeout=1200)
        assert sweep.returncode == 0, out[-4000:]
        rows = result_rows(exp)
        moved = [r for r in rows if r["pid"] != trial_pid]
        assert moved and len(rows) > len(before), rows  # a new worker process: the other node (the head has no CPU)
        assert all(r["pid"] != trial_pid for r in rows[rows.index(moved[0]):])
        # It went on from its newest train state: at most the one epoch in flight (resume_every: 1)
        # is trained again, never from epoch 1.
        done_before = max(r["epoch"] for r in rows if r["pid"] == trial_pid)
        restarted = [r["epoch"] for r in moved]
        assert restarted[0] in (done_before, done_before + 1), (done_before, restarted)
        assert restarted == sorted(set(restarted)) and restarted[-1] == epochs, restarted
        table = run_cli("results", exp).stdout
        assert table.count("completed") == 1, table
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
        cluster.shutdown()
