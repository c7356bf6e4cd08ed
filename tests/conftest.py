"""Fixtures and hooks only (helpers are in support/): an isolated cache, no network, configs, a small disk."""

from __future__ import annotations

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
# OpenMP threads that wait for work sleep instead of spinning. The test workers share two cores, and
# torch's two intra-op threads spin-waiting in one process take the CPU the other worker computes on:
# the reduced pretraining build beside a busy two-thread torch process took 103 s spinning and 47 s
# sleeping, and alone 21.0 s against 22.0 s (41.6 against 27.9 CPU-seconds). It is read when torch
# loads libgomp, so it is set here, before torch is imported, and every subprocess and Ray worker
# inherits it. It changes no figure: which thread waits how does not change the arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from support.worlds import tiny_raw  # noqa: E402

# Two threads under pytest-xdist too: tests compare figures bit for bit with subprocesses that use
# torch's default, and a different thread count changes a convolution's summation order.
torch.set_num_threads(2)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set by pytest-xdist (`make test` runs several workers)


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


# The modules that take longest, first: under pytest-xdist a worker takes the next module when
# it is free, so the longest start at once and the short ones fill in around them.
# test_regime.py comes once the demo test has built the pretrained model it also needs (behind the build's lock).
LONGEST_FIRST = ("demo/test_study.py", "sweep/test_s3.py", "sweep/test_ray_tune.py", "demo/test_regime.py",
                 "sweep/test_confirm.py", "sweep/test_ensembles.py", "sweep/test_cluster.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        early = [i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)]
        return early[0] if early else len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: each module's tests keep their order


_LEFT: list[str] = []  # the drift last reported, so that one leak fails one test, not every test after it


@pytest.fixture(autouse=True)
def _environment_left_as_the_cli_server_took_it():
    """Fails, at its teardown, a test that leaves a variable read at import (RAY_*, PYTHON*, ...) changed in
    this process's environment: every later command of this test process would run in a new interpreter
    instead of a fork of the CLI server (support/cli_server.py). Changes made with monkeypatch are undone
    before this runs."""
    yield
    import sys

    server = sys.modules.get("support.cli_server")
    if server is None or not server.ENABLED:
        return
    left = server.changed_since_taken()
    if left and left != _LEFT:
        _LEFT[:] = left
        pytest.fail("this test (or a module imported since support.cli_server) left its process's environment "
                    "changed in variables read at import, so every later dps-tune command of this test process "
                    "runs in a new interpreter: " + "; ".join(left) + ". Use monkeypatch, or pass env= to the "
                    "command.", pytrace=False)
    _LEFT[:] = left


def pytest_sessionfinish(session):
    """Under pytest-xdist, each worker hands where its commands ran to the controller (pytest_testnodedown)."""
    import sys

    tally = sys.modules.get("support.cli_tally")
    if tally is not None and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["cli_tally"] = dict(tally.TALLY)


_WORKER_TALLIES: list[dict] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKER_TALLIES.append(getattr(node, "workeroutput", {}).get("cli_tally", {}))


def pytest_terminal_summary(terminalreporter):
    """The size of the bad-input matrix, in every run's output (tests/test_input_matrix.py), and where the
    dps-tune commands ran (support/cli_server.py)."""
    import sys

    from support import cli_tally

    line = cli_tally.summary(_WORKER_TALLIES or [dict(cli_tally.TALLY)])
    if line:
        terminalreporter.write_line(line)

    matrix = sys.modules.get("test_input_matrix")
    ran = any(getattr(r, "nodeid", "").startswith("tests/test_input_matrix.py")
              for reports in terminalreporter.stats.values() for r in reports)
    if matrix is None and ran:
        import importlib  # under pytest-xdist the workers ran the matrix; this process imports it to count it

        matrix = importlib.import_module("test_input_matrix")
    if matrix is not None:
        terminalreporter.write_line(matrix.summary())


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
