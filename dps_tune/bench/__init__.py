"""Benchmarks: ``python -m dps_tune.bench {rank,data,step,storage}``.

Each benchmark measures a baseline in the same run and prints a ratio against it,
because absolute timings on shared machines are noise.
"""

import logging
import sys


def setup_logging() -> None:
    """Our INFO lines on stderr (stdout carries the results); open_clip's chatter stays quiet."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("dps_tune").setLevel(logging.INFO)
