"""The records a dataset resolves to: what every image source yields and every image path reads.

:mod:`dps_tune.data.datasets` builds them from files on disk; the JPEG loaders, the image
cache (:mod:`dps_tune.data.cache_writer`, :mod:`dps_tune.data.cache_reader`) and the input
pipeline read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Records:
    """Images of one split. ``rows`` says where each record came from, for error messages."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    rows: tuple[str, ...]
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class DatasetSpec:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    train_images: Records  # one record per image: CE and DPS
    train_pairs: Records  # one record per (image, caption): FLYP
    splits: dict[str, Records] = field(default_factory=dict)
