"""Run ``dps-tune`` commands in forked children of one light process; for the input matrix.

Starting Python and importing torch for each of a hundred cases would take minutes, and
the matrix also checks that most bad input is refused before torch or Ray is imported.
This process imports only :mod:`dps_tune.cli` (no torch), then forks once per case: a
child starts from that light state, so ``"torch" in sys.modules`` after the command says
whether the command itself imported it.

Protocol, one JSON object per line: the test writes ``{"argv", "cwd", "env", "out",
"timeout"}`` on stdin; the child's stdout and stderr go to ``out/stdout`` and
``out/stderr`` and its verdict to ``out/result.json``; this process answers
``{"timed_out": bool, "status": int}`` once the child has ended (killed with its process group after
``timeout`` seconds).

``--preload a,b`` imports those modules too, before any fork: the server for the cases
that must read weights preloads torch and open_clip, so they do not pay for them each.

The suite's ``run_cli`` uses the same server for every command a test runs to its end
(:mod:`support.cli`). Its cases add ``"replace_env": true`` (the child's environment is
exactly ``env``, as a subprocess's would be) and ``"announce": true`` (this process
first answers ``{"pid": N}``, so a test stopped meanwhile can kill the command's process
group), and ``"kill"`` (:func:`kill_after.install`'s keywords) arms the child as
``kill_after.py`` arms a process. A child ends as a Python process does: its atexit handlers run
(Ray's shutdown among them), and an uncaught exception is a traceback and exit status 1.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import sys
import time

from dps_tune.cli import main  # the one import that is paid once

MAIN_FILE = importlib.util.find_spec("dps_tune.cli.__main__").origin  # found, not run


def _child(case: dict) -> None:
    os.setpgid(0, 0)  # so a timeout kills whatever the command started
    os.chdir(case["cwd"])
    if case.get("replace_env"):
        os.environ.clear()
    os.environ.update(case["env"])
    sys.argv = [MAIN_FILE, *case["argv"]]  # as `python -m dps_tune.cli ARGS` has it
    if case.get("kill"):  # killed at the Nth call of a function, as under kill_after.py
        import kill_after

        kill_after.install(**case["kill"])
    out = case["out"]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        code = main(case["argv"])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a traceback is a finding: keep it on stderr
        import traceback

        traceback.print_exc()
        code = 1
    verdict = {"code": code, "torch": "torch" in sys.modules, "ray": "ray" in sys.modules}
    atexit._run_exitfuncs()  # what the interpreter runs at exit: Ray's shutdown, logging's flush
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.path.join(out, "result.json"), "w") as fh:
        json.dump(verdict, fh)
    os._exit(0)


def serve() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(case)
        if case.get("announce"):
            print(json.dumps({"pid": pid}), flush=True)
        deadline = time.monotonic() + case["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        # the child's own exit status: 0 once it wrote its verdict, -N when signal N ended it first
        print(json.dumps({"timed_out": timed_out, "status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--preload":
        import importlib

        for name in sys.argv[2].split(","):
            importlib.import_module(name)
    serve()
