"""Checkpoint directories: tensors and the resolved config, never pickled objects.

A checkpoint directory holds

* ``model.safetensors``: the open_clip state dict, loadable with plain
  ``open_clip.create_model(arch, pretrained=".../model.safetensors")``;
* ``config.json``: the resolved config of the run, plus ``open_clip_model``: the exact
  open_clip model name that rebuilds the network (``ViT-B-16-quickgelu`` for OpenAI weights);
* ``metrics.json``: the metrics reported with this checkpoint;
* ``predictions.safetensors``: labels and predicted classes of every evaluation split
  (int32), for bootstrap intervals;
* ``train_state.pt``: optimizer state, loop position and RNG states, read back with
  ``torch.load(weights_only=True)``.

Directories are written under a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from dps_tune import models
from dps_tune.config import Config, config_from_dict, save_json, to_dict
from dps_tune.errors import CheckpointError, first_line
from dps_tune.files import atomic_path, disk_full, read_json_object, space_left
from dps_tune.layout import (CONFIG_FILE, METRICS_FILE, MODEL_FILE, OPEN_CLIP_KEY, PREDICTIONS_FILE,  # noqa: F401
                             STATE_FILE)

FORMAT_VERSION = 1


@dataclass
class LoopState:
    """Where a run is: the position the next step starts from."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch already trained on


def save_checkpoint(path: str | os.PathLike, *, model_state: Mapping[str, torch.Tensor], config: Config,
                    metrics: Mapping[str, Any], loop: LoopState | None = None,
                    optimizer_state: Mapping[str, Any] | None = None,
                    extra_state: Mapping[str, Any] | None = None,
                    predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    A disk that fills up meanwhile (``ENOSPC``, or a quota; safetensors reports it as its
    own error) is one :class:`CheckpointError` line naming the free space: the
    half-written directory is removed and a previous checkpoint at ``path`` stays as it was.
    """
    try:
        _write_checkpoint(Path(path), model_state, config, metrics, loop, optimizer_state, extra_state, predictions)
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise CheckpointError(f"checkpoint {str(path)!r}: the disk is full ({space_left(path)}); nothing was "
                              "replaced, the previous checkpoint is intact") from None
    return Path(path)


def _write_checkpoint(path: Path, model_state: Mapping[str, torch.Tensor], config: Config, metrics: Mapping[str, Any],
                      loop: LoopState | None, optimizer_state: Mapping[str, Any] | None,
                      extra_state: Mapping[str, Any] | None,
                      predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE),
                  metadata={"format": "open_clip state_dict", "model": config.model})
        if predictions:
            _save_predictions(tmp, predictions)
        _save_config(config, tmp / CONFIG_FILE)
        save_json(dict(metrics), tmp / METRICS_FILE)
        if loop is not None:
            state = {
                "format": FORMAT_VERSION,
                "epoch": loop.epoch,
                "step": loop.step,
                "batch_in_epoch": loop.batch_in_epoch,
                "optimizer": optimizer_state or {},
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                **(extra_state or {}),
            }
            torch.save(state, tmp / STATE_FILE)


def write_predictions(predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | os.PathLike) -> None:
    """``predictions`` (per split: labels and predicted classes, [images] each) as one safetensors
    file at ``path``: tensors ``<split>.true`` and ``<split>.pred``, int32."""
    save_file({f"{split}.{what}": t.to(torch.int32).contiguous() for split, pair in predictions.items()
               for what, t in zip(("true", "pred"), pair)}, str(path))


def _save_predictions(directory: Path, predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    write_predictions(predictions, directory / PREDICTIONS_FILE)


def save_evaluation(path: str | os.PathLike, metrics: Mapping[str, Any],
                    predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """A directory with an evaluation's ``metrics.json`` and ``predictions.safetensors``, no weights, atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.mkdir(parents=True)
        _save_predictions(tmp, predictions)
        save_json(dict(metrics), tmp / METRICS_FILE)
    return Path(path)


def _save_config(config: Config, path: Path) -> None:
    """The run's config plus the open_clip model name that rebuilds its network."""
    save_json({**to_dict(config), OPEN_CLIP_KEY: models.architecture_name(config.model, config.pretrained)}, path)


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    config: Config
    metrics: dict[str, Any]
    train_state: dict[str, Any] | None

    @property
    def loop(self) -> LoopState:
        s = self.train_state or {}
        return LoopState(int(s.get("epoch", 0)), int(s.get("step", 0)), int(s.get("batch_in_epoch", 0)))


def read_config(path: str | os.PathLike) -> Config:
    path = Path(path)
    cfg_path = path / CONFIG_FILE if path.is_dir() else path
    raw = read_json_object(cfg_path, f"checkpoint {str(cfg_path.parent)!r}")
    raw.pop(OPEN_CLIP_KEY, None)
    return config_from_dict(raw)


def load_checkpoint(path: str | os.PathLike, *, with_state: bool = True) -> LoadedCheckpoint:
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r}: no {MODEL_FILE} in it")
    model_state = models.read_safetensors(path / MODEL_FILE, f"checkpoint {path}")
    config = read_config(path)
    metrics_path = path / METRICS_FILE
    metrics = read_json_object(metrics_path, f"checkpoint {str(path)!r}") if metrics_path.is_file() else {}
    state = None
    if with_state and (path / STATE_FILE).is_file():
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} cannot be read safely ({first_line(exc)})") from None
    return LoadedCheckpoint(path, model_state, config, metrics, state)


def read_predictions(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The labels and predicted classes a checkpoint's evaluation recorded, per split ({} if none)."""
    file = Path(path) / PREDICTIONS_FILE
    return read_prediction_file(file, f"checkpoint {path}") if file.is_file() else {}


def read_prediction_file(file: str | os.PathLike, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The labels and predicted classes per split of a file :func:`write_predictions` wrote."""
    flat = models.read_safetensors(Path(file), what)
    splits = {k.rsplit(".", 1)[0] for k in flat}
    return {s: (flat[f"{s}.true"].long(), flat[f"{s}.pred"].long()) for s in sorted(splits)
            if f"{s}.true" in flat and f"{s}.pred" in flat}


def add_figures(path: str | os.PathLike, metrics: Mapping[str, float],
                predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add figures computed after the fact (a kept checkpoint's test splits) to checkpoint ``path``.

    The predictions are merged first and ``metrics.json`` last, each file replaced
    atomically: a checkpoint whose ``metrics.json`` names a split also holds its
    predictions, and an interrupted call leaves both files as they were or complete.
    """
    path = Path(path)
    if predictions:
        merged = {**read_predictions(path), **predictions}
        with atomic_path(path / PREDICTIONS_FILE) as tmp:
            write_predictions(merged, tmp)
    old = read_json_object(path / METRICS_FILE, f"checkpoint {str(path)!r}") if (path / METRICS_FILE).is_file() else {}
    save_json({**old, **metrics}, path / METRICS_FILE)


def restore_rng(state: Mapping[str, Any]) -> None:
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_export(dst: str | os.PathLike, *, model_state: Mapping[str, torch.Tensor], config: Config,
                metrics: Mapping[str, Any],
                predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write new weights (an ensemble, say) as a directory plain open_clip loads, like :func:`export`."""
    dst = save_checkpoint(dst, model_state=model_state, config=config, metrics=metrics, predictions=predictions)
    name = models.architecture_name(config.model, config.pretrained)
    save_json(models.architecture_config(config.model, config.pretrained), dst / f"{name}.json")
    return dst


def export(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a checkpoint's model, config and metrics (not its training state) to ``dst``.

    Also writes ``<open_clip_model>.json``, the open_clip model config of the network, so
    plain open_clip rebuilds it exactly, tiny or QuickGELU architectures included::

        open_clip.add_model_config(dst)
        open_clip.create_model(config["open_clip_model"], pretrained=f"{dst}/model.safetensors")
    """
    src, dst = Path(src), Path(dst)
    loaded = load_checkpoint(src, with_state=False)  # refuse anything incomplete
    cfg = loaded.config
    name = models.architecture_name(cfg.model, cfg.pretrained)
    dst.mkdir(parents=True, exist_ok=True)  # other files already in dst are left alone
    with atomic_path(dst / MODEL_FILE) as tmp:
        shutil.copy2(src / MODEL_FILE, tmp)
    if (src / PREDICTIONS_FILE).is_file():
        with atomic_path(dst / PREDICTIONS_FILE) as tmp:
            shutil.copy2(src / PREDICTIONS_FILE, tmp)
    _save_config(cfg, dst / CONFIG_FILE)
    save_json(loaded.metrics, dst / METRICS_FILE)
    save_json(models.architecture_config(cfg.model, cfg.pretrained), dst / f"{name}.json")
    return dst

