"""AdamW and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``
    steps, then a cosine from ``base_lr`` down to 0 at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def build_optimizer(model: nn.Module, *, lr: float, wd: float, betas: tuple[float, float], eps: float,
                    fused: bool) -> torch.optim.AdamW:
    """AdamW over every trainable parameter with one weight decay, as in the paper's code."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
