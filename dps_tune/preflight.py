"""Checks against the world, run by every entry point before any work starts.

:mod:`dps_tune.config` checks values; this module checks that what those values name
exists: the architecture and pretrained tag in open_clip's registry, every input file
and directory, the iWildCam layout, the image cache, the DPS reference and the experiment
trackers' packages. Each failure is one :class:`~dps_tune.errors.UserError` line naming the key and the value.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

from dps_tune import models
from dps_tune.config import Config, check
from dps_tune.data.datasets import find_iwildcam_dir
from dps_tune.layout import STATE_FILE
from dps_tune.paths import looks_like_weights_file


def check_config(cfg: Config, *, image_cache_may_be_missing: bool = False) -> None:
    """Raise :class:`~dps_tune.errors.UserError` for the first thing ``cfg`` names that is not there.

    ``image_cache_may_be_missing`` is for ``dps-tune prepare``, which creates the cache.
    """
    check_model(cfg.model, cfg.pretrained)
    d = cfg.data
    if d.dataset == "iwildcam":
        find_iwildcam_dir(d.root)  # raises a one-line error naming what is missing
    if d.dataset == "csv":
        _require_file("data.train_csv", d.train_csv)
        given = dict(d.eval_csvs)
        for split in d.eval_splits:
            check(split in given, "data.eval_splits", list(d.eval_splits),
                  f"asks for {split!r} but data.eval_csvs names no CSV for it "
                  f"(it has {', '.join(given) or 'nothing'})")
        for split, path in d.eval_csvs:
            _require_file(f"data.eval_csvs.{split}", path)
        if d.root is not None:
            check(Path(d.root).is_dir(), "data.root", d.root, "no such directory")
    _require_file("data.classnames", d.classnames)
    if d.image_cache is not None and not image_cache_may_be_missing:
        check(Path(d.image_cache).is_dir(), "data.image_cache", d.image_cache,
              "no such directory (build it with `dps-tune prepare`)")
        from dps_tune.data.cache_reader import ImageCache

        ImageCache.open(d.image_cache)  # its manifest and every shard's size and header, not the pixels
    if cfg.algorithm == "dps":
        _require_file("dps.reference", cfg.dps.reference, directory_ok=True)
        if cfg.dps.reference is not None and Path(cfg.dps.reference).is_file():
            models.check_weights_readable(cfg.dps.reference, "dps.reference")
        if cfg.dps.reference_experiment is not None:
            check(Path(cfg.dps.reference_experiment).is_dir(), "dps.reference_experiment",
                  cfg.dps.reference_experiment, "no such directory")


# The package each `tune.loggers` name needs, and the dps_tune extra that installs it.
LOGGER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def check_loggers(loggers: Iterable[str]) -> None:
    """Every experiment tracker in ``tune.loggers`` is installed (looked up, not imported)."""
    for name in loggers:
        package = LOGGER_PACKAGES[name]
        check(importlib.util.find_spec(package) is not None, "tune.loggers", name,
              f"the {package} package is not installed (pip install 'dps_tune[{name}]')")


def check_model(arch: str, pretrained: str, *, key: str = "model", pretrained_key: str = "pretrained") -> None:
    """``arch`` is an open_clip architecture and ``pretrained`` one of its tags, an existing file, or none."""
    check(arch in models.list_architectures(), key, arch,
          "not an open_clip architecture (see `python -c 'import open_clip; print(open_clip.list_models())'`)")
    if pretrained == "none":
        return
    if looks_like_weights_file(pretrained):
        _require_file(pretrained_key, pretrained)
        models.check_weights_readable(pretrained, pretrained_key)
        return
    tags = models.list_pretrained_tags(arch)
    check(models.tag_key(pretrained) in tags, pretrained_key, pretrained,
          f"must be none, a weights file (.pt, .bin, .safetensors) or one of the tags for "
          f"{arch}: {', '.join(tags) or '(none known)'}")


def check_weights(key: str, path: str) -> None:
    """``path`` is a readable weights file or a checkpoint directory."""
    _require_file(key, path, directory_ok=True)
    if Path(path).is_file():
        models.check_weights_readable(path, key)


def check_train_state(key: str, directory: str) -> None:
    """``directory/train_state.pt`` is a training state torch can read (not a copy cut short)."""
    models.check_weights_readable(str(Path(directory) / STATE_FILE), key)


def _require_file(key: str, value: str | None, *, directory_ok: bool = False) -> None:
    if value is None:
        return
    path = Path(value)
    ok = path.is_file() or (directory_ok and path.is_dir())
    check(ok, key, value, "no such file" + (" or directory" if directory_ok else ""))
