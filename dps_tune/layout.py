"""The names of the files in a checkpoint directory, for readers that must not import torch.

:mod:`dps_tune.checkpoint` writes and loads checkpoints (and needs torch); the commands
that only look at them (``results``, ``best`` before ``--export``, the candidates of
``wise``/``soup``) use these names to refuse bad input before torch is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dps_tune.errors import CheckpointError, first_line

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "train_state.pt"
PREDICTIONS_FILE = "predictions.safetensors"  # labels and predicted classes per evaluation split
# In config.json, beside the run's config: the open_clip model name that rebuilds the network.
OPEN_CLIP_KEY = "open_clip_model"

# A safetensors header larger than this is not a header (the format's own limit is 100 MB).
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: str | os.PathLike, key: str) -> dict[str, Any]:
    """The header of the safetensors file ``path``, checked against the file's size; no tensor is read.

    A file cut short (a half-finished copy), or one that is not safetensors at all, is a
    :class:`~dps_tune.errors.CheckpointError` naming ``key`` and the path. Needs no torch,
    so the commands that merely look at checkpoints refuse a damaged one before any work.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the header's length field")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not 0 <= begin <= stop:
                raise ValueError(f"tensor {name!r} has offsets {begin}..{stop}")
            end = max(end, stop)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{key} = {str(path)!r}: not a readable weights file ({first_line(exc, 160)})"
                              ) from None
    if 8 + n + end > size:
        raise CheckpointError(f"{key} = {str(path)!r}: cut short (its header promises {8 + n + end} bytes, the file "
                              f"holds {size})")
    return header
