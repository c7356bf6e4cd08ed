"""What every ``dps-tune`` command shares: the :class:`Command` base, common options, printing."""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path

from dps_tune.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dps-tune CMD: error: ...``) and exit 2, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def check_name(name: str | None) -> None:
    """An experiment name is one directory name: no separator, not . or .."""
    if name is not None and (not name.strip() or "/" in name or os.sep in name or name in (".", "..")):
        raise UserError(f"--name {name}: must be a single directory name (no '/', not '.' or '..')")


def check_address(address: str | None) -> None:
    """An explicit Ray address (``--address`` or ``$RAY_ADDRESS``) accepts connections, checked before Ray starts.

    ``ray.init`` retries an address nobody listens on for a long while; one TCP connect
    answers at once. ``auto`` and ``local`` are left to Ray.
    """
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{source} {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise UserError(f"{source} {address}: nothing accepts connections there ({exc.strerror or exc}); "
                        "is the cluster up (`ray status` on its head node)?") from None


def check_out_dir(key: str, path: str) -> None:
    """An output directory may be missing (it is created) or a directory, never a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{key} {path}: a file, not a directory")


def check_out_file(key: str, path: str) -> None:
    """An output file may be missing or a file, never a directory; its folder must not be a file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{key} {path}: is a directory; give a file name")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{key} {path}: cannot create its directory ({parent} is a file)")


def add_set_option(parser: argparse.ArgumentParser, help: str = "override a config value; dotted keys "
                   "(optim.lr) or unique leaf names (lr); tune.* keys set the tune: block") -> None:
    """The ``--set KEY=VALUE`` option, repeatable, shared by every command that reads a config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


class Command:
    """A subcommand: :meth:`add_arguments` declares its options, :meth:`run` is its action."""

    name = ""
    help = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster: auto or ray://HOST:10001 (default: $RAY_ADDRESS, else start "
                                     "a local Ray)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the experiment's storage is a path every node mounts (NFS); required for a local path "
                        "on a multi-node cluster")


def print_sweep_summary(exp_dir: str, metric: str, mode: str) -> int:
    from dps_tune.paths import command_path, tensorboard_hint
    from dps_tune.sweep import results, storage

    table = results.results_table(storage.local_view(exp_dir), metric, mode)
    cmd = command_path()
    print()
    print(format_table(table.head(20)))
    errored = table[table["status"] == "error"]
    shown = shlex.quote(str(exp_dir))  # a URI's query holds '&': the commands must paste into a shell
    print(f"\nexperiment: {exp_dir}")
    print(f"  {cmd} results {shown}")
    print(f"  {cmd} best {shown} --export best")
    print(f"  {tensorboard_hint(shown)}")
    if len(errored):
        print(f"dps-tune: {len(errored)} trial(s) failed after their retries: "
              f"{', '.join(errored['trial_id'])} (see error.txt in their directories)", file=sys.stderr)
        return 1
    return 0


def format_table(df) -> str:
    if df.empty:
        return "(no trials)"
    show = df.copy()
    for col in show.columns:
        if show[col].dtype.kind == "f":
            show[col] = show[col].map(lambda v: "" if v != v else f"{v:.4g}")
        else:
            show[col] = show[col].map(lambda v: "" if v is None else v)
    return show.to_string(index=False)


def shutdown_ray() -> None:
    """Stop the Ray this process started, if it imported the Ray module at all."""
    if "dps_tune.sweep.ray_tune" in sys.modules:
        sys.modules["dps_tune.sweep.ray_tune"].shutdown()
