"""``dps-tune ARGS`` run to its end as a fork of a process that has imported torch, open_clip and Ray already.

Importing torch and open_clip takes several seconds of CPU in every new interpreter, and
Ray, Ray Tune, Optuna and MLflow (which Ray Tune imports at every ``Tuner.fit`` to count
callbacks by class) about two more in every sweep's driver; the suite runs about a hundred
commands to their end. :class:`CliServer` starts ``cli_forkserver.py`` once per test
process, with those modules preloaded, and runs each command in a fork of it: a child with
exactly the environment the test gives, in the test's working directory, its output in
files, ended as a Python process ends (atexit handlers, Ray's shutdown among them).
dps_tune's own modules other than the CLI are imported by the command itself, as in a new
interpreter.

Ray, Ray Tune and Optuna read some environment variables when they are imported. So a
command the fork cannot stand in for runs in a subprocess instead: one whose environment
differs from the server's in a variable that Python or a preloaded package reads at start
(``PYTHON*``, ``RAY_*``, ``TUNE_*``, ``OPTUNA_*``, ``MLFLOW_*``), and one started while
another holds the server (from a second thread). ``DPS_TUNE_TEST_FORK=0`` runs every
command in a subprocess.

:data:`support.cli_tally.TALLY` counts where each command ran, and why one did not run in a
fork; the run's summary prints it (conftest.py). A subprocess is meant when a test sets such a
variable for its command (a ``RAY_ADDRESS``, a ``PYTHONPATH``). A test that leaves one changed in
its own process's environment sends every later command of that process to a new interpreter, so
conftest.py fails such a test at its teardown (:func:`changed_since_taken`): once, a change like
that went unseen for a whole round and cost the suite an eighth of its CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from support.cli_tally import TALLY

FORKSERVER = Path(__file__).resolve().with_name("cli_forkserver.py")
PRELOAD = ("torch,open_clip,pandas,numpy,PIL.Image,safetensors.torch,"
           "ray,ray.tune,optuna,ray.air.integrations.mlflow")
# Read by Python at start, or by a preloaded package when it is imported.
READ_AT_IMPORT = ("PYTHON", "RAY_", "TUNE_", "OPTUNA_", "MLFLOW_")
ENABLED = os.environ.get("DPS_TUNE_TEST_FORK", "1") != "0"
# Every sweep command sets Ray's and Tune's defaults (RAY_DEDUP_LOGS, TUNE_GLOBAL_CHECKPOINT_S, ...) in its
# environment before it imports Ray, and so does any test module that imports dps_tune's Ray package. This
# process sets them first, so that the server imports Ray under them as a command would, and so that a test
# module imported after this one does not make every later command's environment differ from the server's:
# it did, and under pytest-xdist (which imports every test module before the first test) every command of
# the suite ran in a new interpreter.
import dps_tune.sweep.ray_tune  # noqa: E402,F401

# The server's environment: the test process's as it was imported, before any test changed it.
SERVER_ENV = dict(os.environ)


# What Ray writes into its own process's environment: `import ray` the first, a local `ray.init()` the others.
# A test process that did either passes them on to its commands; none of them is read at an import, and a
# command's Ray writes the same values.
RAY_WRITES = {"RAY_CLIENT_MODE": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
              "PYTHONBREAKPOINT": "ray.util.rpdb._driver_set_trace"}


def read_at_import(env) -> dict[str, str]:
    """The variables that Python reads at start (``PYTHONPATH``, ...) or a preloaded package at its import."""
    return {k: v for k, v in env.items() if k.startswith(READ_AT_IMPORT) and RAY_WRITES.get(k) != v}


class CliServer:
    """One fork server for this test process, started at its first command; see the module's text."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._io = Path(tempfile.mkdtemp(prefix="dps_tune_cli_"))
        atexit.register(self.close)

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, str(FORKSERVER), "--preload", PRELOAD],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=SERVER_ENV)
        return self._proc

    def run(self, args: list[str], env: dict[str, str], timeout: float, cwd: str, kill: dict | None = None
            ) -> subprocess.CompletedProcess | None:
        """``args`` run to its end in a fork (armed by ``kill``: see :func:`kill_after.install`); None when
        another command holds the server."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            out = Path(tempfile.mkdtemp(dir=self._io))
            server = self._server()
            server.stdin.write(json.dumps({"argv": args, "cwd": cwd, "env": env, "out": str(out),
                                           "timeout": timeout, "replace_env": True, "announce": True, "kill": kill}) + "\n")
            server.stdin.flush()
            pid = json.loads(server.stdout.readline())["pid"]
            try:
                reply = json.loads(server.stdout.readline())
            except BaseException:  # the test was stopped (its timeout, Ctrl-C): so is the command
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self.close()
                raise
            stdout, stderr = ((out / name).read_text(errors="replace") for name in ("stdout", "stderr"))
            if reply["timed_out"]:
                raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
            verdict = out / "result.json"  # absent when a signal ended the command
            code = json.loads(verdict.read_text())["code"] if verdict.is_file() else reply["status"]
            shutil.rmtree(out, ignore_errors=True)
            return subprocess.CompletedProcess(args, code, stdout, stderr)
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


_SERVER: CliServer | None = None


def run_in_fork(args: list[str], env: dict[str, str], timeout: float, cwd: str | None, kill: dict | None = None
                ) -> subprocess.CompletedProcess | None:
    """``dps-tune ARGS`` in a fork of this process's server (armed by ``kill``, as :mod:`kill_after` arms a
    process), or None where it must be a subprocess."""
    global _SERVER
    if not ENABLED:
        TALLY["DPS_TUNE_TEST_FORK=0"] += 1
        return None
    _SERVER = _SERVER or CliServer()
    reason = fallback_reason(env)
    proc = None if reason else _SERVER.run(args, env, timeout, str(cwd or os.getcwd()), kill)
    TALLY[reason or ("fork" if proc is not None else "another thread held the server")] += 1
    return proc


def fallback_reason(env: dict[str, str]) -> str | None:
    """Why a command with environment ``env`` cannot run in a fork of the server; None when it can."""
    differ = drift(env)
    return "its environment differs from the server's in " + ", ".join(differ) if differ else None


def drift(env) -> list[str]:
    """The variables read at import in which ``env`` differs from the server's environment."""
    theirs, server = read_at_import(env), read_at_import(SERVER_ENV)
    return sorted(k for k in set(theirs) | set(server) if theirs.get(k) != server.get(k))


def changed_since_taken() -> list[str]:
    """``NAME=value (the server has value)`` for each variable read at import in which this process's
    environment now differs from the server's."""
    return [f"{k}={os.environ.get(k)!r} (the server has {SERVER_ENV.get(k)!r})" for k in drift(os.environ)]
