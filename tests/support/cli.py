"""``dps-tune`` as a shell runs it: the one runner (a fork of :mod:`support.cli_server`'s server, or a
subprocess), and the argv of the commands a test starts and drives itself (its own process group for Ctrl-C,
output read while it runs, a crash at a chosen call).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from support.cli_server import FORKSERVER, run_in_fork

HERE = Path(__file__).resolve().parent
KILL_AFTER = HERE / "kill_after.py"  # `dps-tune ARGS`, killed at the Nth call of a function

# Every function that deletes a superseded checkpoint: Ray's own, and dps_tune's deferred one.
CHECKPOINT_DELETERS = "ray.train._internal.checkpoint_manager:_delete_fs_path,dps_tune.sweep.storage:delete_checkpoint"


def cli_argv(*args) -> list[str]:
    """``python -m dps_tune.cli ARGS``, for a command the test starts with ``subprocess.Popen`` itself."""
    return [sys.executable, "-m", "dps_tune.cli", *map(str, args)]


def kill_after_argv(targets: str, n: int, *args, after: bool = False, sig: str = "KILL",
                    attrs: tuple[str, ...] = ()) -> list[str]:
    """``dps-tune ARGS`` under kill_after.py: SIGKILLed (Ctrl-C with ``sig="INT"``) at the ``n``-th call of
    ``targets`` (``MODULE:FUNCTION[,...]``), before the call runs or, with ``after``, right after it returned.
    ``attrs`` (``MODULE:NAME=INT``) set module constants first. ``n`` = 0 never kills."""
    opts = [*(["--after"] if after else []), "--signal", sig, *(part for a in attrs for part in ("--attr", a))]
    return [sys.executable, str(KILL_AFTER), targets, str(n), *opts, "--", *map(str, args)]


def run(argv: list[str], *, env: dict | None = None, check: bool = True, timeout: float = 1200,
        cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``argv`` to its end, output captured, in this environment updated by ``env`` (a value of None unsets that
    variable); asserts exit status 0 unless ``check`` is false."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_cli(*args, env: dict | None = None, check: bool = True, timeout: float = 1200,
            cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``dps-tune ARGS`` to its end, as ``python -m dps_tune.cli`` would run it, in a fork of a process that has
    imported torch already (:mod:`support.cli_server`), or in a subprocess where a fork cannot stand in for
    one; otherwise as :func:`run`."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = run_in_fork([str(a) for a in args], full_env, timeout, cwd)
    if proc is None:
        return run(cli_argv(*args), env=env, check=check, timeout=timeout, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_killed(targets: str, n: int, *args, sig: str = "KILL", attrs: tuple[str, ...] = (),
               calls: Path | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """:func:`kill_after_argv` to its end, exit status not checked; with ``calls``, the number of calls of
    ``targets`` is written there when the command exits (for ``n`` = 0: how much work a rerun redid).
    It runs in a fork of :mod:`support.cli_server`'s server, armed as kill_after.py arms a process, where
    :func:`run_cli` would run the command in one."""
    calls_env = {"CALLS_FILE": str(calls)} if calls else {}
    kill = {"targets": targets.split(","), "n": n, "sig": sig, "attrs": list(attrs)}
    proc = run_in_fork([str(a) for a in args], {**os.environ, **calls_env}, timeout, None, kill)
    if proc is not None:
        return proc
    return run(kill_after_argv(targets, n, *args, sig=sig, attrs=attrs), check=False, timeout=timeout, env=calls_env)


def kill_after_first_checkpoint_deletion(*args, timeout: float = 1200) -> None:
    """``dps-tune ARGS``, SIGKILLed right after the first checkpoint it deletes, with every process it started.

    The window a resume must survive: a checkpoint is gone, and the experiment state on
    the storage may still name it. Asserts that the kill came.
    """
    with tempfile.TemporaryFile("w+") as err:  # not a pipe: Ray's processes would hold it open
        proc = subprocess.Popen(kill_after_argv(CHECKPOINT_DELETERS, 1, *args, after=True), stdout=subprocess.DEVNULL,
                                stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the Ray it started, as a lost machine takes it
            except ProcessLookupError:
                pass
        err.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"never killed (exit {proc.returncode}): {err.read()[-2000:]}"
