"""The objectives' contracts: what CE encodes each step, and the registry."""

from __future__ import annotations

import pytest
import torch

from dps_tune.errors import ConfigError
from dps_tune.methods import Batch, CEObjective, make_objective, uses_captions


def test_ce_draws_one_template_per_class_at_every_step():
    templates, classes, length = 3, 5, 4
    # token [t, c, :] = 10 * t + c, so every encoded prompt says which template and class it is
    tokens = (10 * torch.arange(templates)[:, None, None] + torch.arange(classes)[None, :, None]).expand(
        templates, classes, length).clone()
    seen = []
    objective = CEObjective(tokens, seed=0, compile_fn=lambda fn: lambda model, images, toks, labels: (
        seen.append(toks.clone()) or torch.zeros(())))
    batch = Batch(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    for _ in range(40):
        objective.loss(None, batch)
    picks = torch.stack([s[:, 0] for s in seen])  # [steps, C]
    assert picks.shape == (40, classes)
    assert torch.equal(picks % 10, torch.arange(classes).expand(40, classes))  # class c's prompt in row c
    chosen = picks // 10  # [steps, C] template of each class at each step
    assert set(chosen.flatten().tolist()) == set(range(templates))
    # drawn per class, not one template for all classes at a step
    assert any(len(set(row.tolist())) > 1 for row in chosen)


def test_registry_names_the_valid_objectives():
    assert uses_captions("flyp") and not uses_captions("ce") and not uses_captions("dps")
    with pytest.raises(ConfigError, match="must be one of ce, flyp, dps"):
        make_objective("lp-ft", None)
