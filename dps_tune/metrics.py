"""Classification metrics as pure functions of predictions and labels."""

from __future__ import annotations

import torch


def accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    if y_true.numel() == 0:
        return float("nan")
    return (y_true == y_pred).float().mean().item()


def macro_f1(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """WILDS's macro-F1: averaged over the labels present in ``y_true`` only.

    Equal to ``sklearn.metrics.f1_score(y_true, y_pred, average="macro",
    labels=np.unique(y_true))``. A predicted class that never occurs in ``y_true``
    adds a false negative to the true class and nothing else.
    """
    if y_true.numel() == 0:
        return float("nan")
    y_true, y_pred = y_true.long().flatten(), y_pred.long().flatten()
    labels = torch.unique(y_true)  # [L]
    is_true = y_true[None, :] == labels[:, None]  # [L, N]
    is_pred = y_pred[None, :] == labels[:, None]  # [L, N]
    tp = (is_true & is_pred).sum(1).double()
    fp = (~is_true & is_pred).sum(1).double()
    fn = (is_true & ~is_pred).sum(1).double()
    f1 = 2 * tp / (2 * tp + fp + fn)  # denominator > 0: every label occurs in y_true
    return f1.mean().item()


def classification_metrics(split: str, y_true: torch.Tensor, y_pred: torch.Tensor) -> dict[str, float]:
    return {f"{split}_acc": accuracy(y_true, y_pred), f"{split}_f1": macro_f1(y_true, y_pred)}
