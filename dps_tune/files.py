"""Small file primitives used everywhere: atomic writes and advisory locks.

A reader of any file dps_tune writes sees either the old content or the new one,
never a half-written file: content goes to a temporary name in the same directory
and is renamed into place (``os.replace`` is atomic on POSIX filesystems).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from dps_tune.errors import UserError, first_line
from dps_tune.paths import is_remote


# Matches every temporary name :func:`temporary_sibling` makes: strays of a killed writer.
TEMP_GLOB = ".*.tmp-*"


def temporary_sibling(path: Path) -> Path:
    """A name next to ``path`` that no other process uses and no reader mistakes for it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a directory); rename it to ``path`` on success.

    On an exception the temporary is removed and ``path`` is left as it was. An
    existing directory at ``path`` is replaced.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def new_directory(path: str | os.PathLike, *, keep: Callable[[], bool] = lambda: False) -> Iterator[Path]:
    """``mkdir -p path`` for the block; a :class:`UserError` in it removes what the mkdir made, unless ``keep()``.

    So a command refused after it created its output directory (by bad data found late,
    say) leaves nothing behind; ``keep`` says when there is something worth keeping.
    """
    path = Path(path)
    absolute = path.absolute()
    made = next((p for p in reversed([absolute, *absolute.parents]) if not p.exists()), None)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except UserError:
        if made is not None and not keep():
            shutil.rmtree(made, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json_object(path: str | os.PathLike, where: str) -> dict[str, Any]:
    """The JSON object in ``path``: one :class:`UserError` naming ``where`` and the file when it is missing,
    cut short, not JSON or not an object. The JSON files of experiments and checkpoints are read here, or by
    :func:`json_object_or_none` where a damaged one is to be passed over (the image cache's manifest has a
    format and an error of its own, :mod:`dps_tune.data.cache_writer`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where}: {path.name} is unreadable ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path.name} is not a JSON object")
    return data


def json_object_or_none(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, cut short, not JSON or not an object.

    For the readers that must survive damage: a checkpoint a killed writer left half
    written is passed over, and the commands that read it for real say what is wrong.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (created if missing).

    Yields True when the lock is held. With ``blocking=False`` it yields False at once
    if another process holds it, and the caller decides what to do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it wraps, is a full disk (ENOSPC, or a quota), however Ray, pyarrow or
    safetensors wrap it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded",
                                             "database or disk is full")):  # the last: SQLite's, via Optuna
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
    return False


def space_left(location: str | os.PathLike) -> str:
    """``"1.2 MB free of 8.0 MB"`` (KB on a disk under 1 MB) for a path on a local disk; an object store does
    not say."""
    if is_remote(location):
        return "free space not known"
    path = Path(location).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    unit, size = ("MB", 1e6) if usage.total >= 1e6 else ("KB", 1e3)
    return f"{usage.free / size:.1f} {unit} free of {usage.total / size:.1f} {unit}"


@contextlib.contextmanager
def full_disk_names(path: str | os.PathLike) -> Iterator[None]:
    """A full disk met in the block, however wrapped, is an ``OSError`` (ENOSPC) naming ``path``: the line
    ``dps-tune`` prints for it then names that disk and its free space."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
