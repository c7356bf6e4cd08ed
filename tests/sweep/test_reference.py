"""DPS reference resolution and the one rule for whether a sweep needs a ranking."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dps_tune import models
from dps_tune.config import config_from_dict
from dps_tune.sweep import reference
from dps_tune.sweep.search_space import parse_search
from support.worlds import tiny_raw


@pytest.fixture
def reference_file(tmp_path):
    theta0 = models.pretrained_state_dict("tiny-vit", "none", seed=0)
    path = tmp_path / "ref.safetensors"
    save_file({k: v + 0.01 * torch.arange(v.numel()).reshape(v.shape).float() / max(v.numel(), 1)
               for k, v in theta0.items()}, str(path))
    return path


def _cfg(algorithm, reference_file, tmp_path):
    return config_from_dict(tiny_raw(algorithm=algorithm, **{"dps.reference": str(reference_file),
                                                             "dps.ranking_cache": str(tmp_path / "rc")}))


@pytest.mark.parametrize("algorithm,search,needed", [
    ("ce", {}, False),
    ("dps", {}, True),
    # A reference in the base config does not make a CE/FLYP-only search need a ranking...
    ("ce", {"algorithm": {"choice": ["ce", "flyp"]}}, False),
    ("dps", {"algorithm": {"choice": ["ce", "flyp"]}}, False),
    # ...while any search that can draw DPS does, whatever the base algorithm says.
    ("ce", {"algorithm": {"choice": ["ce", "dps"]}}, True),
    ("dps", {"lr": {"loguniform": [1e-4, 1e-3]}}, True),
])
def test_one_rule_decides_whether_a_sweep_is_ranked(algorithm, search, needed, reference_file, tmp_path):
    cfg = _cfg(algorithm, reference_file, tmp_path)
    space = parse_search(search, cfg)
    assert reference.needs_ranking(cfg, space) is needed
    resolved = reference.resolve(cfg, space)
    assert (resolved.ranking is not None) is needed
    if needed:
        assert resolved.config.dps.reference == str(reference_file)
        assert sum(s.numel() for s in resolved.ranking.values()) > 0


def test_resume_and_sweep_share_the_rule():
    """`sweep` and `resume` both decide through reference.resolve (and so needs_ranking)."""
    import inspect

    from dps_tune.sweep import ray_tune
    from dps_tune.sweep.ray_tune import launch

    for fn in (ray_tune.run_sweep, ray_tune.resume_sweep):
        assert "_resolve_dps(" in inspect.getsource(fn), fn.__name__
    assert "reference.resolve(" in inspect.getsource(launch._resolve_dps)


def test_reference_experiment_resolves_to_its_best_checkpoint_and_is_pinned(tmp_path, reference_file, monkeypatch):
    """The trials get a config naming the checkpoint itself, not the experiment it came from."""
    best = tmp_path / "sweep" / "trial" / "checkpoint_000001"
    monkeypatch.setattr(reference, "best_checkpoint", lambda exp, metric, mode: best)
    loaded = []
    monkeypatch.setattr(models, "load_weights_file", lambda path: loaded.append(path) or _load(reference_file))
    cfg = config_from_dict(tiny_raw(algorithm="dps", **{"dps.reference_experiment": str(tmp_path / "sweep"),
                                                        "dps.ranking_cache": str(tmp_path / "rc")}))
    resolved = reference.resolve(cfg)
    assert resolved.config.dps.reference == str(best)
    assert resolved.config.dps.reference_experiment is None
    assert resolved.ranking is not None and loaded == [str(best)]


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))
