"""Where dps_tune keeps things it builds once and reuses: worlds, rankings, pretrained models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DPS_TUNE_CACHE``, else ``$XDG_CACHE_HOME/dps_tune``, else ``~/.cache/dps_tune``."""
    explicit = os.environ.get("DPS_TUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "dps_tune").resolve()
