"""A ``ray start --head`` node on loopback that the test owns alone, and stops alone.

``ray stop`` stops every Ray process on the machine, the other pytest-xdist worker's
embedded Ray among them (seen: that worker's sweep lost its GCS mid-trial). So the head
runs with ``--block`` in a session of its own, every port it opens is chosen free, its
files live in a temp dir of its own, and stopping it is a SIGTERM to that session, on
which ``ray start --block`` stops its node's processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the environment's `ray`
STARTED = "Ray runtime started"
# On SIGTERM, `ray start` (Ray 2.60) first drains its node for up to 30 s, so that Serve replicas finish
# their requests. The test's SIGTERM reaches the GCS and the raylet at the same moment, and the drain
# then waited out its whole timeout: 33 s of every head's teardown. Nothing here serves requests.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def ray_head(*, num_cpus: int = 2, dashboard: bool = False, env: dict | None = None,
             ready_timeout: float = 360) -> Iterator[dict]:
    """Yield ``{"gcs": port, "dashboard": port, "address": "127.0.0.1:port", "temp": dir}`` of a running head.

    With ``dashboard`` the head serves the job API at ``http://127.0.0.1:<dashboard>``; the
    caller waits for that itself (it comes up after the node)."""
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true" if dashboard else "false",
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--num-cpus", str(num_cpus), "--temp-dir", temp,
         "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **NO_DRAIN, **(env or {})})
    output: list[str] = []
    started = threading.Event()

    def read() -> None:  # keeps the pipe drained for as long as the head runs
        for line in head.stdout:
            output.append(line)
            if STARTED in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + ready_timeout
        while not started.wait(1):
            assert head.poll() is None, "".join(output)[-3000:]
            assert time.time() < deadline, "ray start --head did not start:\n" + "".join(output)[-3000:]
        yield {"gcs": gcs, "dashboard": dash, "address": f"127.0.0.1:{gcs}", "temp": temp}
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        shutil.rmtree(temp, ignore_errors=True)
