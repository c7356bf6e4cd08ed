"""``python -m dps_tune.cli ARGS``: the same as ``dps-tune ARGS``."""

from dps_tune.cli import entry

entry()
