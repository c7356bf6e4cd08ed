"""Where dps_tune keeps things it builds once and reuses, and how a weights path looks."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Files open_clip (and dps_tune) load weights from.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def cache_dir() -> Path:
    """``$DPS_TUNE_CACHE``, else ``$XDG_CACHE_HOME/dps_tune``, else ``~/.cache/dps_tune``."""
    explicit = os.environ.get("DPS_TUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "dps_tune").resolve()


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI such as ``s3://bucket/x`` (not a path on this machine)."""
    return "://" in str(location)


def looks_like_weights_file(value: str) -> bool:
    """True when a ``pretrained`` value names a file rather than an open_clip tag."""
    return "/" in value or value.endswith(WEIGHT_SUFFIXES)


def command_path() -> str:
    """How to call ``dps-tune`` from this shell: its name if it is on PATH, else its path (e.g. .venv/bin/dps-tune)."""
    beside = Path(sys.executable).with_name("dps-tune")
    on_path = shutil.which("dps-tune")
    if on_path and Path(on_path).resolve() == beside.resolve():
        return "dps-tune"
    if not beside.is_file():
        return "dps-tune"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def tensorboard_hint(logdir: str | os.PathLike) -> str:
    """The TensorBoard command for ``logdir``, with its install step when it is not installed."""
    if shutil.which("tensorboard"):
        return f"tensorboard --logdir {logdir}"
    beside = Path(sys.executable).with_name("tensorboard")  # .venv/bin, not on this shell's PATH
    if beside.is_file():
        return f"{beside} --logdir {logdir}"
    return f"pip install tensorboard && tensorboard --logdir {logdir}   (not installed yet)"
