"""Run one trial of CE, FLYP or DPS: the training core. No Ray in here.

:func:`run_trial` takes a frozen config and a ``report(metrics, checkpoint_dir)``
callback, trains, evaluates after every epoch (and every ``eval_every_steps``),
and can resume from a checkpoint directory exactly where it stopped: model,
optimizer, schedule position, epoch, step and RNG.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from dps_tune import checkpoint as ckpt
from dps_tune import data as data_mod
from dps_tune import models, suppression
from dps_tune import augment, cached_data
from dps_tune.config import Config
from dps_tune.errors import CheckpointError, TrainingError
from dps_tune.evaluate import autocast, evaluate_splits, tokenize_prompts
from dps_tune.methods import Batch, Objective, ObjectiveContext, make_objective
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
    return Runtime(device, bf16, compile_, fused_adamw=cuda, pin_memory=cuda)


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
        logger.warning("torch.compile failed (%s: %s); running eagerly", type(exc).__name__,
                       str(exc).splitlines()[0][:200] if str(exc) else "")
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
                           str(exc).splitlines()[0][:200] if str(exc) else "")
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


def resolve_reference(cfg: Config) -> str:
    """The DPS reference checkpoint: ``dps.reference``, or the best of ``dps.reference_experiment``."""
    from dps_tune.results import best_checkpoint, default_mode

    if cfg.dps.reference is not None:
        return cfg.dps.reference
    metric = cfg.dps.reference_metric
    path = str(best_checkpoint(cfg.dps.reference_experiment, metric, default_mode(metric)))
    logger.info("DPS reference: best checkpoint of %s by %s: %s", cfg.dps.reference_experiment, metric, path)
    return path


def dps_ranking(cfg: Config, theta0: Mapping[str, torch.Tensor] | None = None,
                reference: str | None = None) -> tuple[suppression.Scores, bool]:
    """The DPS ranking for ``cfg`` (pretrained vs reference) through the on-disk cache; ``(scores, hit)``."""
    if theta0 is None:
        theta0 = models.pretrained_state_dict(cfg.model, cfg.pretrained, seed=cfg.seed)
    theta1 = models.load_weights_file(reference or resolve_reference(cfg))
    return suppression.cached_ranking(theta0, theta1, cfg.dps.ranking_cache)


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
    resume_from: str | Path | None = None,
    ranking: suppression.Scores | None = None,
    work_dir: str | Path | None = None,
    progress: bool = False,
    memory_fraction: float | None = None,
) -> dict[str, float]:
    """Train one trial of ``cfg`` and return the metrics of its last evaluation.

    ``report(metrics, checkpoint_dir)`` is called after every evaluation. The
    checkpoint directory is only valid during the call: move or copy it to keep it.
    ``ranking`` gives DPS precomputed scores (a sweep computes them once); without it
    the ranking comes from the on-disk cache. ``memory_fraction`` caps this process's
    share of the GPU memory (fractional-GPU trials).
    """
    rt = resolve_runtime(cfg)
    if memory_fraction is not None and rt.device.type == "cuda" and 0 < memory_fraction < 1:
        # An index, not rt.device: torch rejects a bare torch.device("cuda") here.
        torch.cuda.set_per_process_memory_fraction(float(memory_fraction), rt.device.index)
    torch.manual_seed(cfg.seed)
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="dps_tune_") if own_work_dir else work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _Trial(cfg, rt, report, ranking, work, progress, memory_fraction).run(resume_from)
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)


def evaluate_start(cfg: Config) -> dict[str, float]:
    """Metrics of the weights ``cfg`` starts from (zero-shot for a pretrained model), no training."""
    from dps_tune.config import with_overrides

    cfg = with_overrides(cfg, {"algorithm": "ce"}, check_paths=False)  # no DPS reference needed to evaluate
    rt = resolve_runtime(cfg)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="dps_tune_") as work:
        trial = _Trial(cfg, rt, None, None, Path(work), False, None)
        return evaluate_splits(trial.model, trial.prompts, trial._eval_loaders(), bf16=rt.bf16)


class _Trial:
    """The state of one running trial, so the loop below can stay short."""

    def __init__(self, cfg: Config, rt: Runtime, report: ReportFn | None, ranking, work: Path,
                 progress: bool, memory_fraction: float | None):
        self.cfg, self.rt, self.report_fn, self.work = cfg, rt, report, work
        self.progress, self.memory_fraction = progress, memory_fraction
        dev = rt.device

        self.model = models.create_model(cfg.model, cfg.pretrained, device=dev)
        self.model.train()
        self.spec = data_mod.load_dataset(cfg.data)
        # A prepared image cache replaces JPEG decoding. A stale one is refused here, before
        # any training; images that `dps-tune prepare --skip-bad` left out are dropped.
        self.cache: cached_data.ImageCache | None = None
        if cfg.data.image_cache is not None:
            self.cache, self.spec = cached_data.open_for(cfg.data.image_cache, self.spec,
                                                         model_size=models.image_size(self.model))
        tokenizer = models.get_tokenizer(cfg.model)
        self.prompts = tokenize_prompts(tokenizer, self.spec.classnames, self.spec.templates)  # [T, C, L]

        def make_suppressor():
            scores = ranking if ranking is not None else dps_ranking(cfg, models.plain_state_dict(self.model))[0]
            masks = suppression.select_rows(scores, cfg.dps.masking, cfg.dps.suppress, seed=cfg.seed)
            sup = suppression.RowSuppressor(self.model, masks)
            logger.info("DPS: suppressing %d of %d ranked rows (masking %.3f, %s)", sup.num_suppressed,
                        sup.num_ranked, cfg.dps.masking, cfg.dps.suppress)
            return sup

        ctx = ObjectiveContext(
            class_tokens=self.prompts.to(dev),
            seed=cfg.seed,
            compile_fn=compile_with_fallback if rt.compile else None,
            make_suppressor=make_suppressor,
        )
        self.objective = make_objective(cfg.algorithm, ctx)
        self.records = self.spec.train_pairs if self.objective.uses_captions else self.spec.train_images
        self.captions = (tokenizer(list(self.records.captions)) if self.objective.uses_captions else None)  # [N, L]

        pre = models.preprocess_cfg(self.model)
        self.train_tf = data_mod.TrainTransform(models.image_size(self.model), pre.mean, pre.std)
        self.eval_tf = models.eval_transform(self.model)
        if self.cache is not None:
            # The same preprocessing for cached uint8 batches, run on the trial's device.
            self.device_train_tf, self.device_eval_tf = augment.for_model(self.model)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, lr=o.lr, wd=o.wd, betas=(o.beta1, o.beta2), eps=o.eps,
                                         fused=rt.fused_adamw)
        self.objective.attach(self.model, self.optimizer)
        self.batch_size = min(cfg.data.batch_size, len(self.records))
        self.steps_per_epoch = data_mod.steps_per_epoch(len(self.records), cfg.data.batch_size)
        self.total_steps = o.epochs * self.steps_per_epoch
        self.loop = ckpt.LoopState()
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ resume

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

    # -------------------------------------------------------------------- loop

    def _batches(self) -> Iterator[Batch]:
        cfg, dev = self.cfg, self.rt.device
        if self.cache is not None:
            loader = cached_data.CachedTrainLoader(
                self.cache, self.records, self.device_train_tf, batch_size=cfg.data.batch_size, seed=cfg.seed,
                epoch=self.loop.epoch, start_batch=self.loop.batch_in_epoch, device=dev,
                pin_memory=self.rt.pin_memory)
        else:
            loader = data_mod.train_loader(
                self.records, self.train_tf, batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                seed=cfg.seed, epoch=self.loop.epoch, start_batch=self.loop.batch_in_epoch,
                pin_memory=self.rt.pin_memory)
        for images, labels, index in loader:
            texts = None
            if self.captions is not None:
                texts = self.captions[index]  # [B, L]
                if self.rt.pin_memory:  # a pageable source may make the copy wait for the GPU
                    texts = texts.pin_memory()
                texts = texts.to(dev, non_blocking=True)
            yield Batch(images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), texts)

    def _eval_loaders(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.cache is not None:
            return {
                split: cached_data.CachedEvalLoader(self.cache, records, self.device_eval_tf,
                                                   batch_size=cfg.data.eval_batch_size, device=self.rt.device,
                                                   pin_memory=self.rt.pin_memory)
                for split, records in self.spec.splits.items()
            }
        return {
            split: data_mod.eval_loader(records, self.eval_tf, batch_size=cfg.data.eval_batch_size,
                                        workers=cfg.data.workers, pin_memory=self.rt.pin_memory)
            for split, records in self.spec.splits.items()
        }

    def run(self, resume_from: str | Path | None) -> dict[str, float]:
        if resume_from is not None:
            self.resume(resume_from)
        cfg, o = self.cfg, self.cfg.optim
        meter = _LossMeter(self.rt.device)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.loop.step, desc=f"{cfg.algorithm} {cfg.model}",
                       unit="step", dynamic_ncols=True, leave=False)
        train_time, samples = 0.0, 0
        eval_every = cfg.train.eval_every_steps
        try:
            while self.loop.epoch < o.epochs:
                tick = time.perf_counter()
                for batch in self._batches():
                    set_lr(self.optimizer, lr_at(self.loop.step, o.lr, o.warmup_steps, self.total_steps))
                    self._step(batch, meter)
                    samples += batch.labels.shape[0]
                    if bar is not None:
                        bar.update(1)
                    if self.loop.step % cfg.train.log_every_steps == 0:
                        loss = meter.mean()  # host sync: once per log interval
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", epoch=self.loop.epoch + 1)
                    end_of_epoch = self.loop.batch_in_epoch == self.steps_per_epoch
                    if end_of_epoch:
                        self.loop.epoch += 1
                        self.loop.batch_in_epoch = 0
                    if end_of_epoch or (eval_every and self.loop.step % eval_every == 0):
                        if self.rt.device.type == "cuda":
                            torch.cuda.synchronize(self.rt.device)
                        train_time += time.perf_counter() - tick
                        self._evaluate_and_report(meter, samples / max(train_time, 1e-9))
                        train_time, samples = 0.0, 0
                        meter.reset()
                        tick = time.perf_counter()
                    if end_of_epoch:
                        break
                else:
                    raise RuntimeError(f"epoch {self.loop.epoch + 1} ended after {self.loop.batch_in_epoch} of "
                                       f"{self.steps_per_epoch} batches")
        except torch.cuda.OutOfMemoryError:
            share = f"{self.memory_fraction:g} of the GPU" if self.memory_fraction else "the whole GPU"
            raise TrainingError(f"CUDA out of memory at data.batch_size={cfg.data.batch_size} with {share}; "
                                "lower the batch size or give the trial a larger GPU share") from None
        finally:
            if bar is not None:
                bar.close()
        return self.last_metrics

    def _step(self, batch: Batch, meter: _LossMeter) -> None:
        loss = train_step(self.model, self.objective, self.optimizer, batch, self.rt, self.cfg.optim.grad_clip)
        meter.add(loss, self.loop.step)
        self.loop.step += 1
        self.loop.batch_in_epoch += 1

    def _evaluate_and_report(self, meter: _LossMeter, samples_per_s: float) -> None:
        train_loss = meter.mean()
        metrics: dict[str, float] = {
            "epoch": round(self.loop.epoch + self.loop.batch_in_epoch / self.steps_per_epoch, 4),
            "step": self.loop.step,
            "train_loss": train_loss,
            "lr": lr_at(max(0, self.loop.step - 1), self.cfg.optim.lr, self.cfg.optim.warmup_steps, self.total_steps),
            "samples_per_s": samples_per_s,
        }
        metrics.update(evaluate_splits(self.model, self.prompts, self._eval_loaders(), bf16=self.rt.bf16))
        self.last_metrics = metrics
        if self.report_fn is None:
            return
        path = None
        final = self.loop.epoch >= self.cfg.optim.epochs
        if self.cfg.train.checkpoint_every_eval or final:
            path = ckpt.save_checkpoint(
                self.work / f"checkpoint_{self.loop.step:08d}",
                model_state=models.plain_state_dict(self.model),
                config=self.cfg,
                metrics=metrics,
                loop=self.loop,
                optimizer_state=self.optimizer.state_dict(),
                extra_state={"objective": self.objective.state_dict()},
            )
        try:
            self.report_fn(metrics, path)
        finally:
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)

