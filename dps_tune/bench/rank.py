"""``python -m dps_tune.bench rank``: the one-pass DPS ranking against the published per-row loop.

θ0 is a randomly initialised model and θ1 a perturbed copy of it (a stand-in for a CE
fine-tune: every row moves by noise of a row-dependent size, so the ranking is not
degenerate). Both rankings run on the same device; the command checks that they give
identical scores and the identical global order, then prints one line::

    rank: one-pass X s, per-row loop Y s, speedup Z×

Why the default model is ``bench-rank-vit``: the per-row loop visits the whole tensor
once per row, so it costs Σ rows × numel. Every open_clip text tower has a
49408-row token embedding, which alone makes the loop take hours on a CPU
(tiny-vit: 1.6e11 element visits; ViT-B/16: 1.25e12). ``bench-rank-vit`` is a
ViT-B-like model (vision width 384, text width 256, 4 layers per tower) with a
16384-token vocabulary: 40,448 ranked rows, sized so the loop takes 10-15 s on one CPU
core while its tensors are large enough that the comparison measures arithmetic, not
Python overhead. It exists for this benchmark only (registered from ``dps_tune/bench/model_configs`` when
this module loads, so configs cannot select it): its vocabulary does not fit
open_clip's tokenizer, so it cannot be trained.

On the CPU both rankings run on one thread by default (``--threads``): on a machine
whose cores are shared, multi-threaded kernels stall at their barriers whenever a core
is taken, which made the one-pass ranking 10-70× slower and its timing meaningless.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from typing import Mapping

from pathlib import Path

import open_clip
import torch

from dps_tune import models, suppression
from dps_tune.bench import setup_logging
from dps_tune.config import DPSConfig

logger = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).with_name("model_configs"))

DEFAULT_MODEL = "bench-rank-vit"


def fine_tune_stand_in(theta0: Mapping[str, torch.Tensor], seed: int = 1,
                       scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """θ1 = θ0 + ``scale`` · u_row · ε, with ε ~ N(0, 1) per element and u_row ~ U(0, 1) per row.

    Tensors stay on their device; non-float tensors are copied unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in theta0.items():
        if not t.is_floating_point() or t.dim() == 0:
            out[name] = t.clone()
            continue
        gen = torch.Generator(device=t.device).manual_seed(seed + len(out))
        noise = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)  # [rows, ...]
        row_scale = torch.rand(t.shape[:1] + (1,) * (t.dim() - 1), generator=gen, device=t.device, dtype=t.dtype)
        out[name] = t + scale * row_scale * noise
    return out


def per_row_loop(theta0: Mapping[str, torch.Tensor],
                 theta1: Mapping[str, torch.Tensor]) -> list[tuple[float, str, int]]:
    """The published ranking, written directly: ``(score, tensor, row)`` in (tensor, row) order.

    For every row it takes the norm of the whole tensor again and reads the score back
    to the host with ``.item()``; this is the O(rows × numel) cost the one-pass ranking
    removes. (Taking only the norm per row, rather than dividing the whole tensor, is
    the cheaper reading of the published code, so the measured speedup is not inflated.)
    """
    entries: list[tuple[float, str, int]] = []
    for raw_name, p0 in theta0.items():
        name = models.strip_wrapper_prefix(raw_name)
        if p0.dim() < 2 or "bias" in name or "positional_embedding" in name or "ln" in name:
            continue
        delta = (p0.float() - theta1[raw_name].to(p0.device).float()).abs()  # [rows, ...]
        for c in range(delta.shape[0]):
            score = (delta[c].max() / torch.linalg.vector_norm(delta)).item()
            # 0/0 when CE never moved the tensor: the published code yields NaN; the rule says 0.
            entries.append((0.0 if math.isnan(score) else score, name, c))
    return entries


def loop_order(entries: list[tuple[float, str, int]]) -> list[int]:
    """Positions of ``entries`` sorted by score, descending; Python's sort is stable, so ties
    stay in (tensor, row) order."""
    return sorted(range(len(entries)), key=lambda i: -entries[i][0])


def one_pass_order(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor]
                   ) -> tuple[suppression.Scores, torch.Tensor]:
    """:func:`suppression.rank_scores` plus the global stable descending sort over all rows."""
    scores = suppression.rank_scores(theta0, theta1)
    flat = torch.cat([s.flatten() for s in scores.values()])  # [N]
    order = torch.sort(flat, descending=True, stable=True).indices  # [N]
    return scores, order


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one_pass(theta0: Mapping[str, torch.Tensor], theta1: Mapping[str, torch.Tensor], device: torch.device,
                   repeats: int) -> tuple[float, suppression.Scores, torch.Tensor]:
    one_pass_order(theta0, theta1)  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        scores, order = one_pass_order(theta0, theta1)
        _sync(device)
        times.append(time.perf_counter() - start)
    # The median: the one-pass run is milliseconds long, so one scheduling hiccup on a
    # shared machine would otherwise decide the ratio.
    return statistics.median(times), scores, order


def compare(scores: suppression.Scores, order: torch.Tensor, entries: list[tuple[float, str, int]],
            order_loop: list[int], masking: float) -> list[str]:
    """Every way the one-pass result differs from the per-row loop; empty when identical."""
    problems: list[str] = []
    names_fast = list(scores)
    names_loop = list(dict.fromkeys(name for _, name, _ in entries))
    if names_fast != names_loop:
        return [f"ranked tensors differ: {len(names_fast)} one-pass vs {len(names_loop)} per-row"]
    fast = torch.cat([s.flatten() for s in scores.values()]).cpu()  # [N]
    slow = torch.tensor([s for s, _, _ in entries], dtype=torch.float32)  # [N]
    if not torch.equal(fast, slow):
        bad = int((fast != slow).sum())
        problems.append(f"{bad} of {fast.numel()} scores differ (max abs diff {float((fast - slow).abs().max()):.3g})")
    fast_order = order.cpu().tolist()
    if fast_order != order_loop:
        first = next(i for i, (a, b) in enumerate(zip(fast_order, order_loop)) if a != b)
        problems.append(f"global orders differ from position {first} on")
    # The suppressed set DPS uses, through select_rows, must be the loop's top rows.
    masks = suppression.select_rows(scores, masking, "top")
    chosen = torch.cat([m.flatten() for m in masks.values()]).cpu()  # [N] bool
    expected = torch.zeros_like(chosen)
    expected[order_loop[:suppression.suppressed_count(masking, len(entries))]] = True
    if not torch.equal(chosen, expected):
        problems.append(f"select_rows(masking={masking}) suppresses a different set of rows")
    return problems


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dps_tune.bench rank",
                                description="Time the one-pass DPS ranking against the published per-row loop.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip architecture with random weights (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA when visible")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both rankings (default: 1; see the module docstring)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the one-pass ranking (median)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)



def main(argv: list[str]) -> int:
    args = _parse(argv)
    setup_logging()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    model = models.create_model(args.model, "none", device=device)
    theta0 = {k: v.detach() for k, v in model.state_dict().items()}
    theta1 = fine_tune_stand_in(theta0, seed=args.seed + 1)

    one_pass_s, scores, order = _time_one_pass(theta0, theta1, device, max(1, args.repeats))
    _sync(device)
    start = time.perf_counter()
    entries = per_row_loop(theta0, theta1)
    order_loop = loop_order(entries)
    loop_s = time.perf_counter() - start

    problems = compare(scores, order, entries, order_loop, DPSConfig().masking)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if problems:
        for problem in problems:
            logger.error("one-pass ranking differs from the per-row loop: %s", problem)
        return 1
    logger.info("%s on %s: %d rows in %d tensors; scores, global order and the masking-%.2f suppressed set "
                "are identical", args.model, where, len(entries), len(scores), DPSConfig().masking)
    print(f"rank: one-pass {one_pass_s:.4g} s, per-row loop {loop_s:.4g} s, speedup {loop_s / one_pass_s:.0f}×")
    return 0
