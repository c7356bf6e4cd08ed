"""The three fine-tuning objectives behind one contract: ``loss(model, batch) -> {"loss": ...}``.

The training loop never branches on the method's name. It asks an objective which
records it trains on (:attr:`Objective.uses_captions`) and lets it hook the optimizer
(:meth:`Objective.attach`); DPS uses that hook to hold its suppressed rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dps_tune.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], normalised
    labels: torch.Tensor  # [B]
    texts: torch.Tensor | None = None  # [B, L] caption tokens (FLYP)


def ce_logits_loss(model: nn.Module, images: torch.Tensor, class_tokens: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``exp(s) * img @ text.T`` against the class labels."""
    img = model.encode_image(images, normalize=True)  # [B, D]
    txt = model.encode_text(class_tokens, normalize=True)  # [C, D]
    logits = model.logit_scale.exp() * img @ txt.T  # [B, C]
    return F.cross_entropy(logits.float(), labels)


def contrastive_loss(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of image–caption pairs, as in CLIP pretraining."""
    img = model.encode_image(images, normalize=True)  # [B, D]
    txt = model.encode_text(texts, normalize=True)  # [B, D]
    logits = (model.logit_scale.exp() * img @ txt.T).float()  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Objective:
    """Base class. Subclasses set :attr:`name` and implement :meth:`loss`."""

    name: str = ""
    uses_captions: bool = False

    def __init__(self, compile_fn: Callable[[Callable], Callable] | None = None):
        self._compile = compile_fn or (lambda fn: fn)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Hook the optimizer; the default objective needs nothing."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pass


class CEObjective(Objective):
    """Text-head cross-entropy: a fresh random template per class at every step."""

    name = "ce"

    def __init__(self, class_tokens: torch.Tensor, seed: int, compile_fn=None):
        super().__init__(compile_fn)
        self.class_tokens = class_tokens  # [T, C, L] on the training device
        self.generator = torch.Generator().manual_seed(seed)
        self._forward = self._compile(ce_logits_loss)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        num_templates, num_classes, _ = self.class_tokens.shape
        pick = torch.randint(num_templates, (num_classes,), generator=self.generator)  # [C], on the CPU
        if self.class_tokens.is_cuda:
            # From pageable memory the driver may wait for the GPU before copying: pin it.
            pick = pick.pin_memory()
        pick = pick.to(self.class_tokens.device, non_blocking=True)
        tokens = self.class_tokens[pick, torch.arange(num_classes, device=pick.device)]  # [C, L]
        return {"loss": self._forward(model, batch.images, tokens, batch.labels)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"template_rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "template_rng" in state:
            self.generator.set_state(state["template_rng"])


class FLYPObjective(Objective):
    """Contrastive fine-tuning on captioned training images (FLYP)."""

    name = "flyp"
    uses_captions = True

    def __init__(self, compile_fn=None):
        super().__init__(compile_fn)
        self._forward = self._compile(contrastive_loss)

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.texts is None:
            raise ValueError("FLYP needs caption tokens in the batch")
        return {"loss": self._forward(model, batch.images, batch.texts)}


class DPSObjective(CEObjective):
    """CE whose top-discrepancy rows stay frozen at the pretrained weights.

    ``suppressor`` is a :class:`dps_tune.suppression.RowSuppressor`; attaching it to the
    optimizer makes every suppressed row bit-identical to θ0 after every step.
    """

    name = "dps"

    def __init__(self, class_tokens: torch.Tensor, seed: int, suppressor, compile_fn=None):
        super().__init__(class_tokens, seed, compile_fn)
        self.suppressor = suppressor

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.suppressor.attach(optimizer)


@dataclass
class ObjectiveContext:
    """What an objective factory may need; built once per trial by the training loop."""

    class_tokens: torch.Tensor  # [T, C, L]
    seed: int
    compile_fn: Callable[[Callable], Callable] | None
    make_suppressor: Callable[[], object]


def _make_ce(ctx: ObjectiveContext) -> Objective:
    return CEObjective(ctx.class_tokens, ctx.seed, ctx.compile_fn)


def _make_flyp(ctx: ObjectiveContext) -> Objective:
    return FLYPObjective(ctx.compile_fn)


def _make_dps(ctx: ObjectiveContext) -> Objective:
    return DPSObjective(ctx.class_tokens, ctx.seed, ctx.make_suppressor(), ctx.compile_fn)


# name -> (objective class, factory). The class says what the objective reads (captions
# or class prompts) before any of it is built.
OBJECTIVES: dict[str, tuple[type[Objective], Callable[[ObjectiveContext], Objective]]] = {
    "ce": (CEObjective, _make_ce),
    "flyp": (FLYPObjective, _make_flyp),
    "dps": (DPSObjective, _make_dps),
}


def _lookup(name: str) -> tuple[type[Objective], Callable[[ObjectiveContext], Objective]]:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"algorithm = {name!r}: must be one of {', '.join(OBJECTIVES)}") from None


def uses_captions(name: str) -> bool:
    """Whether objective ``name`` trains on captioned pairs (FLYP) rather than class prompts."""
    return _lookup(name)[0].uses_captions


def make_objective(name: str, ctx: ObjectiveContext) -> Objective:
    return _lookup(name)[1](ctx)
