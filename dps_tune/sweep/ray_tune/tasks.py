"""Jobs that are not trials (test figures, WiSE-FT and soup evaluations): as Ray tasks, or in this process."""

from __future__ import annotations

import os
from typing import Any

import ray

from dps_tune.errors import LaunchError, UserError, first_line
import dps_tune.sweep.ray_tune.connection as connection  # the module: tests replace its connect


def evaluates_here(address: str | None = None) -> bool:
    """Whether :func:`map_jobs` runs its jobs in this process rather than as Ray tasks.

    It does where Ray is (or would be) this process's own, on a machine without a GPU. A
    task there adds a worker process that imports torch and loads the model and the data
    again, about 10 CPU-seconds, and a task's one CPU runs torch on one thread; this
    process has them already and runs torch on every core. Measured on 2 cores: a tiny
    sweep's test figures took 11.5 s as tasks and 0.6 s here; WiSE-FT over the demo's
    three experiments (15 evaluations of 4,000 images) 65.4 s and 109 CPU-seconds as
    tasks, 66.4 s and 77 CPU-seconds here. A cluster (``address``, ``RAY_ADDRESS``) or a
    GPU gets Ray tasks; ``wise --ray-tasks`` asks for them on many cores.
    """
    if ray.is_initialized():
        return connection.EMBEDDED.is_set() and ray.cluster_resources().get("GPU", 0) < 1
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    import torch

    return not torch.cuda.is_available()


def map_jobs(fn: Any, jobs: list[dict], *, address: str | None = None, gpus: float | None = None,
             tasks: bool | None = None) -> Any:
    """Run ``fn(job)`` for every job; yield ``(job, result)`` as each one finishes.

    ``tasks`` None: as Ray tasks unless :func:`evaluates_here` says this process serves
    better; True: always as Ray tasks; False: always here, one after another.
    Ray tasks connect like a sweep (embedded Ray, ``--address`` or ``RAY_ADDRESS``). Each
    asks for one CPU and, where the cluster has GPUs, ``gpus`` (default one) of a GPU. Ray
    reuses worker processes, so what ``fn`` caches (a model, the evaluation data) serves
    the next job on the same worker. A failing job stops the run with its first line.
    """
    if not jobs:
        return
    if tasks is False or (tasks is None and evaluates_here(address)):
        for job in jobs:
            yield job, fn(job)
        return
    connection.connect(address, dashboard=False)
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    remote = ray.remote(num_cpus=1, num_gpus=(1 if gpus is None else gpus) if has_gpu else 0,
                        max_retries=1)(fn)
    pending = {remote.remote(job): job for job in jobs}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, UserError):
                    raise cause from None
                raise LaunchError(f"an evaluation task failed ({type(cause).__name__}: {first_line(cause, 300)})"
                                  ) from None
            yield job, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
