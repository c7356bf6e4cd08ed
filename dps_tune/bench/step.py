"""``python -m dps_tune.bench step``: the training step, fast path against the paper-code-style step.

It times :func:`dps_tune.train.train_step`, the function every trial runs, with the
trainer's own pieces: the objective from :func:`dps_tune.methods.make_objective`
(compiled through :func:`dps_tune.train.compile_with_fallback` when the runtime says
so), AdamW from :func:`dps_tune.optim.build_optimizer`, the runtime from
:func:`dps_tune.train.resolve_runtime`, and for DPS a real
:class:`dps_tune.suppression.RowSuppressor` built from a ranking of the random θ0
against a perturbed copy. Weights and inputs are random; CE and DPS use 182 classes
and iWildCam's two templates.

Configurations, each printed as one line:

* ``fast``: what a trial does by default on this device (CUDA: bf16 autocast, fused
  AdamW, torch.compile of the loss; CPU: fp32, fused AdamW, eager) at ``--batch``;
* ``paper-code`` (with ``--baseline``): fp32, foreach (unfused) AdamW, no compile, batch 64;
* for ``--algorithm dps`` also a ``fast`` CE step, so the line for DPS can give the
  suppression's per-step overhead as a ratio measured in the same run.

Every configuration is built, warmed up (compiling, allocating AdamW state), then timed
in interleaved rounds, so that load on a shared machine hits all configurations alike;
each configuration's step time is the median over rounds. Peak memory is that of the
configuration's own model, optimizer state and step. The fraction of the bf16 peak uses
FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one eager forward
and backward, and the dense bf16 datasheet peak of the GPU (:data:`BF16_PEAK_TFLOPS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dps_tune import models, suppression
from dps_tune.bench import setup_logging
from dps_tune.bench.rank import fine_tune_stand_in
from dps_tune.config import Config, DPSConfig, OptimConfig, TrainConfig
from dps_tune.evaluate import autocast
from dps_tune.methods import (OBJECTIVES, Batch, Objective, ObjectiveContext, ce_logits_loss, contrastive_loss,
                              make_objective)
from dps_tune.optim import build_optimizer, lr_at, set_lr
from dps_tune.train import Runtime, compile_with_fallback, resolve_runtime, train_step

logger = logging.getLogger(__name__)

NUM_CLASSES = 182  # iWildCam
NUM_TEMPLATES = 2  # iWildCam's "a photo of {c}." and "{c} in the wild."
PAPER_BATCH = 64
SCHEDULE_STEPS = 10_000  # length of the lr schedule the timed steps sit in (warmup 500, as configured)
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity),
# matched in this order against torch.cuda.get_device_name(). The H200 has the H100 SXM's
# compute, so the same 989; the ~790 TFLOP/s sometimes quoted for it is a measured, not a datasheet, peak.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def bf16_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of ``device`` in FLOP/s; ``None`` on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


@dataclass
class StepSetup:
    """One configuration: its model, optimizer, objective and fixed batch, and what was measured."""

    label: str  # "fast", "paper-code"
    algorithm: str
    model_name: str
    batch_size: int
    rt: Runtime
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    batch: Batch
    class_tokens: torch.Tensor  # [T, C, L]
    step_s: list[float] = field(default_factory=list)  # mean step time of each timed round
    peak_bytes: int | None = None
    flops: float | None = None  # per step, forward + backward
    compile_failed: bool = False  # compile_with_fallback fell back to eager

    def describe(self) -> str:
        precision = "bf16" if self.rt.bf16 else "fp32"
        adamw = "adamw-fused" if self.rt.fused_adamw else "adamw-foreach"
        compiled = "compiled" if self.rt.compile else "eager"
        if self.compile_failed:
            compiled = "eager(compile-failed)"
        return (f"{self.label} {self.algorithm} {self.model_name} batch {self.batch_size} {precision} {adamw} "
                f"{compiled} on {self.rt.device.type}")

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.seconds_per_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(model: nn.Module, batch_size: int, captions: bool, device: torch.device,
                  gen: torch.Generator) -> Batch:
    size = models.image_size(model)
    images = torch.randn(batch_size, 3, size, size, generator=gen).to(device)  # [B, 3, H, W]
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=gen).to(device)  # [B]
    texts = None
    if captions:
        shape = (batch_size, model.context_length)
        texts = torch.randint(1, model.vocab_size, shape, generator=gen).to(device)  # [B, L]
    return Batch(images, labels, texts)


def _dps_suppressor(model: nn.Module, masking: float, seed: int) -> suppression.RowSuppressor:
    """The suppressor a DPS trial builds, from θ0 = the model's random weights and a stand-in θ1."""
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    theta1 = fine_tune_stand_in(theta0, seed=seed + 1)
    scores = suppression.rank_scores(theta0, theta1)
    del theta1
    masks = suppression.select_rows(scores, masking, "top", seed=seed)
    return suppression.RowSuppressor(model, masks)


def build_setup(label: str, algorithm: str, model_name: str, batch_size: int, rt: Runtime, *,
                masking: float, seed: int) -> StepSetup:
    """Everything a trial builds before its first step, for one configuration."""
    torch.manual_seed(seed)
    model = models.create_model(model_name, "none", device=rt.device)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    class_tokens = torch.randint(1, model.vocab_size, (NUM_TEMPLATES, NUM_CLASSES, model.context_length),
                                 generator=gen).to(rt.device)  # [T, C, L]
    ctx = ObjectiveContext(
        class_tokens=class_tokens,
        seed=seed,
        compile_fn=compile_with_fallback if rt.compile else None,
        make_suppressor=lambda: _dps_suppressor(model, masking, seed),
    )
    objective = make_objective(algorithm, ctx)
    o = OptimConfig()
    optimizer = build_optimizer(model, lr=o.lr, wd=o.wd, betas=(o.beta1, o.beta2), eps=o.eps, fused=rt.fused_adamw)
    objective.attach(model, optimizer)
    batch = _random_batch(model, batch_size, objective.uses_captions, rt.device, gen)
    return StepSetup(label, algorithm, model_name, batch_size, rt, model, optimizer, objective, batch, class_tokens)


def run_steps(s: StepSetup, n: int, first_step: int) -> None:
    """``n`` trainer steps, learning rate set per step as a trial does; no host sync."""
    o = OptimConfig()
    for i in range(n):
        set_lr(s.optimizer, lr_at(first_step + i, o.lr, o.warmup_steps, SCHEDULE_STEPS))
        train_step(s.model, s.objective, s.optimizer, s.batch, s.rt, o.grad_clip)


def count_flops(s: StepSetup) -> float:
    """FLOPs of one forward and backward of the objective's loss, counted eagerly.

    The compiled objective hides its operators from the counter, so this runs the
    uncompiled loss function the objective wraps, on the same model and batch.
    """
    with FlopCounterMode(display=False) as counter:
        with autocast(s.rt.device, s.rt.bf16):
            if s.batch.texts is not None:
                loss = contrastive_loss(s.model, s.batch.images, s.batch.texts)
            else:
                loss = ce_logits_loss(s.model, s.batch.images, s.class_tokens[0], s.batch.labels)
        loss.backward()
    s.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class _CompileFailures(logging.Handler):
    """Notices :func:`compile_with_fallback`'s warning, so a line never claims "compiled" falsely."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or "torch.compile failed" in record.getMessage()


def warm_up(s: StepSetup, steps: int, base_bytes: int) -> None:
    """Compile, allocate AdamW state and record the configuration's own peak memory."""
    dev = s.rt.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    catch = _CompileFailures()
    logging.getLogger("dps_tune.train").addHandler(catch)
    start = time.perf_counter()
    try:
        run_steps(s, steps, 0)
        _sync(dev)
    finally:
        logging.getLogger("dps_tune.train").removeHandler(catch)
    s.compile_failed = catch.seen
    logger.info("%s: %d warm-up step(s) in %.1f s", s.describe(), steps, time.perf_counter() - start)
    if dev.type == "cuda":
        s.peak_bytes = torch.cuda.max_memory_allocated(dev) - base_bytes
    s.flops = count_flops(s)


def time_rounds(setups: list[StepSetup], steps: int, rounds: int, first_step: int) -> None:
    """Interleave the configurations: each round times ``steps / rounds`` steps of each one."""
    per_round = max(1, math.ceil(steps / rounds))
    for r in range(rounds):
        for s in setups:
            _sync(s.rt.device)
            start = time.perf_counter()
            run_steps(s, per_round, first_step + r * per_round)
            _sync(s.rt.device)
            s.step_s.append((time.perf_counter() - start) / per_round)


def format_line(s: StepSetup, peak_flops: float | None, baseline: StepSetup | None,
                reference: StepSetup | None) -> str:
    """``step: <configuration>: <img/s>, ..., speedup vs baseline Z×``."""
    parts = [f"{s.images_per_s:.1f} img/s", f"{s.seconds_per_step * 1e3:.1f} ms/step"]
    parts.append(f"peak mem {s.peak_bytes / 2**30:.2f} GiB" if s.peak_bytes is not None else "peak mem n/a")
    parts.append(f"{s.flops / 1e12:.3g} TFLOP/step" if s.flops else "TFLOP/step n/a")
    if peak_flops and s.flops:
        parts.append(f"{100 * s.flops / s.seconds_per_step / peak_flops:.1f}% of bf16 peak")
    else:
        parts.append("bf16 peak n/a")
    if reference is not None:
        ratio = s.seconds_per_step / reference.seconds_per_step
        parts.append(f"{s.algorithm} overhead vs {reference.algorithm} {ratio:.3f}× ({100 * (ratio - 1):+.1f}%)")
    if baseline is not None:
        parts.append(f"speedup vs baseline {s.images_per_s / baseline.images_per_s:.2f}×")
    else:
        parts.append("speedup vs baseline n/a")
    return f"step: {s.describe()}: " + ", ".join(parts)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dps_tune.bench step",
                                description="Time the training step against the paper-code-style step.")
    p.add_argument("--model", default=None,
                   help="open_clip architecture, random weights (default: ViT-B-16 on CUDA, tiny-vit on CPU)")
    p.add_argument("--algorithm", default="ce", choices=list(OBJECTIVES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per configuration (default: 20 on CUDA, 8 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per configuration first (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds (default: 4 on CUDA, where a round ends in a sync that "
                        "real training does not have; one per step on CPU, where load drifts)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the loss (default: as a trial does, on for CUDA)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the paper-code-style step: fp32, unfused AdamW, no compile, batch 64")
    p.add_argument("--baseline-batch", type=int, default=PAPER_BATCH)
    p.add_argument("--masking", type=float, default=DPSConfig().masking, help="DPS: fraction of rows suppressed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on shared cores, multi-threaded kernels stall at barriers)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch", "steps", "warmup", "rounds", "baseline_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args



def main(argv: list[str]) -> int:
    args = _parse(argv)
    setup_logging()
    compile_mode = "auto" if args.compile is None else ("on" if args.compile else "off")
    rt = resolve_runtime(Config(train=TrainConfig(device=args.device, compile=compile_mode)))
    dev = rt.device
    if dev.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    cuda = dev.type == "cuda"
    model_name = args.model or ("ViT-B-16" if cuda else "tiny-vit")
    steps = args.steps or (20 if cuda else 8)
    warmup = args.warmup or (3 if cuda else 1)
    rounds = min(args.rounds or (4 if cuda else steps), steps)
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak_flops(dev)
    logger.info("device: %s", torch.cuda.get_device_name(dev) if cuda else "cpu")

    plan: list[tuple[str, str, int, Runtime]] = []
    if args.baseline:
        paper = dataclasses.replace(rt, bf16=False, compile=False, fused_adamw=False)
        plan.append(("paper-code", args.algorithm, args.baseline_batch, paper))
    if args.algorithm == "dps":
        plan.append(("fast", "ce", args.batch, rt))
    plan.append(("fast", args.algorithm, args.batch, rt))

    setups: list[StepSetup] = []
    for label, algorithm, batch_size, run_rt in plan:
        _sync(dev)
        base_bytes = torch.cuda.memory_allocated(dev) if cuda else 0
        s = build_setup(label, algorithm, model_name, batch_size, run_rt, masking=args.masking, seed=args.seed)
        warm_up(s, warmup, base_bytes)
        setups.append(s)
    time_rounds(setups, steps, rounds, first_step=warmup)

    baseline = setups[0] if args.baseline else None
    ce_reference = next((s for s in setups if s.label == "fast" and s.algorithm == "ce"), None)
    for s in setups:
        reference = ce_reference if s.algorithm == "dps" and s.label == "fast" else None
        print(format_line(s, peak_flops, baseline, reference))
    return 0
