"""Errors that mean "the user asked for something wrong", not "dps_tune is broken".

The CLI turns every :class:`UserError` into one line on stderr and a non-zero exit,
with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class for errors caused by input: config, data, checkpoints, launch settings."""


class ConfigError(UserError):
    """A config key, value or combination is invalid."""


class DataError(UserError):
    """A dataset file, image or split is missing or unreadable."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, unreadable or does not match the model."""


class TrainingError(UserError):
    """Training cannot continue (for example the loss became NaN)."""


class LaunchError(UserError):
    """A sweep cannot be launched as asked (resources, cluster, storage)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters, or its type name.

    When a DataLoader worker re-raised the error, its message is the worker's whole
    traceback; the cause is then the last line.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    line = text.splitlines()[0].strip() if text else ""
    return line[:limit] if line else type(exc).__name__


class Interrupted(Exception):
    """The user stopped a run with Ctrl-C; what it had done is saved, and ``resume`` continues it.

    Not a :class:`UserError`: the CLI prints its own short block and exits 130.
    """

    def __init__(self, what: str, location: str, finished: int, to_go: int):
        super().__init__(f"{what} interrupted: {finished} trial(s) finished, {to_go} to go")
        self.what, self.location, self.finished, self.to_go = what, location, finished, to_go
