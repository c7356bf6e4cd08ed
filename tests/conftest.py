"""Shared fixtures: an isolated cache, no network, a tiny synthetic world and configs."""

from __future__ import annotations

import json
import os

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Loopback only: without this, Ray swaps 127.0.0.1 for the machine's own address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Patience for a starved machine: two cores shared by several test workers, each with its own Ray,
# can keep a raylet or the GCS off the CPU for longer than Ray's defaults allow (5 missed health
# checks of 10 s; 60 s to reach the GCS), and Ray then declares a live node dead mid-sweep.
for _name, _value in (("RAY_health_check_failure_threshold", "20"), ("RAY_health_check_timeout_ms", "30000"),
                      ("RAY_gcs_rpc_server_reconnect_timeout_s", "300")):
    os.environ.setdefault(_name, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads under pytest-xdist too: tests compare figures bit for bit with subprocesses that use
# torch's default, and a different thread count changes a convolution's summation order.
torch.set_num_threads(2)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set by pytest-xdist (`make test` runs several workers)

TINY_WORLD = {"classes": 4, "train_per_class": 8, "eval_per_class": 4, "image_size": 32}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """One cache for the whole run, empty at its start. Under pytest-xdist every worker shares it
    (the run's common temporary folder), so the synthetic worlds and the pretrained model are built
    once per run, not once per worker: the builders take a file lock and write atomically."""
    if WORKER:
        cache = tmp_path_factory.getbasetemp().parent / "dps_tune_cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("dps_tune_cache")
    old = os.environ.get("DPS_TUNE_CACHE")
    os.environ["DPS_TUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DPS_TUNE_CACHE", None)
    else:
        os.environ["DPS_TUNE_CACHE"] = old


def tiny_raw(**overrides) -> dict:
    """A raw config dict for the tiny model on a tiny synthetic world."""
    raw = {
        "algorithm": "ce",
        "model": "tiny-vit",
        "pretrained": "none",
        "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 8, "eval_batch_size": 64, "workers": 0,
                 "synthetic": dict(TINY_WORLD)},
        "optim": {"lr": 1e-3, "wd": 0.1, "epochs": 1, "warmup_steps": 2},
        "train": {"log_every_steps": 2},
    }
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


@pytest.fixture
def tiny_config():
    from dps_tune.config import config_from_dict

    def make(**overrides):
        return config_from_dict(tiny_raw(**overrides))

    return make


@pytest.fixture
def write_yaml(tmp_path):
    import yaml

    def write(raw: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def run_cli(*args, env=None, check=True, timeout=1200):
    """``python -m dps_tune.cli ARGS`` in a subprocess; asserts exit status 0 unless ``check`` is false."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dps_tune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# The modules that take longest, first: under pytest-xdist a worker takes the next module when
# it is free, so the longest start at once and the short ones fill in around them.
LONGEST_FIRST = ("demo/test_study.py", "sweep/test_s3.py", "sweep/test_ray_tune.py", "sweep/test_confirm.py",
                 "sweep/test_ensembles.py", "sweep/test_cluster.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        early = [i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)]
        return early[0] if early else len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: each module's tests keep their order


def pytest_terminal_summary(terminalreporter):
    """The size of the bad-input matrix, in every run's output (tests/test_input_matrix.py)."""
    import sys

    matrix = sys.modules.get("test_input_matrix")
    ran = any(getattr(r, "nodeid", "").startswith("tests/test_input_matrix.py")
              for reports in terminalreporter.stats.values() for r in reports)
    if matrix is None and ran:
        import importlib  # under pytest-xdist the workers ran the matrix; this process imports it to count it

        matrix = importlib.import_module("test_input_matrix")
    if matrix is not None:
        terminalreporter.write_line(matrix.summary())


# Every function that deletes a superseded checkpoint: Ray's own, and dps_tune's deferred one.
CHECKPOINT_DELETERS = "ray.train._internal.checkpoint_manager:_delete_fs_path,dps_tune.sweep.storage:delete_checkpoint"


def kill_after_first_checkpoint_deletion(*args, timeout=1200):
    """``dps-tune ARGS``, SIGKILLed right after the first checkpoint it deletes, with every process it started.

    The window a resume must survive: a checkpoint is gone, and the experiment state on
    the storage may still name it. Asserts that the kill came.
    """
    import signal
    import subprocess
    import sys

    import tempfile

    killer = Path(__file__).resolve().parent / "kill_after.py"
    with tempfile.TemporaryFile("w+") as err:  # not a pipe: Ray's processes would hold it open
        proc = subprocess.Popen([sys.executable, str(killer), CHECKPOINT_DELETERS, "1", "--after", "--",
                                 *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the Ray it started, as a lost machine takes it
            except ProcessLookupError:
                pass
        err.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"never killed (exit {proc.returncode}): {err.read()[-2000:]}"


def restore_points_left(exp: Path) -> dict[str, int]:
    """Trial directory name -> step of the checkpoint `resume` takes it up from (the newest one the experiment
    state on the storage names), for the trials that have one; asserts each of them is still there.

    Training up to that step must not be redone. A checkpoint written after that state was
    saved is not one Ray knows of: the trial trains its steps again (one resume interval).
    """
    from dps_tune.sweep import ray_tune

    points = {}
    for trial_id, (_, name) in ray_tune.restore_points(str(exp)).items():
        if name is None:
            continue
        trial_dir = next(exp.glob(f"*_{trial_id}_*"))
        metrics = trial_dir / name / "metrics.json"
        assert metrics.is_file(), f"{trial_dir.name}: its restore point {name} is gone"
        points[trial_dir.name] = json.loads(metrics.read_text())["step"]
    return points


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("90m")``: a real filesystem of that size that fills up (a tmpfs: CI runs as root), and
    ``grow("400m")`` to make room; unmounted afterwards. Skips where mounting is refused."""
    import subprocess

    mnt = tmp_path / "disk"
    mounted = []

    def mount(size: str):
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:200]}); the full-disk tests need a real "
                        "small filesystem, and have no patched-writer fallback")
        mounted.append(mnt)

        def grow(bigger: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={bigger}", str(mnt)], check=True, capture_output=True)

        return mnt, grow

    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)
