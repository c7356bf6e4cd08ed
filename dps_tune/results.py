"""Reading finished or running experiments from disk: trials, metrics, best checkpoints.

Ray-free: it reads the files an experiment directory holds (``result.json`` lines,
``params.json`` and checkpoint directories with their ``metrics.json``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dps_tune.errors import UserError

CHECKPOINT_GLOB = "checkpoint_*"


def checkpoints(exp_dir: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Every complete checkpoint under ``exp_dir`` (a sweep, a trial or a train run) with its metrics."""
    exp = Path(exp_dir)
    if not exp.is_dir():
        raise UserError(f"experiment {str(exp)!r}: no such directory")
    found = []
    for metrics_path in sorted(exp.rglob("metrics.json")):
        ckpt = metrics_path.parent
        if not (ckpt / "model.safetensors").is_file() or ckpt.name.startswith("."):
            continue
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((ckpt, metrics))
    return found


def best_checkpoint(exp_dir: str | os.PathLike, metric: str, mode: str = "max") -> Path:
    """The kept checkpoint with the best ``metric`` (``mode`` max or min) under ``exp_dir``."""
    scored = [(m[metric], p) for p, m in checkpoints(exp_dir)
              if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    if not scored:
        raise UserError(f"experiment {str(exp_dir)!r}: no checkpoint reports {metric!r}")
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t[0])[1]
