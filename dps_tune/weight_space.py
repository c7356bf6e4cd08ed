"""Weight-space ensembles of fine-tuned CLIP models: WiSE-FT interpolation and model soups.

* **WiSE-FT** (Wortsman et al., 2022): θα = (1 − α)·θ0 + α·θ1 for the zero-shot weights
  θ0 and fine-tuned weights θ1, every tensor of the open_clip state dict. α = 0 is θ0
  and α = 1 is θ1, bit for bit.
* **Model soups** (Wortsman et al., 2022): the average of models fine-tuned from one θ0.
  The greedy recipe sorts the candidates by a validation metric, starts from the best,
  and keeps each next one only if the running average strictly improves that metric.

Weights are evaluated exactly as trials evaluate theirs (zero-shot head from the prompt
templates, then accuracy and macro-F1 per split), so α = 1 reproduces a checkpoint's
recorded metrics. No Ray here: :mod:`dps_tune.sweep.ensembles` spreads the evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from dps_tune import models
from dps_tune.config import Config
from dps_tune.data.inputs import open_inputs
from dps_tune.errors import UserError
from dps_tune.evaluate import evaluate_splits, tokenize_prompts
from dps_tune.train import resolve_runtime

State = Mapping[str, torch.Tensor]


def check_compatible(a: State, b: State, a_name: str, b_name: str) -> None:
    """Refuse two state dicts that are not the same architecture, tensor for tensor."""
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))[:3]
        raise UserError(f"{b_name}: a different architecture from {a_name} (tensors {only} are in one only)")
    for name, t in a.items():
        if t.shape != b[name].shape:
            raise UserError(f"{b_name}: tensor {name!r} is {tuple(b[name].shape)}, in {a_name} {tuple(t.shape)}")


def interpolate(theta0: State, theta1: State, alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·θ0 + α·θ1 for every tensor; integer tensors (counters, ids) come from the nearer end."""
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise UserError(f"alpha = {alpha}: must be in [0, 1]")
    if alpha == 0.0:
        return dict(theta0)
    if alpha == 1.0:
        return dict(theta1)
    out = {}
    for name, t0 in theta0.items():
        t1 = theta1[name]
        if t0.is_floating_point():
            out[name] = torch.lerp(t0.float(), t1.float(), alpha).to(t0.dtype)
        else:
            out[name] = (t1 if alpha >= 0.5 else t0).clone()
    return out


def average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The weighted mean of ``states`` (uniform by default); one state is returned as it is."""
    if not states:
        raise UserError("a soup needs at least one ingredient")
    if len(states) == 1:
        return dict(states[0])
    w = [1.0 / len(states)] * len(states) if weights is None else [float(x) for x in weights]
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for s, wi in zip(states, w):
                acc += wi * s[name].double()
            out[name] = acc.to(first.dtype)
        else:
            out[name] = states[int(max(range(len(w)), key=lambda i: w[i]))][name].clone()
    return out


@dataclass
class SoupStep:
    """One candidate of a greedy soup: whether it joined, and the soup's metric with it."""

    candidate: str
    value: float
    accepted: bool


def greedy_soup(candidates: Sequence[tuple[str, float]], evaluate: Callable[[list[str]], float], *,
                mode: str = "max") -> tuple[list[str], list[SoupStep]]:
    """The greedy recipe over ``(name, validation value)`` candidates.

    ``evaluate(names)`` returns the validation metric of the uniform soup of ``names``.
    Candidates are tried best first; one joins only if the soup strictly improves.
    Returns the ingredients and every step taken.
    """
    if not candidates:
        raise UserError("a soup needs at least one candidate")
    sign = 1.0 if mode == "max" else -1.0
    ordered = sorted(candidates, key=lambda c: -sign * c[1])
    soup, best = [ordered[0][0]], ordered[0][1]
    steps = [SoupStep(ordered[0][0], best, True)]
    for name, _ in ordered[1:]:
        value = evaluate([*soup, name])
        accepted = sign * value > sign * best
        steps.append(SoupStep(name, value, accepted))
        if accepted:
            soup.append(name)
            best = value
    return soup, steps


class Evaluator:
    """Evaluates state dicts of one config's architecture on its evaluation splits.

    The model, its data and prompt tokens are built once; each :meth:`__call__` loads a
    state dict into the model and evaluates it as a trial does.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        rt = resolve_runtime(cfg)  # the device and precision the trials evaluated with
        self.device, self.bf16 = rt.device, rt.bf16
        torch.manual_seed(cfg.seed)
        self.model = models.create_model(cfg.model, cfg.pretrained, device=self.device)
        self.theta0 = {k: v.detach().cpu().clone() for k, v in models.plain_state_dict(self.model).items()}
        self.inputs = open_inputs(cfg.data, models.preprocess_cfg(self.model), captions=False, seed=cfg.seed,
                                  device=self.device, pin_memory=rt.pin_memory)
        self.prompts = tokenize_prompts(models.get_tokenizer(cfg.model), self.inputs.spec.classnames,
                                        self.inputs.spec.templates)

    def __call__(self, state: State, splits: Iterable[str] | None = None,
                 predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
        """Figures of ``state`` on every evaluation split, or on ``splits``; ``predictions``
        receives each split's labels and predicted classes."""
        torch.manual_seed(self.cfg.seed)
        models.unwrap(self.model).load_state_dict(state, strict=True)
        return evaluate_splits(self.model, self.prompts, self.inputs.eval_loaders(splits), bf16=self.bf16,
                               predictions=predictions)
