"""Reading a prepared image cache (see :mod:`dps_tune.data.cache_format`): checked, memory-mapped, batched.

:func:`open_for` opens a cache for a dataset and refuses it when it no longer matches the
files it was built from. The loaders yield the same ``(images, labels, index)`` batches
as the JPEG loaders in :mod:`dps_tune.data.datasets`, already on the trial's device and
augmented there.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dps_tune.data.cache_format import MANIFEST, MISSING, distinct_images, read_manifest, shard_ok, stat_files
from dps_tune.data.records import DatasetSpec, Records
from dps_tune.data.sampling import EpochSampler
from dps_tune.errors import DataError

logger = logging.getLogger(__name__)


class ImageCache:
    """A finished cache, opened read-only. Rows are uint8 [size, size, 3] images.

    Shards are memory-mapped, so opening is cheap and all processes on a node share
    one copy in the page cache.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], shards: list[np.ndarray]):
        self.root, self.manifest, self._shards = root, manifest, shards
        self.size: int = manifest["size"]
        self.shard_rows: int = manifest["shard_rows"]
        self.content_hash: str = manifest["content_hash"]
        self._row_of = {p: i for i, p in enumerate(manifest["paths"])}
        self.skipped: frozenset[int] = frozenset(row for s in manifest["shards"] for row, _ in s["skipped"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ImageCache":
        """Open the cache at ``path``; :class:`DataError` if it is missing, incomplete or damaged."""
        root = Path(path)
        manifest = read_manifest(root)
        if manifest is None:
            raise DataError(f"data.image_cache = {str(root)!r}: no {MANIFEST} (build it with `dps-tune prepare`)")
        if not manifest.get("complete"):
            done = sum(s is not None for s in manifest["shards"])
            raise DataError(f"data.image_cache = {str(root)!r}: incomplete, {done} of {len(manifest['shards'])} "
                            "shards written; finish it with `dps-tune prepare`")
        shards = []
        for entry in manifest["shards"]:
            file = root / entry["file"]
            if not shard_ok(file, entry["rows"], manifest["size"]):
                raise DataError(f"data.image_cache = {str(root)!r}: shard {entry['file']} is missing or damaged; "
                                "rerun `dps-tune prepare --verify`")
            shards.append(np.load(file, mmap_mode="r"))
        return cls(root, manifest, shards)

    def __len__(self) -> int:
        return len(self.manifest["paths"])

    def rows(self, paths: Sequence[str]) -> np.ndarray:
        """Cache rows of ``paths``: [N] int64."""
        try:
            return np.fromiter((self._row_of[p] for p in paths), dtype=np.int64, count=len(paths))
        except KeyError as exc:
            raise DataError(f"data.image_cache = {str(self.root)!r}: has no image {exc.args[0]!r}; "
                            "rerun `dps-tune prepare` for this config") from None

    def read(self, rows: Sequence[int] | np.ndarray, *, pin_memory: bool = False) -> torch.Tensor:
        """Images at ``rows``: uint8 [B, size, size, 3] on the CPU, in pinned memory if asked.

        One memory copy per image, straight from the mapped shard into the batch.
        """
        out = torch.empty((len(rows), self.size, self.size, 3), dtype=torch.uint8, pin_memory=pin_memory)
        dst = out.numpy()
        for i, row in enumerate(np.asarray(rows).tolist()):
            shard, local = divmod(row, self.shard_rows)
            dst[i] = self._shards[shard][local]
        return out

    def check(self, spec: DatasetSpec) -> DatasetSpec:
        """``spec`` without the images prepare skipped; :class:`DataError` if the cache is stale for it.

        Stale means: an image ``spec`` uses is not in the cache, or its file's size or
        mtime, or its label, differs from what the cache was prepared from.
        """
        images = distinct_images(spec)
        stats = stat_files([p for p, _, _ in images])
        m = self.manifest
        missing, changed = [], []
        for (path, label, row), (nbytes, mtime) in zip(images, stats):
            i = self._row_of.get(path)
            if i is None:
                missing.append(path)
            elif (nbytes, mtime) != (m["bytes"][i], m["mtimes_ns"][i]):
                was = "missing" if m["bytes"][i] == MISSING else f"{m['bytes'][i]} bytes"
                now = "missing" if nbytes == MISSING else f"{nbytes} bytes"
                changed.append(f"{path!r} changed since prepare ({was}, now {now}"
                               f"{', new mtime' if was == now else ''})")
            elif label != m["labels"][i]:
                changed.append(f"{path!r} ({row}) has label {label}, the cache has {m['labels'][i]}")
        where = f"data.image_cache = {str(self.root)!r}"
        if missing:
            raise DataError(f"{where}: stale, {len(missing)} image(s) of this config are not in it, e.g. "
                            f"{missing[0]!r}; rerun `dps-tune prepare` for this config")
        if changed:
            raise DataError(f"{where}: stale, {len(changed)} image(s) differ from the cache, e.g. {changed[0]}; "
                            "rerun `dps-tune prepare`")
        if not self.skipped:
            return spec
        bad = {m["paths"][i] for i in self.skipped}
        dropped = sum(p in bad for p, _, _ in images)
        if dropped:
            logger.warning("%s: leaving out %d image(s) that prepare skipped as unreadable", where, dropped)
        splits = {name: _without(records, bad) for name, records in spec.splits.items()}
        for name, records in splits.items():
            if len(records) == 0:
                raise DataError(f"{where}: every image of split {name!r} was skipped as unreadable")
        return DatasetSpec(spec.classnames, spec.templates, _without(spec.train_images, bad),
                           _without(spec.train_pairs, bad), splits)


def _without(records: Records, bad: set[str]) -> Records:
    keep = [i for i, p in enumerate(records.paths) if p not in bad]
    if len(keep) == len(records):
        return records
    if not keep:
        raise DataError("every training image was skipped as unreadable by `dps-tune prepare`")

    def pick(values: Sequence) -> tuple:
        return tuple(values[i] for i in keep)

    return Records(pick(records.paths), pick(records.labels), pick(records.rows),
                   pick(records.captions) if records.captions is not None else None)


def open_for(path: str | os.PathLike, spec: DatasetSpec, *, model_size: int | None = None
             ) -> tuple[ImageCache, DatasetSpec]:
    """Open the cache at ``path`` for ``spec``: refuse it if stale, drop skipped images.

    Returns the cache and the spec to train on. Warns when the cached squares are
    smaller than the model's input, which would upsample every image.
    """
    cache = ImageCache.open(path)
    spec = cache.check(spec)
    if model_size is not None and cache.size < model_size:
        logger.warning("data.image_cache holds %d px squares but the model takes %d px: images are upsampled; "
                       "prepare with --size %d or more", cache.size, model_size, model_size)
    logger.info("image cache %s: %d images, %d px, content %s", cache.root, len(cache), cache.size,
                cache.content_hash[:12])
    return cache, spec


# ------------------------------------------------------------------------ loaders


class CachedTrainLoader:
    """One epoch of training batches from the cache, in the JPEG loader's order.

    Yields ``(images [B, 3, H, W] float32 on device, labels [B] on device, record index [B])``.
    Order and crops come from :class:`dps_tune.data.sampling.EpochSampler`, so batch ``k`` of
    epoch ``e`` is the same batch the JPEG path yields and resuming at ``start_batch``
    continues exactly. The CPU only copies rows into a (pinned) buffer; cropping,
    resizing and normalising run on ``device``.
    """

    def __init__(self, cache: ImageCache, records: Records,
                 augment: Callable[[torch.Tensor, Sequence[int]], torch.Tensor], *, batch_size: int, seed: int,
                 epoch: int, start_batch: int = 0, device: torch.device | str = "cpu", pin_memory: bool = False):
        self.cache, self.augment = cache, augment
        self.rows = cache.rows(records.paths)  # [N]
        self.labels = torch.tensor(records.labels, dtype=torch.long)  # [N]
        self.batch_size = min(batch_size, len(records))
        self.sampler = EpochSampler(len(records), self.batch_size, seed, epoch, start_batch)
        self.device, self.pin_memory = torch.device(device), pin_memory

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pending: list[tuple[int, int]] = []
        for item in self.sampler:
            pending.append(item)
            if len(pending) == self.batch_size:
                yield self._batch(pending)
                pending = []

    def _batch(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.tensor([i for i, _ in items], dtype=torch.long)  # [B]
        pixels = self.cache.read(self.rows[index.numpy()], pin_memory=self.pin_memory)  # [B, S, S, 3] uint8
        pixels = pixels.to(self.device, non_blocking=True)
        images = self.augment(pixels, [s for _, s in items])  # [B, 3, H, W]
        return images, self.labels[index].to(self.device, non_blocking=True), index


class CachedEvalLoader:
    """Batches of one evaluation split from the cache, in record order; iterable many times.

    Yields ``(images [B, 3, H, W] float32 on device, labels [B], record index [B])``.
    """

    def __init__(self, cache: ImageCache, records: Records, transform: Callable[[torch.Tensor], torch.Tensor], *,
                 batch_size: int, device: torch.device | str = "cpu", pin_memory: bool = False):
        self.cache, self.transform = cache, transform
        self.rows = cache.rows(records.paths)  # [N]
        self.labels = torch.tensor(records.labels, dtype=torch.long)  # [N]
        self.batch_size, self.device, self.pin_memory = batch_size, torch.device(device), pin_memory

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.rows), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(self.rows)))  # [B]
            pixels = self.cache.read(self.rows[start:start + len(index)], pin_memory=self.pin_memory)
            images = self.transform(pixels.to(self.device, non_blocking=True))  # [B, 3, H, W]
            yield images, self.labels[index], index
