"""A decoded image cache: decode every image once, then let every trial read it by memory map.

``dps-tune prepare`` decodes each distinct image a config uses (training and evaluation
splits), resizes it so the shorter side is ``size``, centre-crops a square and stores
it as uint8 in ``.npy`` shards, laid out as :mod:`dps_tune.data.cache_format` says.

Guarantees:

* **Atomic.** A shard is written under a temporary name and renamed into place when
  full; the manifest, rewritten atomically after each shard, is what marks it done.
  A half-written shard is never read.
* **Resumable.** A prepare run that stops keeps its finished shards; the next run
  with the same sources continues with the rest.
* **Checked.** A trial compares the manifest with the files on disk (bytes, mtime,
  label) before training and refuses a stale or incomplete cache.
* **Shared.** Trials read shards (:mod:`dps_tune.data.cache_reader`) through ``np.load(mmap_mode="r")``: all trials on a
  node share one copy in the page cache, and every node that mounts the directory
  reads the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from dps_tune.data.cache_format import FORMAT, MANIFEST, VERSION, distinct_images, read_manifest, shard_ok, stat_files
from dps_tune.data.records import DatasetSpec
from dps_tune.errors import DataError
from dps_tune.files import TEMP_GLOB, atomic_path, file_lock, write_text

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 256
# About half a GiB per shard: few files, and an interrupted run loses little work.
SHARD_BYTES = 512 * 2**20


# ------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Sources:
    """The distinct images a dataset uses, in cache row order, with what identifies their files."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    rows: tuple[str, ...]  # where each image was named, for error messages
    sizes: tuple[int, ...]
    mtimes_ns: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def collect_sources(spec: DatasetSpec) -> Sources:
    images = distinct_images(spec)
    stats = stat_files([p for p, _, _ in images])
    return Sources(
        paths=tuple(p for p, _, _ in images),
        labels=tuple(y for _, y, _ in images),
        rows=tuple(r for _, _, r in images),
        sizes=tuple(s for s, _ in stats),
        mtimes_ns=tuple(m for _, m in stats),
    )


def _sources_hash(sources: Sources, size: int, shard_rows: int) -> str:
    blob = json.dumps([FORMAT, VERSION, size, shard_rows, sources.paths, sources.sizes, sources.mtimes_ns,
                       sources.labels], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------- decoding


def decode_square(path: str, size: int) -> np.ndarray:
    """The image at ``path``, shorter side resized to ``size``, centre square: uint8 [size, size, 3].

    JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding,
    never below the target size, which makes a 2048×1536 photo about twice as fast.
    """
    with Image.open(path) as im:
        scale = size / min(im.size)
        im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        rgb = im.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8)


def _decode_job(job: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str | None]:
    """Pool task: ``(row, image or None, error or None)``; errors travel back as text."""
    row, path, size = job
    try:
        return row, decode_square(path, size), None
    except FileNotFoundError:
        return row, None, "no such file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return row, None, f"unreadable ({' '.join(str(exc).split()) or type(exc).__name__})"


# ----------------------------------------------------------------------- manifest


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def _shard_bytes(rows: int, size: int) -> int:
    return rows * size * size * 3


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_text(root / MANIFEST, json.dumps(manifest, separators=(",", ":")) + "\n")


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_hash(manifest: dict[str, Any]) -> str:
    parts = [manifest["sources_hash"]] + [s["sha256"] for s in manifest["shards"]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# ------------------------------------------------------------------------ prepare


@dataclass(frozen=True)
class PrepareResult:
    """What a :func:`prepare` run left on disk."""

    path: Path
    images: int
    decoded: int  # images decoded by this run
    reused: int  # images kept from shards an earlier run finished
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of every image left out, this run or earlier
    shards: int
    nbytes: int
    content_hash: str


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One prepare per cache directory at a time."""
    with file_lock(root / ".lock", blocking=False) as held:
        if not held:
            raise DataError(f"image cache {str(root)!r}: another `dps-tune prepare` is writing it")
        yield


def prepare(spec: DatasetSpec, out: str | os.PathLike, *, size: int = DEFAULT_SIZE, workers: int | None = None,
            skip_bad: bool = False, verify: bool = False, progress: bool = True,
            shard_rows: int | None = None) -> PrepareResult:
    """Build (or finish, or check) the image cache of ``spec`` in the directory ``out``.

    Shards that an earlier run with the same sources finished are kept; ``verify``
    re-hashes them first and rebuilds any that no longer match. A cache built from
    other sources is replaced. An unreadable image raises :class:`DataError` naming
    it, unless ``skip_bad``: then its row stays zero, it is listed in the manifest and
    trials leave it out. ``workers`` decoding processes (default: all usable CPUs;
    0 decodes in this process).
    """
    if size < 1:
        raise DataError(f"--size {size}: must be >= 1")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rows_per_shard = shard_rows or max(1, SHARD_BYTES // _shard_bytes(1, size))
    with _exclusive(root):
        sources = collect_sources(spec)
        manifest = _start_manifest(root, sources, size, rows_per_shard, verify)
        todo = [i for i, s in enumerate(manifest["shards"]) if s is None]
        _write_manifest(root, manifest)
        decoded = _fill_shards(root, manifest, sources, todo, workers, skip_bad, progress)
        manifest["content_hash"] = _content_hash(manifest)
        manifest["complete"] = True
        _write_manifest(root, manifest)
    skipped = tuple((sources.paths[row], why) for s in manifest["shards"] for row, why in s["skipped"])
    return PrepareResult(root, len(sources), decoded, len(sources) - decoded, skipped, len(manifest["shards"]),
                         sum((root / s["file"]).stat().st_size for s in manifest["shards"]),
                         manifest["content_hash"])


def _shard_range(index: int, rows_per_shard: int, total: int) -> range:
    return range(index * rows_per_shard, min(total, (index + 1) * rows_per_shard))


def _start_manifest(root: Path, sources: Sources, size: int, rows_per_shard: int, verify: bool) -> dict[str, Any]:
    """The manifest this run works from: the existing one if it matches ``sources``, else a fresh one."""
    sources_hash = _sources_hash(sources, size, rows_per_shard)
    for stray in root.glob(TEMP_GLOB):  # left by a run that stopped mid-shard
        stray.unlink()
    old = read_manifest(root)
    num_shards = math.ceil(len(sources) / rows_per_shard)
    shards: list[dict[str, Any] | None] = [None] * num_shards
    if old is not None and old.get("sources_hash") == sources_hash:
        for i, entry in enumerate(old["shards"]):
            rows = len(_shard_range(i, rows_per_shard, len(sources)))
            if entry is not None and shard_ok(root / entry["file"], rows, size):
                if verify and _hash_file(root / entry["file"]) != entry["sha256"]:
                    logger.warning("%s: content hash does not match the manifest; rebuilding it", entry["file"])
                    continue
                shards[i] = entry
        kept = sum(s is not None for s in shards)
        if kept:
            logger.info("image cache %s: %d of %d shards already done, continuing", root, kept, num_shards)
    else:
        if old is not None:
            logger.warning("image cache %s was prepared from other sources or settings; rebuilding it", root)
        for old_shard in root.glob("shard-*.npy"):
            old_shard.unlink()
    return {
        "format": FORMAT,
        "version": VERSION,
        "size": size,
        "shard_rows": rows_per_shard,
        "count": len(sources),
        "sources_hash": sources_hash,
        "paths": list(sources.paths),
        "bytes": list(sources.sizes),
        "mtimes_ns": list(sources.mtimes_ns),
        "labels": list(sources.labels),
        "shards": shards,
        "skipped": sum(len(s["skipped"]) for s in shards if s is not None),
        "complete": False,
        "content_hash": None,
    }


def _decoders(workers: int) -> ProcessPoolExecutor:
    """``workers`` decoding processes. fork: the children only run PIL and numpy, and start in
    milliseconds instead of re-importing torch as spawned children would.

    Not ``multiprocessing.Pool``: when an unreadable image stops ``prepare`` early, leaving a Pool
    terminates it, and a child that gets SIGTERM before it has finished starting can miss it (the
    fork keeps the parent's Python handler, Ray's after ``ray.init``) and wait for a job for ever.
    The suite hung there once, and a loop of 300 Pools stopped after their first result hung 4
    times. The executor is shut down instead: jobs not started are cancelled and the running ones
    end (0 hangs in the same loop)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _reserve(path: Path) -> None:
    """Give the sparse file at ``path`` its disk blocks now. On a full disk, writing through a memory map
    is a SIGBUS that kills the process; reserving first is an ENOSPC, reported as one line."""
    if not hasattr(os, "posix_fallocate"):
        return
    with path.open("rb+") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, path.stat().st_size)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path.parent)) from None


def _fill_shards(root: Path, manifest: dict[str, Any], sources: Sources, todo: list[int], workers: int | None,
                 skip_bad: bool, progress: bool) -> int:
    """Decode and write the shards ``todo``, recording each in the manifest as it lands; returns images decoded."""
    size, rows_per_shard = manifest["size"], manifest["shard_rows"]
    jobs = [(row, sources.paths[row], size) for i in todo for row in _shard_range(i, rows_per_shard, len(sources))]
    if not jobs:
        return 0
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, len(jobs))
    from tqdm.auto import tqdm

    done_before = len(sources) - len(jobs)
    with contextlib.ExitStack() as stack:
        if workers > 0:
            decoders = _decoders(workers)
            stack.callback(decoders.shutdown, wait=True, cancel_futures=True)
            results: Iterator = decoders.map(_decode_job, jobs, chunksize=4)
        else:
            results = map(_decode_job, jobs)
        bar = stack.enter_context(tqdm(total=len(sources), initial=done_before, unit="img", disable=not progress,
                                       desc=f"prepare {root.name}", dynamic_ncols=True))
        for index in todo:
            span = _shard_range(index, rows_per_shard, len(sources))
            final = root / _shard_name(index)
            skipped: list[list[Any]] = []
            with atomic_path(final) as tmp:
                shard = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(span), size, size, 3))
                _reserve(tmp)
                for local, (row, image, error) in zip(range(len(span)), results):
                    if error is not None:
                        if not skip_bad:
                            raise DataError(f"image {sources.paths[row]!r} ({sources.rows[row]}): {error}; fix or "
                                            "remove it, or rerun with --skip-bad to leave it out")
                        logger.warning("skipping image %s (%s): %s", sources.paths[row], sources.rows[row], error)
                        skipped.append([row, error])
                        shard[local] = 0
                    else:
                        shard[local] = image
                    bar.update(1)
                shard.flush()
                del shard  # close the map before the rename
                with tmp.open("rb+") as fh:
                    os.fsync(fh.fileno())
            manifest["shards"][index] = {"file": final.name, "rows": len(span), "sha256": _hash_file(final),
                                         "skipped": skipped}
            manifest["skipped"] += len(skipped)
            _write_manifest(root, manifest)
    return len(jobs)
