"""Run one trial of CE, FLYP or DPS: the training core. It knows nothing of sweeps or Ray.

:func:`run_trial` takes a frozen config, a ``report(metrics, checkpoint_dir)``
callback and, for DPS, the row ranking; it trains, evaluates after every epoch (and
every ``train.eval_every_steps``), and can resume from a checkpoint directory exactly
where it stopped: model, optimizer, schedule position, epoch, step and RNG.
Resolving a DPS reference to a checkpoint and computing its ranking is the caller's
job (the ``dps-tune`` commands do it once, before any trial starts).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from dps_tune import checkpoint as ckpt
from dps_tune import models, retention, suppression
from dps_tune.config import Config
from dps_tune.data.inputs import Inputs, open_inputs
from dps_tune.errors import CheckpointError, TrainingError, first_line
from dps_tune.evaluate import autocast, evaluate_splits, tokenize_prompts
from dps_tune.methods import Batch, Objective, ObjectiveContext, make_objective, uses_captions
from dps_tune.objectives import is_test_split
from dps_tune.optim import build_optimizer, lr_at, set_lr

logger = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], "Path | None"], None]


@dataclass(frozen=True)
class Runtime:
    """Device-dependent choices, resolved once from ``cfg.train``."""

    device: torch.device
    bf16: bool
    compile: bool
    fused_adamw: bool
    pin_memory: bool


def resolve_runtime(cfg: Config) -> Runtime:
    t = cfg.train
    if t.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(t.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"train.device = {t.device!r}: no CUDA device is visible")
    cuda = device.type == "cuda"
    bf16 = cuda if t.precision == "auto" else t.precision == "bf16"
    if bf16 and not cuda:
        raise TrainingError("train.precision = 'bf16': bf16 autocast is only used on CUDA; use fp32 on the CPU")
    compile_ = cuda if t.compile == "auto" else t.compile == "on"
    # Fused AdamW on the CPU too (torch >= 2.4): one AdamW step over a tiny CLIP's 3.3M parameters
    # (the 49,408-row token table is most of them) took 16 ms with foreach and 4.2 ms fused, on one thread.
    return Runtime(device, bf16, compile_, fused_adamw=True, pin_memory=cuda)


def _backward_compiled_now() -> contextlib.AbstractContextManager:
    """Make AOTAutograd lower the backward graph during the first forward call.

    By default it does so lazily, at the first ``backward()``: a backward that fails to
    compile would then crash the step outside :func:`compile_with_fallback`, and the
    logged compile time would leave the backward out.
    """
    try:
        from torch._functorch import config as aot_config
    except ImportError:  # a torch without AOTAutograd's config: keep its default
        return contextlib.nullcontext()
    if not hasattr(aot_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return aot_config.patch(force_non_lazy_backward_lowering=True)


def compile_with_fallback(fn: Callable) -> Callable:
    """``torch.compile(fn)``; if compiling fails, warn once and run ``fn`` eagerly."""
    try:
        compiled = torch.compile(fn)
    except Exception as exc:  # e.g. a Python version torch.compile does not support yet
        logger.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__, first_line(exc, 200))
        return fn
    state = {"fn": compiled, "first": True}

    def call(*args, **kwargs):
        if not state["first"]:
            return state["fn"](*args, **kwargs)
        start = time.perf_counter()
        try:
            with _backward_compiled_now():
                out = compiled(*args, **kwargs)
            logger.info("torch.compile of %s took %.1f s", getattr(fn, "__name__", fn), time.perf_counter() - start)
            state["fn"] = compiled
        except Exception as exc:  # compiler bugs, missing toolchains: training must go on
            logger.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__,
                           first_line(exc, 200))
            state["fn"] = fn
            out = fn(*args, **kwargs)
        state["first"] = False
        return out

    return call


def train_step(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer, batch: Batch,
               rt: Runtime, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimizer step of ``objective`` on ``batch``: the step every trial runs.

    The forward pass runs under the runtime's autocast, the backward and the optimizer
    step outside it. Returns the detached loss, still on the device: nothing here
    waits for the GPU (``python -m dps_tune.bench step`` times exactly this function).
    """
    with autocast(rt.device, rt.bf16):
        loss = objective.loss(model, batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


class _LossMeter:
    """Running loss kept on the device; read (one host sync) only when logged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), device=self.device, dtype=torch.float64)
        self.count = 0
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().double()
        self.total += loss
        self.count += 1
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self) -> None:
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise TrainingError(f"loss became NaN or infinite at step {bad}; lower optim.lr or check the data")

    def mean(self) -> float:
        self.check()
        return float(self.total.item()) / max(1, self.count)


def run_trial(
    cfg: Config,
    report: ReportFn | None = None,
    *,
    ranking: suppression.Scores | None = None,
    resume_from: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress: bool = False,
    memory_fraction: float | None = None,
    keep: retention.Retention | None = None,
    derive: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train one trial of ``cfg`` and return the metrics of its last evaluation.

    ``report(metrics, checkpoint_dir)`` is called after every evaluation. The
    checkpoint directory is only valid during the call: move or copy it to keep it.
    ``ranking`` holds the DPS row scores (``suppression.rank_scores(θ0, θ1)``) and is
    required when ``cfg.algorithm`` is ``dps``. ``memory_fraction`` caps this
    process's share of the GPU memory (fractional-GPU trials). ``keep`` decides which
    reports write weights and which write train state (a sweep's checkpoint economy);
    without it every evaluation writes both, if ``train.checkpoint_every_eval``, and the
    last one always does. ``derive(metrics)`` adds metrics computed from the evaluated
    ones (a sweep's ``objective_mean``) before they are checkpointed and reported.
    """
    if cfg.algorithm == "dps" and ranking is None:
        raise TrainingError("algorithm dps needs the DPS ranking of the pretrained and the reference weights; "
                            "pass ranking= (dps_tune.suppression.cached_ranking computes it)")
    rt = resolve_runtime(cfg)
    if memory_fraction is not None and rt.device.type == "cuda" and 0 < memory_fraction < 1:
        # An index, not rt.device: torch rejects a bare torch.device("cuda") here.
        torch.cuda.set_per_process_memory_fraction(float(memory_fraction), rt.device.index)
    torch.manual_seed(cfg.seed)
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dps_tune_") if own_work_dir else work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        trial = _TrialRun(cfg, rt, ranking, work, memory_fraction, keep, derive)
        if resume_from is not None:
            trial.resume(resume_from)
        return trial.run(report, progress)
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _model_and_inputs(cfg: Config, rt: Runtime, *, captions: bool) -> tuple[nn.Module, Inputs, torch.Tensor]:
    """The model ``cfg`` starts from, its input pipeline and its prompt tokens [T, C, L]."""
    model = models.create_model(cfg.model, cfg.pretrained, device=rt.device)
    inputs = open_inputs(cfg.data, models.preprocess_cfg(model), captions=captions, seed=cfg.seed,
                         device=rt.device, pin_memory=rt.pin_memory)
    prompts = tokenize_prompts(models.get_tokenizer(cfg.model), inputs.spec.classnames, inputs.spec.templates)
    return model, inputs, prompts


def evaluate_start(cfg: Config, predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                   ) -> dict[str, float]:
    """Metrics of the weights ``cfg`` starts from (zero-shot for a pretrained model), without training.

    The same evaluation every trial runs after each epoch: the zero-shot head from the
    prompt templates, then accuracy and macro-F1 on every evaluation split.
    ``predictions``, when given, receives ``(labels, predicted classes)`` per split.
    """
    rt = resolve_runtime(cfg)
    torch.manual_seed(cfg.seed)
    model, inputs, prompts = _model_and_inputs(cfg, rt, captions=False)
    return evaluate_splits(model, prompts, inputs.eval_loaders(), bf16=rt.bf16, predictions=predictions)


class _TrialRun:
    """The state of one running trial: model, inputs, objective, optimizer and loop position."""

    def __init__(self, cfg: Config, rt: Runtime, ranking: suppression.Scores | None, work: Path,
                 memory_fraction: float | None, keep: retention.Retention | None,
                 derive: Callable[[dict[str, float]], dict[str, float]] | None = None):
        self.cfg, self.rt, self.work, self.memory_fraction, self.keep = cfg, rt, work, memory_fraction, keep
        self.derive = derive
        tokenizer = models.get_tokenizer(cfg.model)
        self.holding: dict[str, float] = {}

        def make_suppressor() -> suppression.RowSuppressor:
            masks = suppression.select_rows(ranking, cfg.dps.masking, cfg.dps.suppress, seed=cfg.seed,
                                            quota=cfg.dps.quota, exclude=cfg.dps.exclude)
            sup = suppression.RowSuppressor(self.model, masks)
            held = suppression.holdings(masks, {n: tuple(p.shape) for n, p in self.model.named_parameters()
                                                if p.requires_grad})
            # Reported with every evaluation: what this trial really trains.
            self.holding = suppression.holding_metrics(held)
            logger.info("DPS: suppressing %d of %d ranked rows (masking %.3f, %s, quota %s); %.1f%% of the "
                        "parameters still train", sup.num_suppressed, sup.num_ranked, cfg.dps.masking,
                        cfg.dps.suppress, cfg.dps.quota, 100 * held[-1].params_train_frac)
            return sup

        captions = uses_captions(cfg.algorithm)
        self.model, self.inputs, self.prompts = _model_and_inputs(cfg, rt, captions=captions)
        models.set_training(self.model, batchnorm=cfg.train.batchnorm)
        self.objective = make_objective(cfg.algorithm, ObjectiveContext(
            class_tokens=self.prompts.to(rt.device),
            seed=cfg.seed,
            compile_fn=compile_with_fallback if rt.compile else None,
            make_suppressor=make_suppressor,
        ))
        self.captions = tokenizer(list(self.inputs.records.captions)) if captions else None  # [N, L]
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, lr=o.lr, wd=o.wd, betas=(o.beta1, o.beta2), eps=o.eps,
                                         fused=rt.fused_adamw)
        self.objective.attach(self.model, self.optimizer)
        self.steps_per_epoch = self.inputs.steps_per_epoch
        self.total_steps = o.epochs * self.steps_per_epoch
        self.loop = ckpt.LoopState()
        self.last_metrics: dict[str, float] = {}

    def resume(self, path: str | Path) -> None:
        loaded = ckpt.load_checkpoint(path)
        if loaded.train_state is None:
            raise CheckpointError(f"checkpoint {str(path)!r}: no training state to resume from")
        missing, unexpected = self.model.load_state_dict(loaded.model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit {self.cfg.model}: "
                                  f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
        state = loaded.train_state
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state.get("objective", {}))
        ckpt.restore_rng(state)
        self.loop = loaded.loop
        self.last_metrics = {k: v for k, v in loaded.metrics.items() if isinstance(v, (int, float))}
        logger.info("resumed from %s at epoch %d, step %d", path, self.loop.epoch, self.loop.step)

    def _batches(self) -> Iterator[Batch]:
        """The rest of the current epoch, from the loop's position, with captions for FLYP."""
        for images, labels, index in self.inputs.train_batches(self.loop.epoch, self.loop.batch_in_epoch):
            texts = None
            if self.captions is not None:
                texts = self.captions[index]  # [B, L]
                if self.rt.pin_memory:  # a pageable source may make the copy wait for the GPU
                    texts = texts.pin_memory()
                texts = texts.to(self.rt.device, non_blocking=True)
            yield Batch(images, labels, texts)

    def run(self, report: ReportFn | None, progress: bool) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        log_every, eval_every = cfg.train.log_every_steps, cfg.train.eval_every_steps
        meter = _LossMeter(self.rt.device)
        clock = _Throughput(self.rt.device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.loop.step, desc=f"{cfg.algorithm} {cfg.model}",
                       unit="step", dynamic_ncols=True, leave=False)
        try:
            while self.loop.epoch < o.epochs:
                for batch in self._batches():
                    set_lr(self.optimizer, lr_at(self.loop.step, o.lr, o.warmup_steps, self.total_steps))
                    loss = train_step(self.model, self.objective, self.optimizer, batch, self.rt, o.grad_clip)
                    meter.add(loss, self.loop.step)
                    clock.add(batch.labels.shape[0])
                    self.loop.step += 1
                    self.loop.batch_in_epoch += 1
                    if bar is not None:
                        bar.update(1)
                    if self.loop.step % log_every == 0:
                        self._log(meter.mean(), bar)  # host sync: once per log interval
                    mid_epoch = self.loop.batch_in_epoch < self.steps_per_epoch
                    if mid_epoch and eval_every and self.loop.step % eval_every == 0:
                        self._evaluate_and_report(report, meter, clock)
                if self.loop.batch_in_epoch != self.steps_per_epoch:
                    raise RuntimeError(f"epoch {self.loop.epoch + 1} ended after {self.loop.batch_in_epoch} of "
                                       f"{self.steps_per_epoch} batches")
                self.loop.epoch += 1
                self.loop.batch_in_epoch = 0
                self._evaluate_and_report(report, meter, clock)
        except torch.cuda.OutOfMemoryError:
            share = f"{self.memory_fraction:g} of the GPU" if self.memory_fraction else "the whole GPU"
            raise TrainingError(f"CUDA out of memory at data.batch_size={cfg.data.batch_size} with {share}; "
                                "lower the batch size or give the trial a larger GPU share") from None
        finally:
            if bar is not None:
                bar.close()
        return self.last_metrics

    def _log(self, loss: float, bar) -> None:
        epoch = self.loop.epoch + self.loop.batch_in_epoch / self.steps_per_epoch
        lr = self.optimizer.param_groups[0]["lr"]
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", epoch=self.loop.epoch + 1)
        else:  # no bar (sweeps, --no-progress): the log is the only sign of life between evaluations
            logger.info("step %d/%d (epoch %.2f): loss %.4f, lr %.3g", self.loop.step, self.total_steps, epoch,
                        loss, lr)

    def _evaluate_and_report(self, report: ReportFn | None, meter: _LossMeter, clock: "_Throughput") -> None:
        metrics: dict[str, float] = {
            "epoch": round(self.loop.epoch + self.loop.batch_in_epoch / self.steps_per_epoch, 4),
            "step": self.loop.step,
            "train_loss": meter.mean(),
            "lr": lr_at(max(0, self.loop.step - 1), self.cfg.optim.lr, self.cfg.optim.warmup_steps, self.total_steps),
            "samples_per_s": clock.rate(),
            **self.holding,
        }
        self.predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        metrics.update(evaluate_splits(self.model, self.prompts, self.inputs.eval_loaders(self._splits_now()),
                                       bf16=self.rt.bf16, predictions=self.predictions))
        if self.derive is not None:
            metrics.update(self.derive(metrics))
        self.last_metrics = metrics
        meter.reset()
        if report is not None:
            self._report(report, metrics)
        clock.restart()

    def _splits_now(self) -> list[str] | None:
        """The splits this report evaluates: every split at the end of training (or with
        ``train.eval_test: every_report``), else the validation splits alone. Checkpoints
        kept from earlier reports get their test figures once the trial is over
        (:mod:`dps_tune.sweep.test_figures`)."""
        final = self.loop.epoch >= self.cfg.optim.epochs
        if final or self.cfg.train.eval_test == "every_report":
            return None
        return [s for s in self.inputs.spec.splits if not is_test_split(s)]

    def _plan(self, metrics: dict[str, float]) -> retention.Plan:
        if self.keep is not None:
            return self.keep.plan(metrics)
        final = self.loop.epoch >= self.cfg.optim.epochs
        return retention.FULL if self.cfg.train.checkpoint_every_eval or final else retention.NOTHING

    def _report(self, report: ReportFn, metrics: dict[str, float]) -> None:
        plan = self._plan(metrics)
        path = None
        if plan.weights:
            path = ckpt.save_checkpoint(
                self.work / f"checkpoint_{self.loop.step:08d}",
                model_state=models.plain_state_dict(self.model),
                config=self.cfg,
                metrics=metrics,
                loop=self.loop if plan.state else None,
                optimizer_state=self.optimizer.state_dict() if plan.state else None,
                extra_state={"objective": self.objective.state_dict()} if plan.state else None,
                predictions=self.predictions,
            )
        try:
            report(metrics, path)
        finally:
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        if self.keep is not None:
            self.keep.record(metrics, plan)


class _Throughput:
    """Training samples per second between evaluations; waits for the GPU only when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.samples / max(time.perf_counter() - self.start, 1e-9)
