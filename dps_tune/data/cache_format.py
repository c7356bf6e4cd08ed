"""The image cache's format, which the writer and the reader share. Layout of a cache directory::

    manifest.json       sources (path, bytes, mtime, label per image), shard status, hashes
    shard-00000.npy     uint8 [rows, size, size, 3]; image i is row i of the manifest
    shard-00001.npy     ...

:func:`distinct_images` fixes the row order; :func:`stat_files` gives what identifies a
source file (bytes, mtime), recorded by ``dps-tune prepare``
(:mod:`dps_tune.data.cache_writer`) and compared by every trial that opens the cache
(:mod:`dps_tune.data.cache_reader`).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dps_tune.data.records import DatasetSpec, Records
from dps_tune.errors import DataError

FORMAT = "dps_tune.image_cache"
VERSION = 1
MANIFEST = "manifest.json"
MISSING = -1  # bytes and mtime recorded for a source file that did not exist


def _record_lists(spec: DatasetSpec) -> list[Records]:
    return [spec.train_images, spec.train_pairs, *spec.splits.values()]


def distinct_images(spec: DatasetSpec) -> tuple[tuple[str, int, str], ...]:
    """Every image ``spec`` uses, once, as ``(path, label, row)``: training first, then evaluation."""
    seen: dict[str, tuple[str, int, str]] = {}
    for records in _record_lists(spec):
        for path, label, row in zip(records.paths, records.labels, records.rows):
            seen.setdefault(path, (path, label, row))
    return tuple(seen.values())


def stat_files(paths: Sequence[str], threads: int = 16) -> list[tuple[int, int]]:
    """``(bytes, mtime_ns)`` of every path, ``(-1, -1)`` for a missing one.

    Stats run in threads: on a network mount each one is a round trip, and a dataset
    has ~10^5 files.
    """

    def chunk(part: Sequence[str]) -> list[tuple[int, int]]:
        out = []
        for p in part:
            try:
                st = os.stat(p)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((MISSING, MISSING))
        return out

    if len(paths) < 1000:
        return chunk(paths)
    step = math.ceil(len(paths) / threads)
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(chunk, [paths[i:i + step] for i in range(0, len(paths), step)])
    return [st for part in parts for st in part]


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"image cache manifest {str(path)!r}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"image cache manifest {str(path)!r}: not a dps_tune image cache")
    if manifest.get("version") != VERSION:
        raise DataError(f"image cache {str(root)!r}: format version {manifest.get('version')}, this dps_tune "
                        f"reads version {VERSION}; rebuild it with `dps-tune prepare`")
    return manifest


def shard_ok(path: Path, rows: int, size: int) -> bool:
    """A finished shard file of the expected shape (read from its .npy header only)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, size, size, 3) and arr.dtype == np.uint8
