"""The DPS reference and its ranking, resolved once at the entry points.

DPS ranks rows by how far a CE fine-tune moved them from the pretrained weights θ0.
The reference θ1 is either a checkpoint (``dps.reference``) or the best checkpoint of
a finished CE sweep (``dps.reference_experiment``, chosen by ``dps.reference_metric``).
``dps-tune train``, ``sweep`` and ``resume`` resolve it here, compute (or load from the
on-disk cache) the ranking once, and hand both to the training core, which never
reads an experiment directory.
"""

from __future__ import annotations

import dataclasses
import logging

from dps_tune import models, suppression
from dps_tune.config import Config
from dps_tune.objectives import default_mode
from dps_tune.sweep.results import best_checkpoint
from dps_tune.sweep.search_space import SearchSpace

logger = logging.getLogger(__name__)


def needs_ranking(cfg: Config, space: SearchSpace | None = None) -> bool:
    """Whether any trial of ``cfg`` searched over ``space`` can run DPS."""
    searched = dict(space.params) if space else {}
    algorithm = searched.get("algorithm")
    if algorithm is not None:
        return "dps" in algorithm.args
    return cfg.algorithm == "dps"


def resolve_reference(cfg: Config) -> str:
    """The DPS reference checkpoint: ``dps.reference``, or the best of ``dps.reference_experiment``."""
    if cfg.dps.reference is not None:
        return cfg.dps.reference
    metric = cfg.dps.reference_metric
    path = str(best_checkpoint(cfg.dps.reference_experiment, metric, default_mode(metric)))
    logger.info("DPS reference: best checkpoint of %s by %s: %s", cfg.dps.reference_experiment, metric, path)
    return path


@dataclasses.dataclass(frozen=True)
class ResolvedDPS:
    """A config whose ``dps.reference`` names a checkpoint, and the ranking it implies (or None)."""

    config: Config
    ranking: suppression.Scores | None
    cache_hit: bool = False


def resolve(cfg: Config, space: SearchSpace | None = None) -> ResolvedDPS:
    """Resolve the reference of ``cfg`` and compute its ranking, if any trial needs it.

    The returned config names the reference checkpoint itself (``dps.reference``), so
    every trial, and every later resume, uses the same one even if the reference sweep
    gains trials.
    """
    if not needs_ranking(cfg, space):
        return ResolvedDPS(cfg, None)
    reference = resolve_reference(cfg)
    cfg = dataclasses.replace(cfg, dps=dataclasses.replace(cfg.dps, reference=reference, reference_experiment=None))
    theta0 = models.pretrained_state_dict(cfg.model, cfg.pretrained, seed=cfg.seed)
    theta1 = models.load_weights_file(reference)
    scores, hit = suppression.cached_ranking(theta0, theta1, cfg.dps.ranking_cache)
    return ResolvedDPS(cfg, scores, hit)
