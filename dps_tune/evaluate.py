"""Zero-shot evaluation: a text head from the current text encoder, then acc and macro-F1."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from dps_tune.metrics import classification_metrics


def tokenize_prompts(tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Tokens of every (template, class) prompt: [T, C, L]."""
    per_template = [tokenizer([t.format(c=c) for c in classnames]) for t in templates]
    return torch.stack(per_template)


def autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def build_head(model: nn.Module, prompt_tokens: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """Zero-shot classifier weights [D, C] from prompt tokens [T, C, L].

    For each class: encode every template, L2-normalise each embedding, average,
    normalise again, and scale by ``exp(logit_scale)``.
    """
    num_templates, num_classes, length = prompt_tokens.shape
    device = next(model.parameters()).device
    with autocast(device, bf16):
        emb = model.encode_text(prompt_tokens.reshape(-1, length).to(device), normalize=True)  # [T*C, D]
    emb = emb.float().reshape(num_templates, num_classes, -1).mean(0)  # [C, D]
    emb = emb / emb.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp().float() * emb).T  # [D, C]


@torch.inference_mode()
def predict(model: nn.Module, head: torch.Tensor, batches: Iterable, *, bf16: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and predicted classes over ``batches`` of ``(images, labels, ...)``."""
    device = head.device
    trues, preds = [], []
    for images, labels, *_ in batches:
        with autocast(device, bf16):
            feats = model.encode_image(images.to(device, non_blocking=True), normalize=True)  # [B, D]
        logits = feats.float() @ head  # [B, C]
        preds.append(logits.argmax(dim=1).cpu())
        trues.append(labels.cpu())
    return torch.cat(trues), torch.cat(preds)


def evaluate_splits(model: nn.Module, prompt_tokens: torch.Tensor, loaders: dict[str, Iterable], *,
                    bf16: bool = False, predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                    ) -> dict[str, float]:
    """``{split}_acc`` and ``{split}_f1`` for every split in ``loaders``; the head is built once.

    ``predictions``, when given, receives ``(labels, predicted classes)`` per split, for
    bootstrap intervals over the evaluation images.
    """
    modes = [(m, m.training) for m in model.modules()]  # per module: frozen BatchNorm stays frozen
    model.eval()
    try:
        head = build_head(model, prompt_tokens, bf16=bf16)
        out: dict[str, float] = {}
        for split, batches in loaders.items():
            y_true, y_pred = predict(model, head, batches, bf16=bf16)
            out.update(classification_metrics(split, y_true, y_pred))
            if predictions is not None:
                predictions[split] = (y_true, y_pred)
        return out
    finally:
        for module, training in modes:
            module.training = training
