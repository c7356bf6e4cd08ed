"""One input pipeline for a trial: training batches and evaluation loaders, from JPEGs or the cache.

:func:`open_inputs` returns an :class:`Inputs` with two implementations behind it:

* :class:`JpegInputs` decodes image files in DataLoader workers on every epoch;
* :class:`CachedInputs` reads uint8 squares that ``dps-tune prepare`` decoded once
  (:mod:`dps_tune.data.cache_reader`) and augments them on the trial's device.

Both yield the same batches: batch ``k`` of epoch ``e`` holds the same records with the
same crops (see :class:`~dps_tune.data.sampling.EpochSampler`), so a run resumed at
``(epoch, start_batch)`` continues exactly, whichever path it takes.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Protocol

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from dps_tune.config import DataConfig
from dps_tune.data import augment, cache_reader
from dps_tune.data.datasets import TrainTransform, eval_loader, load_dataset, train_loader
from dps_tune.data.records import DatasetSpec, Records
from dps_tune.data.sampling import steps_per_epoch

logger = logging.getLogger(__name__)

# (images [B, 3, H, W] float32 on the device, labels [B] on the device, record index [B] on the CPU): the
# index picks each image's captions (FLYP); methods.Batch is what an objective's loss then takes.
IndexedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Inputs(Protocol):
    """What the training loop and the evaluation read; nothing else about images."""

    spec: DatasetSpec
    records: Records  # the training records: one per image (CE, DPS) or per image and caption (FLYP)
    batch_size: int
    steps_per_epoch: int

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[IndexedBatch]:
        """The batches of ``epoch`` from ``start_batch`` on, already on the device."""

    def eval_loaders(self, splits: Iterable[str] | None = None) -> dict[str, Iterable[IndexedBatch]]:
        """One re-iterable loader per evaluation split (or per split of ``splits``), in record order."""


def _chosen(all_splits: dict, splits: Iterable[str] | None) -> dict:
    if splits is None:
        return all_splits
    wanted = set(splits)
    return {split: records for split, records in all_splits.items() if split in wanted}


def image_size(pre: PreprocessCfg) -> int:
    return int(pre.size if isinstance(pre.size, int) else pre.size[0])


class _Common:
    def __init__(self, spec: DatasetSpec, data: DataConfig, *, captions: bool, seed: int, device: torch.device,
                 pin_memory: bool):
        self.spec, self.data, self.seed = spec, data, seed
        self.device, self.pin_memory = device, pin_memory
        self.records = spec.train_pairs if captions else spec.train_images
        self.batch_size = min(data.batch_size, len(self.records))
        self.steps_per_epoch = steps_per_epoch(len(self.records), data.batch_size)


class JpegInputs(_Common):
    """Images decoded from their files by ``data.workers`` DataLoader processes."""

    def __init__(self, spec: DatasetSpec, data: DataConfig, pre: PreprocessCfg, **kwargs):
        super().__init__(spec, data, **kwargs)
        self.train_transform = TrainTransform(image_size(pre), pre.mean, pre.std)
        self.eval_transform = image_transform_v2(pre, is_train=False)  # open_clip's own eval preprocessing

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[IndexedBatch]:
        loader = train_loader(self.records, self.train_transform, batch_size=self.data.batch_size,
                              workers=self.data.workers, seed=self.seed, epoch=epoch, start_batch=start_batch,
                              pin_memory=self.pin_memory)
        for images, labels, index in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), index

    def eval_loaders(self, splits: Iterable[str] | None = None) -> dict[str, Iterable[IndexedBatch]]:
        return {split: eval_loader(records, self.eval_transform, batch_size=self.data.eval_batch_size,
                                   workers=self.data.workers, pin_memory=self.pin_memory)
                for split, records in _chosen(self.spec.splits, splits).items()}


class CachedInputs(_Common):
    """Images read from a prepared cache by memory map and augmented on the device."""

    def __init__(self, cache: cache_reader.ImageCache, spec: DatasetSpec, data: DataConfig, pre: PreprocessCfg,
                 **kwargs):
        super().__init__(spec, data, **kwargs)
        self.cache = cache
        self.train_augment, self.eval_transform = augment.for_preprocess(pre)

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[IndexedBatch]:
        return iter(cache_reader.CachedTrainLoader(
            self.cache, self.records, self.train_augment, batch_size=self.data.batch_size, seed=self.seed,
            epoch=epoch, start_batch=start_batch, device=self.device, pin_memory=self.pin_memory))

    def eval_loaders(self, splits: Iterable[str] | None = None) -> dict[str, Iterable[IndexedBatch]]:
        return {split: cache_reader.CachedEvalLoader(self.cache, records, self.eval_transform,
                                                     batch_size=self.data.eval_batch_size, device=self.device,
                                                     pin_memory=self.pin_memory)
                for split, records in _chosen(self.spec.splits, splits).items()}


def open_inputs(data: DataConfig, pre: PreprocessCfg, *, captions: bool = False, seed: int = 0,
                device: torch.device | str = "cpu", pin_memory: bool = False) -> Inputs:
    """The input pipeline of ``data`` for a model with preprocessing ``pre``.

    With ``data.image_cache`` set, the cache is opened and checked against the files
    first: a stale cache is refused here, before any training, and images that
    ``dps-tune prepare --skip-bad`` left out are dropped. ``captions`` selects the
    FLYP records (one per image and caption).
    """
    spec = load_dataset(data)
    common = dict(captions=captions, seed=seed, device=torch.device(device), pin_memory=pin_memory)
    if data.image_cache is None:
        return JpegInputs(spec, data, pre, **common)
    cache, spec = cache_reader.open_for(data.image_cache, spec, model_size=image_size(pre))
    return CachedInputs(cache, spec, data, pre, **common)
