"""Experiments on whatever storage Ray Tune writes to: a local path, or a ``file://``, ``s3://`` or ``gs://`` URI.

Every file dps_tune reads from or writes to an experiment goes through this module and
``pyarrow.fs``, the filesystem layer Ray Tune itself uses, so a URI works like a path:

* **Reading** (``results``, ``best``, ``report``, ``resume``): :func:`local_view` returns a
  local path as it is; a URI is mirrored into the cache, small files only (configs,
  results, metrics, the Optuna study). A weights file stays on the storage and is stood
  for by ``model.safetensors.remote``; :func:`fetch_weights` downloads the one a command
  needs (the checkpoint ``best --export`` writes out, say).
* **Writing** (``sweep``, ``resume``): the driver keeps ``dps_tune_sweep.json`` and
  ``optuna.db`` in a local staging folder (:func:`staging_dir`; SQLite needs a local
  file) and :func:`upload` copies them to the experiment as the sweep goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from dps_tune.errors import UserError, first_line
from dps_tune.files import atomic_path, file_lock
from dps_tune.layout import METRICS_FILE, MODEL_FILE, STATE_FILE
from dps_tune.paths import cache_dir, is_remote

logger = logging.getLogger(__name__)

WEIGHT_FILES = (MODEL_FILE, STATE_FILE)
REMOTE_SUFFIX = ".remote"  # in a mirror, ``model.safetensors.remote`` stands for the file on the storage
SOURCE_FILE = ".dps_tune_source"  # in a mirror's root: the URI it mirrors


# Filesystems no URI describes (a SubTreeFileSystem, an S3 endpoint with options of its own),
# reachable in this process as ``mounted://NAME/path``; see :func:`mount`.
MOUNT_SCHEME = "mounted://"
_MOUNTED: dict[str, pafs.FileSystem] = {}


def mount(name: str, fs: pafs.FileSystem) -> str:
    """Make ``fs`` a storage of this process: ``mounted://NAME/path`` is ``path`` inside it.

    For the Python API (``ray_tune.run_sweep(storage_path="mounted://NAME/runs")``): Ray Tune
    gets ``fs`` as its ``storage_filesystem``, and every reader here resolves through it.
    """
    _MOUNTED[name] = fs
    return f"{MOUNT_SCHEME}{name}"


def mounted(location: str | os.PathLike) -> bool:
    return str(location).startswith(MOUNT_SCHEME)


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for ``location`` (a path or a URI)."""
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    if mounted(location):
        name, _, path = str(location)[len(MOUNT_SCHEME):].partition("/")
        if name not in _MOUNTED:
            raise UserError(f"storage {str(location)!r}: nothing is mounted as {name!r} in this process")
        return _MOUNTED[name], path.rstrip("/")
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError, NotImplementedError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"storage {str(location)!r}: not a storage URI pyarrow can open ({first_line(exc)})") from None
    return fs, path.rstrip("/")


def join(location: str, *parts: str) -> str:
    """``location`` (path or URI) with ``parts`` appended to its path, before a URI's query.

    ``join("s3://b/runs?scheme=http", "exp")`` is ``"s3://b/runs/exp?scheme=http"``: the
    query (``endpoint_override``, ``scheme``, ``region``) belongs to the storage, not to a file.
    """
    base, mark, query = str(location).partition("?") if is_remote(location) else (str(location), "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def staging_dir(location: str) -> Path:
    """A local folder that stands for the remote experiment ``location`` while a driver writes it."""
    return cache_dir() / "staging" / _key(location)


@contextlib.contextmanager
def driver_lock(location: str) -> Iterator[None]:
    """Hold the right to drive the experiment at ``location`` (launch, run or resume it) on this machine.

    An advisory lock under the cache directory, not in the experiment: a second
    ``dps-tune sweep --name N`` (or ``resume``) of the same experiment while the first
    runs is refused at once, before it touches anything, and a refused launch leaves
    nothing in the storage. The lock goes with the process, however it ends.
    """
    lock = cache_dir() / "locks" / f"{_key(location)}.lock"
    with file_lock(lock, blocking=False) as held:
        if not held:
            raise UserError(f"experiment {location}: another dps-tune process on this machine is running it; "
                            "wait for it to end, or pass another --name")
        yield


def upload(local: Path, location: str) -> None:
    """Copy the local file ``local`` to ``location``, replacing what is there."""
    fs, path = resolve(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


PROBE_FILE = ".dps_tune_probe"


def check_round_trip(location: str) -> None:
    """On S3, write one small object into ``location`` and read it back; refuse a store that returns other bytes.

    The AWS SDK (pyarrow's, so Ray's) sends uploads as ``aws-chunked`` bodies with a checksum
    trailer unless ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``; an S3-compatible store
    that does not decode them keeps the framing as the object, and no checkpoint would load.
    One object, before any training, finds that out.
    """
    fs, root = resolve(location)
    if fs.type_name != "s3":
        return
    probe, sent = f"{root}/{PROBE_FILE}", b"dps_tune storage check\n"
    try:
        new = fs.get_file_info(root).type == pafs.FileType.NotFound
        with fs.open_output_stream(probe) as out:
            out.write(sent)
        with fs.open_input_stream(probe) as f:
            got = f.read()
        fs.delete_file(probe)
        if new:  # pyarrow keeps an emptied S3 "directory" as a marker object: not ours to leave behind
            fs.delete_dir(root)
    except OSError as exc:
        raise UserError(f"storage {location}: cannot write a file there and read it back ({first_line(exc)})") from None
    if got != sent:
        raise UserError(f"storage {location}: a file written there reads back changed ({len(sent)} bytes written, "
                        f"{len(got)} read): the store keeps the AWS SDK's checksummed upload body; set "
                        "AWS_REQUEST_CHECKSUM_CALCULATION=when_required in the environment of every dps-tune "
                        "command and Ray node")


def download(location: str, local: Path) -> bool:
    """Copy the file at ``location`` to ``local``; False when there is no such file."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def write_text(location: str, text: str) -> None:
    """Write ``text`` to the file at ``location``: atomically on a local disk, as one object on a store."""
    write_fs_text(*resolve(location), text)


def write_fs_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    """:func:`write_text` for a path inside ``fs`` (what Ray Tune hands its callbacks)."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return
    with fs.open_output_stream(path) as out:  # an object store replaces an object whole
        out.write(text.encode())


def checkpoint_dirs(fs: pafs.FileSystem, trial_path: str) -> list[tuple[str, dict, bool]]:
    """A trial's checkpoints on ``fs``, oldest first: (path, metrics, whether it holds train state).

    A directory whose ``metrics.json`` is missing or damaged is left out.
    """
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in sorted((i for i in infos if i.type == pafs.FileType.Directory), key=lambda i: i.base_name):
        if not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as f:
                metrics = json.loads(f.read().decode())
        except (OSError, ValueError):
            continue
        state = fs.get_file_info(f"{info.path}/{WEIGHT_FILES[1]}").type == pafs.FileType.File
        found.append((info.path, metrics if isinstance(metrics, dict) else {}, state))
    return found


def delete_file(fs: pafs.FileSystem, path: str) -> bool:
    """Delete one file on ``fs``; False when it was not there (a checkpoint deleted meanwhile)."""
    return _delete(fs.delete_file, path)


def delete_checkpoint(fs: pafs.FileSystem, path: str) -> bool:
    """Delete a checkpoint directory and all it holds on ``fs``; False when it was not there."""
    return _delete(fs.delete_dir, path)


def _delete(delete, path: str) -> bool:
    try:
        delete(path)
    except FileNotFoundError:
        return False
    except OSError as exc:  # not fatal: the file only costs space
        logger.warning("could not delete %s: %s", path, first_line(exc))
        return False
    return True


def local_view(location: str | os.PathLike) -> Path:
    """A local folder holding the experiment at ``location``: the folder itself, or a fresh mirror of a URI.

    A mirror holds every file of the experiment but its weights, which are stood for by
    ``<name>.remote`` files; it is rebuilt on every call, so it shows what the storage
    holds now (checkpoints Ray deleted disappear from it too).
    """
    if not is_remote(location):
        return Path(location)
    fs, root = resolve(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise UserError(f"experiment {str(location)!r}: no such directory on the storage")
    mirror = cache_dir() / "mirrors" / _key(str(location))
    mirror.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(mirror) as tmp:
        tmp.mkdir()
        (tmp / SOURCE_FILE).write_text(str(location).rstrip("/"))
        count = 0
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(root):].lstrip("/")
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.name in WEIGHT_FILES:
                dst.with_name(dst.name + REMOTE_SUFFIX).write_text(str(info.size))
                continue
            pafs.copy_files(info.path, str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            count += 1
    logger.info("mirrored %d file(s) of %s into %s", count, location, mirror)
    return mirror


def has_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a complete model, here or (in a mirror) on the storage."""
    name = WEIGHT_FILES[0]
    return (checkpoint / name).is_file() or (checkpoint / (name + REMOTE_SUFFIX)).is_file()


def source(path: Path) -> str:
    """Where ``path`` really is: the storage URI for a file in a mirror, else the path itself."""
    for parent in [path, *path.parents]:
        marker = parent / SOURCE_FILE
        if marker.is_file():
            rel = path.relative_to(parent).as_posix()
            return marker.read_text().strip() if rel == "." else join(marker.read_text().strip(), rel)
    return str(path)


def fetch_weights(checkpoint: Path) -> Path:
    """``checkpoint`` with its weights on the local disk: downloaded into the mirror when they are remote."""
    for name in WEIGHT_FILES[:1]:
        marker = checkpoint / (name + REMOTE_SUFFIX)
        if (checkpoint / name).is_file() or not marker.is_file():
            continue
        remote = source(checkpoint / name)
        logger.info("downloading %s", remote)
        if not download(remote, checkpoint / name):
            raise UserError(f"checkpoint {source(checkpoint)!r}: {name} is no longer on the storage")
    return checkpoint


def _key(location: str) -> str:
    return hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:16]
