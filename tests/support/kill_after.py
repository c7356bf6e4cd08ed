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
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--")
    opts, cli_args = args[:split], args[split + 1:]
    targets, n = opts[0].split(","), int(opts[1])
    after = "--after" in opts[2:]
    sig = signal.SIGINT if "--signal" in opts and opts[opts.index("--signal") + 1] == "INT" else signal.SIGKILL
    if sig == signal.SIGINT:
        # As in a terminal's foreground job. A suite started in the background by a shell without job
        # control (`make test &`, nohup) starts every process with SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: the Ctrl-C would never arrive.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for i, opt in enumerate(opts[2:]):
        if opt == "--attr":
            where, value = opts[3 + i].split("=")
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
                os.kill(os.getpid(), sig)
            out = real(*a, **kw)
            if calls[0] == n and after:
                os.kill(os.getpid(), sig)
            return out

        setattr(module, fn_name, wrapper)

    for target in targets:
        patch(target)
    if os.environ.get("CALLS_FILE"):
        atexit.register(lambda: open(os.environ["CALLS_FILE"], "w").write(str(calls[0])))
    from dps_tune.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
