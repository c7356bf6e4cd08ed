"""This process's Ray: an embedded one on loopback, or a running cluster; and stopping it."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import ray

from dps_tune.errors import LaunchError, first_line
from dps_tune.sweep.ray_tune.interrupts import put_off_ctrl_c


def loopback_only() -> None:
    """The embedded Ray serves this machine alone, so each of its processes binds to 127.0.0.1.

    Ray swaps 127.0.0.1 for the machine's own address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is 0: every process it starts reads that from the environment, and this one read it
    once, when Ray was imported.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# True while this process's Ray is one it started for itself (no address): see evaluates_here.
EMBEDDED = threading.Event()


def connect(address: str | None, dashboard: bool) -> None:
    """Start a local Ray (no address and no ``RAY_ADDRESS``) or connect to a running cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        EMBEDDED.set()
        loopback_only()
        # "local": without it, ray.init joins a cluster that `ray start` left running on this machine
        # (/tmp/ray/ray_current_cluster), someone else's perhaps.
        ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                       _node_ip_address="127.0.0.1",
                       logging_level=logging.WARNING, log_to_driver=True)
        url = getattr(ctx, "dashboard_url", None)
        if dashboard and url:
            print(f"Ray dashboard: http://{url} (token auth: `ray get-auth-token`)", file=sys.stderr)
        return
    package_dir = str(Path(__file__).resolve().parents[2])  # dps_tune/
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 runtime_env={"py_modules": [package_dir]})
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, OSError) as exc:
        hint = ""
        if address != "auto" and os.environ.get("RAY_AUTH_MODE") != "token":
            hint = ("; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN (or ~/.ray/auth_token): Ray sends its token to an explicit address only then")
        source = "--address" if address != os.environ.get("RAY_ADDRESS") else "RAY_ADDRESS"
        raise LaunchError(f"{source} {address}: cannot connect to the Ray cluster ({first_line(exc, 200)}){hint}") from None


def shutdown() -> None:
    """Stop this process's Ray. A Ctrl-C meanwhile is put off once, as while a run saves its state."""
    if not ray.is_initialized():
        return
    EMBEDDED.clear()
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = signal.signal(signal.SIGINT, put_off_ctrl_c("stopping Ray"))
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
