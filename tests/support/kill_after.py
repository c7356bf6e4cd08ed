"""Run ``dps-tune ARGS`` and SIGKILL it on the Nth call of one function: a crash with no cleanup at all.

Usage::

    python tests/support/kill_after.py MODULE:FUNCTION[,MODULE:FUNCTION...] N [--after] [--signal INT]
        [--attr MODULE:NAME=INT ...] -- ARGS...

The Nth call of ``MODULE.FUNCTION`` (counted over every function named) kills the
process before it runs, or with ``--after`` right after it returned: no ``finally``, no
atexit, no flushed buffers, as when the machine or the OOM killer takes it. N = 0 never
kills; the number of calls is then written to ``$CALLS_FILE``, if set, at exit, so a test
can see how much work a rerun redid. ``--attr`` sets a module constant first (a small
shard size, say). ``--signal INT`` sends SIGINT instead, as Ctrl-C at a terminal does.

:func:`install` arms a process the same way: the suite's fork server (:mod:`support.cli_forkserver`) calls
it in the fork that runs the command, which then does not import torch again.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys


def install(targets: list[str], n: int, *, after: bool = False, sig: str = "KILL", attrs: tuple[str, ...] = ()
            ) -> None:
    """Arm this process: ``attrs`` (``MODULE:NAME=INT``) set, and the ``n``-th call of ``targets`` sends ``sig``."""
    signum = signal.SIGINT if sig == "INT" else signal.SIGKILL
    if signum == signal.SIGINT:
        # As in a terminal's foreground job. A suite started in the background by a shell without job
        # control (`make test &`, nohup) starts every process with SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: the Ctrl-C would never arrive.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for attr in attrs:
        where, value = attr.split("=")
        mod, name = where.split(":")
        setattr(importlib.import_module(mod), name, int(value))
    calls = [0]

    def patch(target: str) -> None:
        mod_name, fn_name = target.split(":")
        module = importlib.import_module(mod_name)
        real = getattr(module, fn_name, None)
        if real is None:  # a name this version of the code does not have; the test checks the kill came
            return

        def wrapper(*a, **kw):
            calls[0] += 1
            if calls[0] == n and not after:
                os.kill(os.getpid(), signum)
            out = real(*a, **kw)
            if calls[0] == n and after:
                os.kill(os.getpid(), signum)
            return out

        setattr(module, fn_name, wrapper)

    for target in targets:
        patch(target)
    if os.environ.get("CALLS_FILE"):
        path = os.environ["CALLS_FILE"]
        atexit.register(lambda: open(path, "w").write(str(calls[0])))


def parse(args: list[str]) -> tuple[dict, list[str]]:
    """This script's arguments: :func:`install`'s keywords (and ``targets``, ``n``), and the command's."""
    split = args.index("--")
    opts, cli_args = args[:split], args[split + 1:]
    rest = opts[2:]
    spec = {"targets": opts[0].split(","), "n": int(opts[1]), "after": "--after" in rest,
            "sig": rest[rest.index("--signal") + 1] if "--signal" in rest else "KILL",
            "attrs": tuple(rest[i + 1] for i, opt in enumerate(rest) if opt == "--attr")}
    return spec, cli_args


def main() -> int:
    spec, cli_args = parse(sys.argv[1:])
    install(**spec)
    from dps_tune.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
