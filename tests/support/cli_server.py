"""``dps-tune ARGS`` run to its end as a fork of a process that has imported torch and open_clip already.

Importing torch and open_clip takes several seconds of CPU in every new interpreter, and the
suite runs about a hundred commands to their end. :class:`CliServer` starts
``cli_forkserver.py`` once per test process, with those modules preloaded, and runs each
command in a fork of it: a child with exactly the environment the test gives, in the test's
working directory, its output in files, ended as a Python process ends (atexit handlers,
Ray's shutdown among them). Ray and dps_tune's own modules other than the CLI are imported
by the command itself, after its environment is set, as in a new interpreter.

A command the fork cannot stand in for runs in a subprocess instead:
one whose environment changes how Python starts (``PYTHON*``), and one started while another
holds the server (from a second thread). ``DPS_TUNE_TEST_FORK=0`` runs every command in a
subprocess.
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

FORKSERVER = Path(__file__).resolve().with_name("cli_forkserver.py")
PRELOAD = "torch,open_clip,pandas,numpy,PIL.Image,safetensors.torch"
ENABLED = os.environ.get("DPS_TUNE_TEST_FORK", "1") != "0"


def python_variables(env) -> dict[str, str]:
    """The variables that tell Python how to start (``PYTHONPATH``, ``PYTHONHASHSEED``, ...)."""
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


class CliServer:
    """One fork server for this test process, started at its first command; see the module's text."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._io = Path(tempfile.mkdtemp(prefix="dps_tune_cli_"))
        self.python_env = python_variables(os.environ)  # the server's, and so every fork's
        atexit.register(self.close)

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, str(FORKSERVER), "--preload", PRELOAD],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self._proc

    def run(self, args: list[str], env: dict[str, str], timeout: float, cwd: str
            ) -> subprocess.CompletedProcess | None:
        """``args`` run to its end in a fork; None when another command holds the server."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            out = Path(tempfile.mkdtemp(dir=self._io))
            server = self._server()
            server.stdin.write(json.dumps({"argv": args, "cwd": cwd, "env": env, "out": str(out),
                                           "timeout": timeout, "replace_env": True, "announce": True}) + "\n")
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


def run_in_fork(args: list[str], env: dict[str, str], timeout: float, cwd: str | None
                ) -> subprocess.CompletedProcess | None:
    """``dps-tune ARGS`` in a fork of this process's server, or None where it must be a subprocess."""
    global _SERVER
    if not ENABLED:
        return None
    _SERVER = _SERVER or CliServer()
    if python_variables(env) != _SERVER.python_env:
        return None
    return _SERVER.run(args, env, timeout, str(cwd or os.getcwd()))
