"""Datasets: the FLYP CSV format, WILDS iWildCam v2.0 on disk, and the synthetic world.

Every dataset becomes a :class:`~dps_tune.data.records.DatasetSpec`: class names, prompt
templates, the training records (one per image for CE/DPS, one per image and caption for
FLYP) and one record list per evaluation split. The JPEG loaders here read images lazily,
so a missing or unreadable file is reported with its path and the row that named it; their
order and crops come from :mod:`dps_tune.data.sampling`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dps_tune.config import DataConfig
from dps_tune.data import synthetic
from dps_tune.data.records import DatasetSpec, Records
from dps_tune.data.sampling import EpochSampler, crop_params
from dps_tune.errors import DataError, first_line
from dps_tune.objectives import SPLITS

logger = logging.getLogger(__name__)

IWILDCAM_TEMPLATES = ("a photo of {c}.", "{c} in the wild.")
SIMPLE_TEMPLATES = ("a photo of a {c}.",)
# Our split names -> WILDS iWildCam split names.
IWILDCAM_SPLITS = {"train": "train", "id_val": "id_val", "id_test": "id_test", "ood_val": "val", "ood_test": "test"}


# ------------------------------------------------------------------------- loading


def template_set(name: str, dataset: str) -> tuple[str, ...]:
    if name == "auto":
        name = {"iwildcam": "iwildcam", "synthetic": "synthetic"}.get(dataset, "simple")
    return {"iwildcam": IWILDCAM_TEMPLATES, "synthetic": synthetic.TEMPLATES, "simple": SIMPLE_TEMPLATES}[name]


def load_dataset(cfg: DataConfig) -> DatasetSpec:
    """Resolve ``cfg`` to records on disk (generating the synthetic world if needed)."""
    if cfg.dataset == "iwildcam":
        return _load_iwildcam(cfg)
    if cfg.dataset == "synthetic":
        root = synthetic.generate(cfg.synthetic, cfg.root)
        return _load_csv_dataset(
            cfg,
            train_csv=root / "train.csv",
            eval_csvs={s: root / f"{s}.csv" for s in SPLITS},
            classnames=root / "classnames.txt",
            base=root,
        )
    base = Path(cfg.root) if cfg.root else None
    return _load_csv_dataset(
        cfg,
        train_csv=Path(cfg.train_csv),
        eval_csvs={s: Path(p) for s, p in cfg.eval_csvs},
        classnames=Path(cfg.classnames),
        base=base,
    )


def read_classnames(path: Path) -> tuple[str, ...]:
    """One name per line, or a CSV with columns ``y`` and ``english`` (or ``name``).

    As in the paper code, rows with ``y >= 99999`` are dropped and names lower-cased.
    """
    if not path.is_file():
        raise DataError(f"class names file {str(path)!r}: no such file")
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path)
        name_col = next((c for c in ("english", "name") if c in df.columns), None)
        if "y" not in df.columns or name_col is None:
            raise DataError(f"class names file {str(path)!r}: needs columns y and english (or name), "
                            f"has {', '.join(map(str, df.columns))}")
        df = df[df["y"] < 99999].sort_values("y")
        ys = df["y"].astype(int).tolist()
        if ys != list(range(len(ys))):
            missing = sorted(set(range(max(ys) + 1)) - set(ys)) if ys else [0]
            raise DataError(f"class names file {str(path)!r}: labels must be 0..N-1 without gaps "
                            f"(missing y={missing[:5]})")
        return tuple(str(n).strip().lower() for n in df[name_col])
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"class names file {str(path)!r}: empty")
    return tuple(names)


def _read_table(path: Path, sep: str, needed: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r}: no such file")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"CSV file {str(path)!r}: cannot be parsed ({first_line(exc)})") from None
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"CSV file {str(path)!r}: missing column(s) {', '.join(missing)}; "
                        f"has {', '.join(map(str, df.columns))} (separator {sep!r})")
    return df


def _labels(df: pd.DataFrame, col: str, path: Path, num_classes: int) -> list[int]:
    out = []
    for i, raw in enumerate(df[col]):
        try:
            y = int(raw)
        except ValueError:
            raise DataError(f"{path}: row {i + 2}: label {raw!r} is not an integer") from None
        if not 0 <= y < num_classes:
            raise DataError(f"{path}: row {i + 2}: label {y} outside 0..{num_classes - 1} (class names file has "
                            f"{num_classes} names)")
        out.append(y)
    return out


def _resolve(base: Path | None, csv_path: Path, p: str) -> str:
    path = Path(p)
    if path.is_absolute():
        return str(path)
    return str((base if base is not None else csv_path.parent) / path)


def _one_per_image(paths: list[str], labels: list[int], rows: list[str]) -> Records:
    """The first record of every distinct image path, in file order (captions dropped)."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    keep = sorted(first.values())
    return Records(tuple(paths[i] for i in keep), tuple(labels[i] for i in keep), tuple(rows[i] for i in keep))


def _load_csv_dataset(cfg: DataConfig, *, train_csv: Path, eval_csvs: dict[str, Path],
                      classnames: Path, base: Path | None) -> DatasetSpec:
    names = read_classnames(classnames)
    img, cap, lab = cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_label_key

    df = _read_table(train_csv, cfg.csv_separator, [img, cap, lab])
    paths = [_resolve(base, train_csv, p) for p in df[img]]
    labels = _labels(df, lab, train_csv, len(names))
    rows = [f"row {i + 2} of {train_csv}" for i in range(len(df))]
    pairs = Records(tuple(paths), tuple(labels), tuple(rows), tuple(df[cap]))
    # CE sees each image once per epoch, however many captions the FLYP file gives it.
    images = _one_per_image(paths, labels, rows)

    splits = {}
    for split in cfg.eval_splits:
        if split not in eval_csvs:
            raise DataError(f"data.eval_splits asks for {split!r} but no CSV is given for it "
                            f"(data.eval_csvs has {', '.join(eval_csvs) or 'nothing'})")
        path = eval_csvs[split]
        edf = _read_table(path, cfg.csv_separator, [img, lab])
        epaths = [_resolve(base, path, p) for p in edf[img]]
        elabels = _labels(edf, lab, path, len(names))
        erows = [f"row {i + 2} of {path}" for i in range(len(edf))]
        # An evaluation CSV in FLYP format may list an image once per caption.
        splits[split] = _one_per_image(epaths, elabels, erows)
    return DatasetSpec(names, template_set(cfg.templates, cfg.dataset), images, pairs, splits)


def find_iwildcam_dir(root: str | os.PathLike | None) -> Path:
    """``root/iwildcam_v2.0`` or ``root`` itself, whichever holds ``metadata.csv``."""
    if root is None:
        raise DataError("data.root is required for the iwildcam dataset")
    root = Path(root)
    for candidate in (root / "iwildcam_v2.0", root):
        if (candidate / "metadata.csv").is_file():
            return candidate
    raise DataError(f"data.root = {str(root)!r}: no iwildcam_v2.0/metadata.csv under it "
                    "(download WILDS iWildCam v2.0 and point data.root at the folder that holds iwildcam_v2.0)")


def _load_iwildcam(cfg: DataConfig) -> DatasetSpec:
    base = find_iwildcam_dir(cfg.root)
    meta_path = base / "metadata.csv"
    meta = pd.read_csv(meta_path)
    missing = [c for c in ("split", "filename", "y") if c not in meta.columns]
    if missing:
        raise DataError(f"{meta_path}: missing column(s) {', '.join(missing)}")
    if cfg.classnames is not None:
        names = read_classnames(Path(cfg.classnames))
    else:
        names = read_classnames(base / "categories.csv")
    too_big = meta[meta["y"] >= len(names)]
    if len(too_big):
        raise DataError(f"{meta_path}: row {too_big.index[0] + 2} has label {too_big['y'].iloc[0]} but only "
                        f"{len(names)} class names are known")

    def records(split: str, *, captions: bool = False) -> Records:
        sub = meta[meta["split"] == IWILDCAM_SPLITS[split]]
        paths = tuple(str(base / "train" / f) for f in sub["filename"])
        labels = tuple(int(y) for y in sub["y"])
        rows = tuple(f"row {i + 2} of {meta_path}" for i in sub.index)
        if not captions:
            return Records(paths, labels, rows)
        templates = IWILDCAM_TEMPLATES if cfg.templates == "auto" else template_set(cfg.templates, "iwildcam")
        # FLYP: every image once per template, captioned with that template.
        return Records(
            tuple(p for p in paths for _ in templates),
            tuple(y for y in labels for _ in templates),
            tuple(r for r in rows for _ in templates),
            tuple(t.format(c=names[y]) for y in labels for t in templates),
        )

    splits = {s: records(s) for s in cfg.eval_splits}
    for s, r in splits.items():
        if len(r) == 0:
            raise DataError(f"{meta_path}: split {s!r} (WILDS {IWILDCAM_SPLITS[s]!r}) has no rows")
    return DatasetSpec(names, template_set(cfg.templates, "iwildcam"), records("train"),
                       records("train", captions=True), splits)


# ---------------------------------------------------------------------- transforms


class TrainTransform:
    """RandomResizedCrop(scale 0.9–1.0, bicubic) to the model size, then the model's normalisation."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __call__(self, img: Image.Image, gen: torch.Generator) -> torch.Tensor:
        top, left, h, w = crop_params(img.height, img.width, gen)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)


def open_image(path: str, row: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path!r} ({row}): no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path!r} ({row}): unreadable ({exc})") from None


class ImageDataset(Dataset):
    """Images of one record list. Items are ``(image [3,H,W], label, record index)``.

    Indexed by ``(record, aug_seed)`` for training and by a plain ``record`` for evaluation.
    """

    def __init__(self, records: Records, transform: Callable):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            gen = torch.Generator().manual_seed(seed)
            img = self.transform(open_image(self.records.paths[index], self.records.rows[index]), gen)
        else:
            index = item
            img = self.transform(open_image(self.records.paths[index], self.records.rows[index]))
        return img, self.records.labels[index], index


def _collate(batch):
    images, labels, index = zip(*batch)
    return torch.stack(images), torch.tensor(labels), torch.tensor(index)


def train_loader(records: Records, transform: TrainTransform, *, batch_size: int, workers: int, seed: int,
                 epoch: int, start_batch: int = 0, pin_memory: bool = False) -> DataLoader:
    bs = min(batch_size, len(records))
    sampler = EpochSampler(len(records), bs, seed, epoch, start_batch)
    return DataLoader(ImageDataset(records, transform), batch_size=bs, sampler=sampler, num_workers=workers,
                      collate_fn=_collate, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def eval_loader(records: Records, transform: Callable, *, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    return DataLoader(ImageDataset(records, transform), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=_collate, pin_memory=pin_memory)
