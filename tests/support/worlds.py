"""The synthetic worlds the tests train on, and the tiny config around them."""

from __future__ import annotations

# A trial of one epoch in a second or two: for tests that train in this process.
TINY_WORLD = {"classes": 4, "train_per_class": 8, "eval_per_class": 4, "image_size": 32}
# A little more data, so that a sweep's trials differ and ASHA has something to stop.
SWEEP_WORLD = {"classes": 4, "train_per_class": 12, "eval_per_class": 6, "image_size": 32}


def tiny_raw(**overrides) -> dict:
    """A raw config dict for the tiny model on the tiny synthetic world; ``overrides`` by dotted key."""
    raw = {
        "algorithm": "ce",
        "model": "tiny-vit",
        "pretrained": "none",
        "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 8, "eval_batch_size": 64, "workers": 0,
                 "synthetic": dict(TINY_WORLD)},
        "optim": {"lr": 1e-3, "wd": 0.1, "epochs": 1, "warmup_steps": 2},
        "train": {"log_every_steps": 2},
    }
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw

