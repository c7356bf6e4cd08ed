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
