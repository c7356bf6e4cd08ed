"""Ctrl-C is a pause and a full storage one line: how a run stops, and what it says."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
import threading
from typing import Any, Iterator

from dps_tune.errors import UserError
from dps_tune.files import disk_full, space_left
from dps_tune.sweep.ray_tune.callbacks import STORAGE_FULL
from dps_tune.sweep.ray_tune.trial import is_full_storage


class _RayLines(logging.Filter):
    """Ray's lines on Ctrl-C name its own Python API (``Tuner.restore``): say it in dps-tune's words instead.
    A trial's failure on a full storage is no traceback: the run stops with one line (:class:`StorageFull`).
    Once stopped, Ray's warning that trials not yet started have no results is no news either."""

    stopped = False

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and is_full_storage(record.exc_info[1]):
            return False
        if text.startswith("Unhandled error") and (STORAGE_FULL.is_set() or is_full_storage(text)):
            return False  # the stopped trial's error, with Ray's frames: its error.txt and our one line say it
        if self.stopped and text.startswith("Failed to fetch metrics"):
            return False
        if text.startswith("Stop signal received"):
            self.stopped = True
            if STORAGE_FULL.is_set():
                return False
            print(f"dps-tune: Ctrl-C: stopping the trials and saving the {self.what}, so that `resume` continues it",
                  file=sys.stderr, flush=True)
            return False
        return not text.startswith(("Experiment has been interrupted", "Trials did not complete"))


# Ctrl-C presses since the run began; the third quits at once (see ctrl_c_pauses).
PRESSES = [0]


def put_off_ctrl_c(doing: str, after: str = "") -> Any:
    """A SIGINT handler that puts off the first Ctrl-C while ``doing`` and quits on the next."""

    def later(signum: int, frame: Any) -> None:
        PRESSES[0] += 1
        if PRESSES[0] > 1:
            raise KeyboardInterrupt
        print(f"dps-tune: still {doing}; Ctrl-C once more quits at once{after}", file=sys.stderr, flush=True)

    return later


@contextlib.contextmanager
def ctrl_c_pauses(what: str) -> Iterator[None]:
    """Ctrl-C while the trials run is a pause: Ray's own handler (installed by ``fit``) stops them and saves
    the experiment state, then hands SIGINT back to this one, which puts off a second Ctrl-C while that is
    under way, so what is saved is whole. A third quits at once (the last saved state still resumes).
    :func:`shutdown` goes on counting, so that a second Ctrl-C while Ray stops does not hide the pause."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    PRESSES[0] = 0
    STORAGE_FULL.clear()
    quiet = _RayLines(what)
    ray_logs = [logging.getLogger(name) for name in ("ray.tune.tune", "ray.tune.execution.tune_controller",
                                                     "ray.tune.analysis.experiment_analysis", "ray._private.worker")]
    previous = signal.signal(signal.SIGINT, put_off_ctrl_c(f"saving the {what}'s state",
                                                                 " (`resume` then goes on from the last state saved)"))
    for log in ray_logs:
        log.addFilter(quiet)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for log in ray_logs:
            log.removeFilter(quiet)


class StorageFull(UserError):
    """The experiment's storage filled up: one line naming it and its free space, and how to go on."""

    def __init__(self, location: str, what: str):
        super().__init__(f"storage {location} is full ({space_left(location)}): the {what} stopped; make "
                         f"room, then continue it with `dps-tune resume {shlex.quote(location)}`")


@contextlib.contextmanager
def full_storage_stops(location: str, what: str) -> Iterator[None]:
    """A full storage met by the driver itself (its callbacks, Ray's logs, the sweep file) is :class:`StorageFull`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise StorageFull(location, what) from None
