"""The ``dps-tune`` command line: one small class per command, its arguments next to its action.

This package holds the parser and ``main``; the commands live in one module per group:
:mod:`~dps_tune.cli.training` (``train``, ``rank``, ``prepare``, ``pretrain``),
:mod:`~dps_tune.cli.sweeping` (``sweep``, ``resume``, ``demo``), :mod:`~dps_tune.cli.reading`
(``results``, ``best``, ``report``), :mod:`~dps_tune.cli.ensembling` (``wise``, ``soup``,
``confirm``) and :mod:`~dps_tune.cli.dashboard`; :mod:`~dps_tune.cli.base` holds what they share.

Every command checks its input first (values in :mod:`dps_tune.config`, the world in
:mod:`dps_tune.preflight`) and only then builds models, starts Ray or creates
directories. A :class:`~dps_tune.errors.UserError` ends the command with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from typing import Sequence

from dps_tune.cli.base import Command, Parser
from dps_tune.cli.dashboard import DashboardCommand
from dps_tune.cli.ensembling import Confirm, Soup, Wise
from dps_tune.cli.reading import Best, Report, Results
from dps_tune.cli.sweeping import Demo, Resume, SweepCommand
from dps_tune.cli.training import Prepare, Pretrain, Rank, Train
from dps_tune.errors import Interrupted, UserError, first_line


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("dps_tune").setLevel(logging.INFO)


COMMANDS: tuple[Command, ...] = (Train(), Rank(), Prepare(), SweepCommand(), Resume(), Results(), Best(), Report(),
                                 Wise(), Soup(), Confirm(), DashboardCommand(), Pretrain(), Demo())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dps-tune",
                    description="Robust fine-tuning of CLIP (CE, FLYP, DPS), swept with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages from all libraries")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"dps-tune: error: {' '.join(first_line(exc, 2000).split())}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(interrupted_block(exc), file=sys.stderr)
        return 130
    except OSError as exc:
        from dps_tune.files import disk_full, space_left

        if not disk_full(exc):
            raise
        where = exc.filename or "the output"
        print(f"dps-tune: error: the disk is full writing {where} ({space_left(where)}); nothing half-written is "
              "kept: make room, then run the same command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(rerun_block(args.command, list(sys.argv[1:] if argv is None else argv)), file=sys.stderr)
        return 130


def entry() -> None:
    """The ``dps-tune`` console script: :func:`main`, then an exit that skips tearing the interpreter down.

    Python frees torch's, open_clip's and Ray's modules one by one at exit: 2.8 s after
    importing open_clip alone, 4.0 s after the sweep module, on 2 cores, and nothing of
    it is work the command asked for. Here the exit handlers still run (Ray's shutdown,
    logging's flush) and stdout and stderr are flushed; then the process ends. Every file
    dps_tune writes is closed (and most renamed into place) before its command returns.
    An exception that escapes :func:`main` ends the process the usual way, with its traceback.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else 0)


# Commands whose finished work survives a Ctrl-C and that the same command line continues.
RERUN_CONTINUES = ("wise", "soup", "prepare")


def rerun_block(command: str, argv: list[str]) -> str:
    """What a Ctrl-C'd command prints: for one that keeps its finished work, the command that continues it."""
    import shlex

    from dps_tune.paths import command_path

    if command not in RERUN_CONTINUES:
        return "dps-tune: interrupted"
    return (f"\ndps-tune: {command} interrupted (Ctrl-C); what it finished is kept.\n"
            f"  continue it with: {command_path()} {shlex.join(argv)}")


def interrupted_block(exc: Interrupted) -> str:
    """What a Ctrl-C'd sweep or confirmation prints: where it stands and the command that continues it."""
    import shlex

    from dps_tune.paths import command_path

    return (f"\ndps-tune: {exc.what} interrupted (Ctrl-C): {exc.finished} trial(s) finished, {exc.to_go} to go; "
            f"its state is saved.\n  continue it with: {command_path()} resume {shlex.quote(exc.location)}")
