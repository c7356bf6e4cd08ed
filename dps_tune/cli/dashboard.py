"""The ``dashboard`` command: a live web page of sweeps, served from this process."""

from __future__ import annotations

import argparse
import sys

from dps_tune.cli.base import Command
from dps_tune.errors import UserError


class DashboardCommand(Command):
    name = "dashboard"
    help = "a live dashboard of sweeps: optuna-dashboard per experiment and the report, behind a token"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="sweep directories (running or finished)")
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; see the README's SSH tunnel)")
        p.add_argument("--port", type=int, default=8788, help="port (default 8788; 0: any free port)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.sweep import dashboard

        if not 0 <= args.port <= 65535:
            raise UserError(f"--port {args.port}: must be between 0 and 65535")

        def ready(url: str) -> None:
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"dashboard: listening on {args.host}, not only this machine: anyone who reaches it and has "
                      "the token sees these sweeps", file=sys.stderr)
            print(f"dashboard: {url}", flush=True)
            print("(the token is needed once per browser; Ctrl-C stops the server)", file=sys.stderr, flush=True)

        try:
            dashboard.serve(args.exp_dirs, host=args.host, port=args.port, ready=ready)
        except KeyboardInterrupt:
            pass
        return 0
