"""``python -m dps_tune.bench data``: decoding JPEGs every epoch against reading the prepared cache.

Generates photo-sized JPEGs (2048×1536, about 1 MB each, like iWildCam's camera-trap
photos) in a temporary directory, then measures both paths in the same run:

* **jpeg**: one epoch through the ordinary training loader
  (:func:`dps_tune.data.datasets.train_loader`, W worker processes; W = 0 decodes in the main
  process): decode every file, random resized crop to 224 px, normalise. This is what
  every epoch of every trial pays without a cache.
* **cache**: ``prepare`` once (not part of the ratio: it is paid once per sweep), then
  epochs of batches read from the memory-mapped shards and augmented by
  :class:`dps_tune.data.augment.TrainAugment`, in the main process on one CPU thread: the
  path needs no workers. On a GPU trial the augmentation moves to the device and the
  CPU only copies memory.

Prints one line, ``data: jpeg X img/s, cache Y img/s, ratio Z× (workers W)``, where X
and Y are images/s per CPU core (the jpeg total divided by max(1, W) cores, the cache
total on its one core) and Z = Y / X.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from dps_tune.data import cache_reader, cache_writer
from dps_tune.data import datasets as data_mod
from dps_tune.data.augment import TrainAugment
from dps_tune.data.records import DatasetSpec, Records

logger = logging.getLogger(__name__)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A stand-in for a camera photo: smooth colour regions plus sensor-like noise.

    The noise keeps the JPEG about as large (about 1 MB at 2048×1536, quality 90) and
    as slow to decode as a real photo; flat synthetic images decode far faster.
    """
    coarse = rng.integers(0, 256, (height // 96 + 2, width // 96 + 2, 3), dtype=np.uint8)  # [h, w, 3]
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-16, 17, (height, width, 3), dtype=np.int16)  # [H, W, 3]
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_photos(folder: Path, count: int, width: int, height: int, seed: int = 0) -> Records:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        photo(rng, width, height).save(path, quality=90)
        paths.append(str(path))
    return Records(tuple(paths), tuple(i % 2 for i in range(count)), tuple(f"photo {i}" for i in range(count)))


def jpeg_rate(records: Records, *, model_size: int, batch_size: int, workers: int) -> float:
    """Images/s of one epoch through the ordinary loader, worker start-up included (it recurs every epoch)."""
    transform = data_mod.TrainTransform(model_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    start = time.perf_counter()
    loader = data_mod.train_loader(records, transform, batch_size=batch_size, workers=workers, seed=0, epoch=0)
    seen = sum(images.shape[0] for images, _, _ in loader)
    return seen / (time.perf_counter() - start)


def cache_rate(cache: cache_reader.ImageCache, records: Records, *, model_size: int, batch_size: int,
               min_seconds: float) -> float:
    """Images/s of whole epochs read from the cache and augmented, for at least ``min_seconds``."""
    augment = TrainAugment(model_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    seen, epoch = 0, 0
    start = time.perf_counter()
    while epoch == 0 or time.perf_counter() - start < min_seconds:
        loader = cache_reader.CachedTrainLoader(cache, records, augment, batch_size=batch_size, seed=0, epoch=epoch)
        seen += sum(images.shape[0] for images, _, _ in loader)
        epoch += 1
    return seen / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dps_tune.bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="JPEGs to generate (default: 48)")
    parser.add_argument("--workers", type=int, default=1,
                        help="loader worker processes (CPU cores) of the jpeg path (default: 1)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--size", type=int, default=cache_writer.DEFAULT_SIZE, help="cached square side (default: 256)")
    parser.add_argument("--model-size", type=int, default=224, help="model input side (default: 224, ViT-B/16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="least time to read the cache for (default: 2)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.workers < 0 or args.batch_size < 1:
        parser.error("--images and --batch-size must be >= 1 and --workers >= 0")
    batch_size = min(args.batch_size, args.images)

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="dps_tune_bench_data_") as tmp:
        records = write_photos(Path(tmp), args.images, args.width, args.height)
        jpeg_total = jpeg_rate(records, model_size=args.model_size, batch_size=batch_size, workers=args.workers)
        jpeg = jpeg_total / max(1, args.workers)  # per core
        spec = DatasetSpec(("a", "b"), ("{c}",), records, records, {})
        start = time.perf_counter()
        cache_writer.prepare(spec, Path(tmp) / "cache", size=args.size, workers=args.workers, progress=False)
        logger.info("prepare: %.1f img/s with %d workers", args.images / (time.perf_counter() - start), args.workers)
        cache = cache_reader.ImageCache.open(Path(tmp) / "cache")
        torch.set_num_threads(1)  # one core, so the figure is per core
        try:
            cached = cache_rate(cache, records, model_size=args.model_size, batch_size=batch_size,
                                min_seconds=args.seconds)
        finally:
            torch.set_num_threads(threads)
    print(f"data: jpeg {jpeg:.1f} img/s, cache {cached:.1f} img/s, ratio {cached / jpeg:.1f}× "
          f"(workers {args.workers})")
    return 0
