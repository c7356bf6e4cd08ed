"""DPS: rank rows by how far CE moved them, then hold the top rows at θ0 bit for bit.

Ranking rule (kept exactly from the published code of "Discrepancy-Guided Parameter
Suppression for Robust Fine-tuning", Liu & Ma, 2024, unless the config asks otherwise):

* ranked tensors have 2 or more dims and a name containing none of the ``dps.exclude``
  substrings (the paper's set: ``bias``, ``positional_embedding``, ``ln``);
* with Δ = |θ0 − θ1|, row ``c`` scores ``max(Δ[c, ...]) / ‖Δ‖_F`` (0 when Δ ≡ 0);
* ``dps.quota: global`` (the paper's): all (tensor, row) pairs are sorted together,
  descending, ties kept in (tensor, row) order, and the first ``floor(masking · N)``
  rows are suppressed; ``per_tensor``: the first ``floor(masking · rows)`` of each tensor.

The controls are matched: ``random`` and ``bottom`` hold in every tensor exactly as
many rows as ``top`` holds at the same masking and quota, and differ only in which
rows (drawn uniformly, or the tensor's least-moved). ``random_global`` is the
unmatched draw: the same total, uniformly over all ranked rows.

A row's score depends only on its own tensor, so the cached ranking scores every
tensor of 2 or more dims; exclusions and quota apply when the rows are selected.

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
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from dps_tune.config import PAPER_EXCLUDE, QUOTAS, SUPPRESS_MODES
from dps_tune.errors import CheckpointError, ConfigError
from dps_tune.files import atomic_path
from dps_tune.models import strip_wrapper_prefix
from dps_tune import paths

logger = logging.getLogger(__name__)

# v2: the cache holds every tensor of 2 or more dims; exclusions apply at selection.
RULE_VERSION = "dps-rowmax-over-fro-v2"

Scores = dict[str, torch.Tensor]  # tensor name -> [rows] float32 scores


def is_excluded(name: str, exclude: tuple[str, ...] = PAPER_EXCLUDE) -> bool:
    """Whether a name pattern of ``exclude`` (a substring, as in the paper's code) leaves the tensor out."""
    return any(s in name for s in exclude)


def is_ranked(name: str, shape: torch.Size | tuple[int, ...], exclude: tuple[str, ...] = PAPER_EXCLUDE) -> bool:
    return len(shape) >= 2 and not is_excluded(name, exclude)


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {strip_wrapper_prefix(k): v for k, v in state.items()}


def check_compatible(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                     exclude: tuple[str, ...] = PAPER_EXCLUDE) -> list[str]:
    """Names of the ranked tensors; raise if θ1 is not a fine-tune of θ0's architecture."""
    ranked = [n for n, t in theta0.items() if is_ranked(n, t.shape, exclude)]
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


def rank_scores(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor],
                exclude: tuple[str, ...] = PAPER_EXCLUDE) -> Scores:
    """Per-row discrepancy scores of every tensor ranked under ``exclude``, one pass per tensor."""
    theta0, theta1 = _plain(theta0), _plain(theta1)
    scores: Scores = {}
    for name in check_compatible(theta0, theta1, exclude):
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


def select_rows(scores: Mapping[str, torch.Tensor], masking: float, mode: str = "top", seed: int = 0, *,
                quota: str = "global", exclude: tuple[str, ...] = PAPER_EXCLUDE) -> dict[str, torch.Tensor]:
    """Boolean row masks per ranked tensor, ``True`` where the row is suppressed.

    Tensors whose name contains a pattern of ``exclude`` are left out (no mask). ``top``
    suppresses the highest-scoring rows (DPS): the first ``floor(masking · N)`` of the
    global order (``quota="global"``) or of each tensor's (``"per_tensor"``). ``random``
    and ``bottom`` suppress, in every tensor, as many rows as ``top`` does, drawn
    uniformly with ``seed`` or the tensor's lowest-scoring. ``random_global`` draws
    ``top``'s total uniformly over all ranked rows.
    """
    if mode not in SUPPRESS_MODES:
        raise ConfigError(f"dps.suppress = {mode!r}: must be one of {', '.join(SUPPRESS_MODES)}")
    if quota not in QUOTAS:
        raise ConfigError(f"dps.quota = {quota!r}: must be one of {', '.join(QUOTAS)}")
    names = [n for n in scores if not is_excluded(n, exclude)]
    if not names:
        return {}
    top = _top_rows({n: scores[n].flatten() for n in names}, masking, quota)
    if mode == "top":
        return top
    gen = torch.Generator().manual_seed(seed)
    if mode == "random_global":
        sizes = [top[n].numel() for n in names]
        k = sum(int(top[n].sum()) for n in names)
        chosen = torch.randperm(sum(sizes), generator=gen)[:k]
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[chosen] = True
        return {n: m.to(top[n].device) for n, m in zip(names, flat.split(sizes))}
    out = {}
    for name in names:
        row_scores, k = scores[name].flatten(), int(top[name].sum())
        if mode == "random":
            chosen = torch.randperm(row_scores.numel(), generator=gen)[:k].to(row_scores.device)
        else:  # bottom: the last k of the tensor's descending order
            chosen = torch.sort(row_scores, descending=True, stable=True).indices[row_scores.numel() - k:]
        out[name] = _mask(row_scores.numel(), chosen, row_scores.device)
    return out


def _mask(n: int, chosen: torch.Tensor, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[chosen] = True
    return mask


def _top_rows(scores: Mapping[str, torch.Tensor], masking: float, quota: str) -> dict[str, torch.Tensor]:
    """The rows ``top`` suppresses: a global cut over all rows, or one cut per tensor."""
    if quota == "per_tensor":
        return {n: _mask(s.numel(), torch.sort(s, descending=True, stable=True).indices[
            :suppressed_count(masking, s.numel())], s.device) for n, s in scores.items()}
    names = list(scores)
    device = scores[names[0]].device
    flat = torch.cat([scores[n].to(device) for n in names])  # [N]
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = _mask(flat.numel(), order[:suppressed_count(masking, flat.numel())], device)
    return dict(zip(names, mask.split([scores[n].numel() for n in names])))


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


# ------------------------------------------------------------------- what DPS holds

# open_clip parameter name -> tensor group, first match wins. ln_1 / ls_1 sit with the
# attention they precede, ln_2 / ls_2 with the MLP. ModifiedResNet's attention pooling
# is its attention; its c_proj maps to the embedding, as visual.proj does in a ViT.
# A custom text tower (CustomTextCLIP) prefixes its names with "text.".
_GROUP_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((g, re.compile(rx)) for g, rx in (
    ("visual attention", r"^visual\.(transformer\.resblocks\.\d+\.(ln_1|attn|ls_1)\."
                         r"|attnpool\.(q_proj|k_proj|v_proj|positional_embedding))"),
    ("visual MLP", r"^visual\.transformer\.resblocks\.\d+\.(ln_2|mlp|ls_2)\."),
    ("visual conv blocks", r"^visual\.layer\d+\."),
    ("visual stem & projection", r"^visual\."),  # conv1 (..3, bn), class/positional embedding, ln_pre/post, proj
    ("text attention", r"^(text\.)?transformer\.resblocks\.\d+\.(ln_1|attn|ls_1)\."),
    ("text MLP", r"^(text\.)?transformer\.resblocks\.\d+\.(ln_2|mlp|ls_2)\."),
    ("token embedding", r"^(text\.)?token_embedding\."),
    ("text stem & projection", r"^(text\.)?(positional_embedding|ln_final|text_projection)"),
    ("other", r""),  # logit_scale, and anything the rules above do not know
))
# The order tables show the groups in: image tower, then text tower.
GROUPS = ("visual stem & projection", "visual attention", "visual MLP", "visual conv blocks", "text attention",
          "text MLP", "token embedding", "text stem & projection", "other")


def tensor_group(name: str) -> str:
    """The group of an open_clip parameter name (wrapper prefixes removed first)."""
    name = strip_wrapper_prefix(name)
    return next(group for group, rule in _GROUP_RULES if rule.match(name))


@dataclass(frozen=True)
class Holding:
    """What DPS holds in one tensor group (or in the whole model, ``group="total"``).

    ``params`` counts every trainable parameter of the group, ranked or not; a held row
    holds all ``prod(shape[1:])`` parameters of its tensor's row.
    """

    group: str
    rows_ranked: int
    rows_held: int
    params: int
    params_held: int

    @property
    def rows_held_frac(self) -> float:
        return self.rows_held / self.rows_ranked if self.rows_ranked else 0.0

    @property
    def params_held_frac(self) -> float:
        return self.params_held / self.params if self.params else 0.0

    @property
    def params_train_frac(self) -> float:
        return 1.0 - self.params_held_frac if self.params else 0.0


def holdings(masks: Mapping[str, torch.Tensor], params: Mapping[str, tuple[int, ...]]) -> list[Holding]:
    """Rows and parameters held per tensor group, in :data:`GROUPS` order, then the total.

    ``masks`` are :func:`select_rows`' masks; ``params`` maps every trainable parameter's
    name to its shape. Groups without parameters are left out.
    """
    count = {g: [0, 0, 0, 0] for g in GROUPS}  # rows ranked, rows held, params, params held
    for name, shape in params.items():
        name = strip_wrapper_prefix(name)
        c = count[tensor_group(name)]
        c[2] += math.prod(shape)
        mask = masks.get(name)
        if mask is not None:
            held = int(mask.sum())
            c[0] += mask.numel()
            c[1] += held
            c[3] += held * math.prod(shape[1:])
    unknown = [n for n in masks if n not in {strip_wrapper_prefix(k) for k in params}]
    if unknown:
        raise CheckpointError(f"ranking names tensor {unknown[0]!r}, which the model does not have")
    rows = [Holding(g, *count[g]) for g in GROUPS if count[g][2]]
    return rows + [Holding("total", *(sum(getattr(r, f) for r in rows) for f in
                                      ("rows_ranked", "rows_held", "params", "params_held")))]


def holding_metrics(rows: list[Holding]) -> dict[str, float]:
    """:func:`holdings` as flat metrics for a trial's reports: the totals and each group's held fraction."""
    total = rows[-1]
    out = {"dps_rows_held": total.rows_held, "dps_rows_ranked": total.rows_ranked,
           "dps_params_held": total.params_held, "dps_params": total.params,
           "dps_params_held_frac": total.params_held_frac, "dps_params_train_frac": total.params_train_frac}
    for r in rows[:-1]:
        out[f"dps_held_frac_{_slug(r.group)}"] = r.params_held_frac
    return out


def _slug(group: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")


def format_holdings(rows: list[Holding]) -> list[str]:
    """The table ``dps-tune rank`` prints: rows and parameters held per group, with fractions."""
    width = max(len(r.group) for r in rows)
    lines = [f"{'group':<{width}}  {'rows held / ranked':>24}  {'params held / in group':>30}  {'still train':>11}"]
    for r in rows:
        lines.append(f"{r.group:<{width}}  {r.rows_held:>9,} / {r.rows_ranked:<9,} {100 * r.rows_held_frac:5.1f}%"
                     f"  {r.params_held:>12,} / {r.params:<12,} {100 * r.params_held_frac:5.1f}%"
                     f"  {100 * r.params_train_frac:10.1f}%")
    return lines


# --------------------------------------------------------------------------- caching


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of every tensor a ranking can score (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    plain = _plain(state)
    for name in sorted(plain):
        t = plain[name]
        if not is_ranked(name, t.shape, exclude=()):
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

    Returns ``(scores, hit)``: scores of every tensor of 2 or more dims, so trials that
    exclude different tensors or cut by different quotas share them. The key is a
    content hash of both weight sets and the rule's version, everything the scores
    depend on, so every trial of a sweep, and every later sweep on the same pair,
    reuses one computation.
    """
    theta0, theta1 = _plain(theta0), _plain(theta1)
    check_compatible(theta0, theta1, exclude=())
    d0, d1 = weights_digest(theta0), weights_digest(theta1)
    key = hashlib.sha256(f"{RULE_VERSION}|{d0}|{d1}".encode()).hexdigest()[:32]
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"{key}.pt"
    if path.is_file():
        logger.info("ranking cache hit: %s", path)
        return load_ranking(path), True
    logger.info("ranking cache miss: computing %s", path)
    start = time.perf_counter()
    scores = rank_scores(theta0, theta1, exclude=())
    logger.info("ranked %d rows of %d tensors in %.3f s", sum(s.numel() for s in scores.values()),
                len(scores), time.perf_counter() - start)
    save_ranking(path, scores, pretrained_digest=d0, reference_digest=d1)
    return scores, False
