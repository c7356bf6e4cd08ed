"""Deterministic sampling: each epoch's order and each sample's crop from (run seed, epoch, position) alone.

The JPEG loaders (:mod:`dps_tune.data.datasets`) and the image cache's loaders
(:mod:`dps_tune.data.cache_reader`, cropping with :mod:`dps_tune.data.augment`) both draw
from here, so batch ``k`` of epoch ``e`` holds the same records with the same crops on
either path, and a run resumed mid-epoch continues with exactly the batches it would
have seen.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def crop_params(height: int, width: int, gen: torch.Generator, scale: tuple[float, float] = TRAIN_CROP_SCALE,
                ratio: tuple[float, float] = TRAIN_CROP_RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from an explicit generator.

    Same algorithm as torchvision's ``RandomResizedCrop.get_params``; the generator makes
    every sample's crop a function of (seed, epoch, position), so resumed and
    uninterrupted runs see the same augmentations.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


_ORDER, _AUGMENT = 0, 1  # independent random streams of one epoch


def sample_seed(seed: int, epoch: int, position: int, stream: int = _AUGMENT) -> int:
    """A seed that depends only on (run seed, epoch, position in the epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream, position]).generate_state(1)[0])


class EpochSampler(Sampler):
    """The permutation of one epoch as ``(record, aug_seed)``, from batch ``start_batch`` on.

    The order and the augmentation of each sample depend only on (seed, epoch), so a
    run resumed mid-epoch continues with exactly the batches it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, stream=_ORDER))
        order = torch.randperm(self.n, generator=gen).tolist()
        end = steps_per_epoch(self.n, self.batch_size) * self.batch_size
        for pos in range(self.start * self.batch_size, end):
            yield order[pos], sample_seed(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.n, self.batch_size) * self.batch_size - self.start * self.batch_size)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (a ragged last batch would skew the contrastive loss), at least one."""
    return max(1, n // batch_size) if n >= batch_size else 1
