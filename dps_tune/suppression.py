"""DPS: rank rows by how far CE moved them, then hold the top rows at θ0 bit for bit.

Ranking rule (kept exactly from the published code of "Discrepancy-Guided Parameter
Suppression for Robust Fine-tuning", Liu & Ma, 2024):

* ranked tensors have 2 or more dims and a name containing none of ``bias``,
  ``positional_embedding``, ``ln``;
* with Δ = |θ0 − θ1|, row ``c`` scores ``max(Δ[c, ...]) / ‖Δ‖_F`` (0 when Δ ≡ 0);
* all (tensor, row) pairs are sorted together, descending, ties kept in (tensor, row)
  order; the first ``floor(masking · N)`` rows are suppressed.

The paper's code re-normalised the whole tensor once per row (O(rows × numel)); here
each tensor takes one vectorised pass on the device where its weights live.

Suppression that holds: a suppressed row gets a zero gradient as soon as its gradient
is accumulated (so clipping and AdamW moments never see it) and is copied back from
θ0 after every optimizer step, which undoes AdamW's decoupled weight decay.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dps_tune.config import SUPPRESS_MODES
from dps_tune.errors import CheckpointError, ConfigError
from dps_tune.files import atomic_path
from dps_tune.models import strip_wrapper_prefix
from dps_tune import paths

logger = logging.getLogger(__name__)

EXCLUDED_SUBSTRINGS = ("bias", "positional_embedding", "ln")
RULE_VERSION = "dps-rowmax-over-fro-v1"

Scores = dict[str, torch.Tensor]  # tensor name -> [rows] float32 scores


def is_ranked(name: str, shape: torch.Size | tuple[int, ...]) -> bool:
    return len(shape) >= 2 and not any(s in name for s in EXCLUDED_SUBSTRINGS)


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {strip_wrapper_prefix(k): v for k, v in state.items()}


def check_compatible(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the ranked tensors; raise if θ1 is not a fine-tune of θ0's architecture."""
    ranked = [n for n, t in theta0.items() if is_ranked(n, t.shape)]
    missing = [n for n in ranked if n not in theta1]
    if missing:
        raise CheckpointError(
            f"reference does not match the pretrained model: {len(missing)} ranked tensor(s) missing, "
            f"e.g. {missing[0]!r} (was the reference trained from a different architecture?)")
    bad = [n for n in ranked if tuple(theta1[n].shape) != tuple(theta0[n].shape)]
    if bad:
        n = bad[0]
        raise CheckpointError(
            f"reference does not match the pretrained model: {n!r} has shape {tuple(theta1[n].shape)} "
            f"in the reference and {tuple(theta0[n].shape)} in the pretrained model")
    return ranked


def rank_scores(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor]) -> Scores:
    """Per-row discrepancy scores of every ranked tensor, one pass per tensor."""
    theta0, theta1 = _plain(theta0), _plain(theta1)
    scores: Scores = {}
    for name in check_compatible(theta0, theta1):
        a = theta0[name]
        # abs_ in place: the difference is already a fresh tensor, so one temporary, not two.
        delta = (a.float() - theta1[name].to(a.device).float()).abs_()  # [rows, ...]
        norm = torch.linalg.vector_norm(delta)  # Frobenius norm of the whole tensor
        row_max = delta.flatten(1).amax(dim=1)  # [rows]
        # A tensor CE never moved scores 0 everywhere (the paper code divides by zero here).
        scores[name] = torch.where(norm > 0, row_max / norm, torch.zeros_like(row_max))
    return scores


def suppressed_count(masking: float, total_rows: int) -> int:
    """``floor(masking · N)`` with ``masking`` read as the decimal the user wrote.

    Binary floating point would give floor(0.29 · 100) = 28.
    """
    return math.floor(Fraction(repr(float(masking))) * total_rows)


def select_rows(scores: Mapping[str, torch.Tensor], masking: float, mode: str = "top",
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Boolean row masks per tensor, ``True`` where the row is suppressed.

    ``top`` suppresses the highest-scoring rows (DPS), ``bottom`` the lowest, and
    ``random`` the same number drawn uniformly with ``seed``.
    """
    if mode not in SUPPRESS_MODES:
        raise ConfigError(f"dps.suppress = {mode!r}: must be one of {', '.join(SUPPRESS_MODES)}")
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    if not names:
        return {}
    device = scores[names[0]].device
    flat = torch.cat([scores[n].flatten().to(device) for n in names])  # [N]
    k = suppressed_count(masking, flat.numel())
    if mode == "random":
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(flat.numel(), generator=gen)[:k].to(device)
    else:
        order = torch.sort(flat, descending=True, stable=True).indices
        chosen = order[:k] if mode == "top" else order[flat.numel() - k:]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    mask[chosen] = True
    return dict(zip(names, mask.split(sizes)))


class RowSuppressor:
    """Holds the masked rows of ``model`` at their current (pretrained) values.

    Build it while the model still holds θ0; :meth:`attach` then hooks the optimizer.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        params = {strip_wrapper_prefix(n): p for n, p in model.named_parameters()}
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise CheckpointError(f"ranking names tensor {unknown[0]!r}, which the model does not have")
        self.masks: dict[str, torch.Tensor] = {}
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, mask in masks.items():
            p = params[name]
            mask = mask.to(p.device)
            self.masks[name] = mask
            rows = mask.nonzero().flatten()  # [k]
            if rows.numel() == 0:
                continue
            self._entries.append((p, rows, p.detach()[rows].clone()))  # θ0 rows: [k, ...]
        self._handles: list = []

    @property
    def num_suppressed(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def num_ranked(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        for p, rows, _ in self._entries:
            self._handles.append(p.register_post_accumulate_grad_hook(_zero_rows_hook(rows)))
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore()))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy θ0 back into every suppressed row."""
        for p, rows, saved in self._entries:
            p.index_copy_(0, rows, saved)


def _zero_rows_hook(rows: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.index_fill_(0, rows, 0)

    return hook


def summarize(masks: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """``(tensor, rows suppressed, rows ranked)`` for every ranked tensor, in model order."""
    return [(n, int(m.sum()), m.numel()) for n, m in masks.items()]


# --------------------------------------------------------------------------- caching


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of the ranked tensors (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    plain = _plain(state)
    for name in sorted(plain):
        t = plain[name]
        if not is_ranked(name, t.shape):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return paths.cache_dir() / "rankings"


def save_ranking(path: str | os.PathLike, scores: Scores, **meta: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"scores": {k: v.detach().cpu() for k, v in scores.items()}, "rule": RULE_VERSION, **meta}, tmp)


def load_ranking(path: str | os.PathLike) -> Scores:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"ranking file {str(path)!r}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("rule") != RULE_VERSION or "scores" not in blob:
        raise CheckpointError(f"ranking file {str(path)!r}: not a dps_tune ranking ({RULE_VERSION})")
    return dict(blob["scores"])


def cached_ranking(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                   cache_dir: str | os.PathLike | None = None) -> tuple[Scores, bool]:
    """Scores for (θ0, θ1) from the on-disk cache, computing and storing them on a miss.

    Returns ``(scores, hit)``. The key is a content hash of both weight sets, so every
    trial of a sweep, and every later sweep on the same pair, reuses one computation.
    """
    theta0, theta1 = _plain(theta0), _plain(theta1)
    check_compatible(theta0, theta1)
    d0, d1 = weights_digest(theta0), weights_digest(theta1)
    key = hashlib.sha256(f"{RULE_VERSION}|{d0}|{d1}".encode()).hexdigest()[:32]
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"{key}.pt"
    if path.is_file():
        logger.info("ranking cache hit: %s", path)
        return load_ranking(path), True
    logger.info("ranking cache miss: computing %s", path)
    start = time.perf_counter()
    scores = rank_scores(theta0, theta1)
    logger.info("ranked %d rows of %d tensors in %.3f s", sum(s.numel() for s in scores.values()),
                len(scores), time.perf_counter() - start)
    save_ranking(path, scores, pretrained_digest=d0, reference_digest=d1)
    return scores, False
