"""What a run reports, what may select a model, and what a sweep optimises.

Every evaluation reports ``<split>_acc`` and ``<split>_f1`` per split. Only the
validation splits (and the training loss) may select a model: a test split never does,
so no reported test figure took part in choosing what it reports on. A ``tune:`` block
names one objective or several (a multi-objective Optuna study); ASHA, the checkpoint
ranking and the default sort order need one number, :func:`scalar_objective`.

:mod:`dps_tune.config` builds and checks the schema with these rules; nothing here
imports it, so the rules read a :class:`~dps_tune.config.TuneConfig` and the tune
block a sweep file holds (a mapping) alike.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol

from dps_tune.errors import ConfigError

SPLITS = ("id_val", "id_test", "ood_val", "ood_test")
VALIDATION_SPLITS = ("id_val", "ood_val")
# What sweeps select on unless told otherwise: WILDS's official metric on the ID validation split.
DEFAULT_METRIC = "id_val_f1"
# With several objectives and no tune.asha_metric: their mean, each negated where its mode is min.
OBJECTIVE_MEAN = "objective_mean"


class TuneBlock(Protocol):
    """What the objective rules read of a :class:`~dps_tune.config.TuneConfig`."""

    metric: str | tuple[str, ...]
    mode: str | tuple[str, ...]
    asha_metric: str


def is_test_split(split: str) -> bool:
    """A split no selection may read (``id_test``, ``ood_test``, ``test``): evaluated only where reported."""
    return split == "test" or split.endswith("_test")


def metric_names(splits: Iterable[str] = SPLITS) -> list[str]:
    return [f"{s}_{m}" for s in splits for m in ("acc", "f1")]


def selection_metrics(splits: Iterable[str] = SPLITS) -> list[str]:
    """Metrics a model may be selected on: validation splits only, never a test split."""
    return [m for m in metric_names(s for s in splits if s in VALIDATION_SPLITS)] + ["train_loss"]


def check_selection_metric(key: str, metric: str, splits: Iterable[str] = SPLITS) -> None:
    """Refuse selecting on a test split (it would leak the test data into every figure) or an unknown metric."""
    splits = tuple(splits)
    allowed = selection_metrics(splits)
    if metric in metric_names(splits) and metric not in allowed:
        raise ConfigError(f"{key} = {metric!r}: a test split never selects a model (that would leak the test "
                          f"data into the reported figures); select on one of {', '.join(allowed)}")
    if metric not in allowed:
        raise ConfigError(f"{key} = {metric!r}: must be one of {', '.join(allowed)}")


def default_mode(metric: str) -> str:
    """``min`` for losses, ``max`` for accuracies and F1."""
    return "min" if metric.endswith("loss") else "max"


def best_of(items: Iterable[Any], key: Callable[[Any], float], mode: str) -> Any:
    """The item with the largest ``key`` (``mode="max"``) or the smallest (``"min"``); first wins ties."""
    return (max if mode == "max" else min)(items, key=key)


def _reader(tune: TuneBlock | Mapping[str, Any]) -> Callable[..., Any]:
    return tune.get if isinstance(tune, Mapping) else (lambda k, d=None: getattr(tune, k, d))


def objectives(tune: TuneBlock | Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The metrics and modes of a tune block (a config or the mapping a sweep file holds), as tuples.

    A mapping without a mode takes each metric's :func:`default_mode`.
    """
    get = _reader(tune)
    metric, mode = get("metric", DEFAULT_METRIC), get("mode", None)
    metrics = (metric,) if isinstance(metric, str) else tuple(metric)
    if mode is None:
        modes = tuple(default_mode(m) for m in metrics)
    else:
        modes = (mode,) * len(metrics) if isinstance(mode, str) else tuple(mode)
    return metrics, modes


def scalar_objective(tune: TuneBlock | Mapping[str, Any]) -> tuple[str, str]:
    """The one (metric, mode) that ASHA, checkpoint ranking and default sorting use.

    One objective: itself. Several: ``asha_metric`` (its mode from the list, or the
    metric's default), else ``objective_mean`` (max).
    """
    metrics, modes = objectives(tune)
    if len(metrics) == 1:
        return metrics[0], modes[0]
    asha = _reader(tune)("asha_metric", "") or OBJECTIVE_MEAN
    if asha in metrics:
        return asha, modes[metrics.index(asha)]
    return asha, ("max" if asha == OBJECTIVE_MEAN else default_mode(asha))


def objective_mean(metrics: Mapping[str, float], tune: TuneBlock | Mapping[str, Any]) -> float:
    """The mean of the objectives in ``metrics``, each negated where its mode is ``min``."""
    names, modes = objectives(tune)
    return sum((metrics[m] if mode == "max" else -metrics[m]) for m, mode in zip(names, modes)) / len(names)
