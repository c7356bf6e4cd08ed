"""Search spaces as data: the ``search:`` block of a config file, checked and turned into Optuna.

A search block maps config keys (dotted, or unique leaf names) to one distribution::

    search:
      optim.lr: {loguniform: [1.0e-6, 1.0e-4]}
      optim.wd: {uniform: [0.0, 0.3]}
      dps.masking: {quniform: [0.1, 0.9, 0.1]}
      optim.warmup_steps: {randint: [0, 500]}      # low inclusive, high exclusive
      dps.suppress: {choice: [top, random]}

Every key must be a config field, and every value a distribution can produce (both
ends of a range, every choice) must pass the config's own validation, before Ray starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from dps_tune.config import Config, ConfigFile, TuneConfig, load_file, resolve_key, with_overrides
from dps_tune.errors import ConfigError

KINDS = {
    "loguniform": "[low, high] with 0 < low < high",
    "uniform": "[low, high] with low < high",
    "quniform": "[low, high, q] with low < high and q > 0",
    "randint": "[low, high] integers, low inclusive, high exclusive",
    "choice": "a non-empty list of values",
}


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def extremes(self) -> tuple[Any, ...]:
        """Values at the edges of the distribution, to validate against the config."""
        if self.kind == "choice":
            return self.args
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        if self.kind == "quniform":
            low, high, q = self.args
            return (low, low + q * math.floor((high - low) / q + 1e-9))
        return (self.args[0], self.args[1])


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[tuple[str, Distribution], ...] = ()

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.params]

    def __bool__(self) -> bool:
        return bool(self.params)


def _number(key: str, value: Any, kind: str, *, integer: bool = False) -> float | int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, str):  # PyYAML reads 1e-5 as a string
        try:
            value, ok = float(value), True
        except ValueError:
            ok = False
    if ok and integer and not float(value).is_integer():
        ok = False
    if not ok:
        raise ConfigError(f"search.{key} = {{{kind}: ...}}: {value!r} is not {'an integer' if integer else 'a number'}; "
                          f"{kind} takes {KINDS[kind]}")
    return int(value) if integer else float(value)


def parse_distribution(key: str, spec: Any) -> Distribution:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"search.{key} = {spec!r}: expected one distribution, e.g. "
                          f"{{loguniform: [1.0e-6, 1.0e-4]}}; known: {', '.join(KINDS)}")
    (kind, raw), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"search.{key}: unknown distribution {kind!r}; known: {', '.join(KINDS)}")
    if kind == "choice":
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"search.{key} = {{choice: {raw!r}}}: choice takes {KINDS[kind]}")
        return Distribution(kind, tuple(raw))
    size = 3 if kind == "quniform" else 2
    if not isinstance(raw, list) or len(raw) != size:
        raise ConfigError(f"search.{key} = {{{kind}: {raw!r}}}: {kind} takes {KINDS[kind]}")
    args = tuple(_number(key, v, kind, integer=kind == "randint") for v in raw)
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"search.{key} = {{{kind}: {list(raw)}}}: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search.{key} = {{{kind}: {list(raw)}}}: loguniform needs low > 0")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"search.{key} = {{{kind}: {list(raw)}}}: q must be > 0")
    return Distribution(kind, args)


def parse_search(raw: Mapping[str, Any], base: Config) -> SearchSpace:
    """Check every key against the config fields and every reachable value against validation."""
    return _parse_search(raw, base)[0]


def _parse_search(raw: Mapping[str, Any], base: Config) -> tuple[SearchSpace, list[Config]]:
    """The search space and the config at every edge value, each checked as a value."""
    params, edges = [], []
    for key, spec in raw.items():
        try:
            canonical = resolve_key(str(key))
        except ConfigError as exc:
            raise ConfigError(f"search: {exc}") from None
        dist = parse_distribution(canonical, spec)
        for value in dist.extremes():
            try:
                edges.append(with_overrides(base, {canonical: value}))
            except ConfigError as exc:
                raise ConfigError(f"search.{canonical} can produce {value!r}, which is invalid: {exc}") from None
        params.append((canonical, dist))
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"search: {dup} is given twice")
    return SearchSpace(tuple(params)), edges


def to_optuna(space: SearchSpace) -> dict[str, Any]:
    """Optuna distributions keyed by dotted config key (what Ray's OptunaSearch takes)."""
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for key, d in space.params:
        if d.kind == "loguniform":
            out[key] = od.FloatDistribution(d.args[0], d.args[1], log=True)
        elif d.kind == "uniform":
            out[key] = od.FloatDistribution(d.args[0], d.args[1])
        elif d.kind == "quniform":
            low, high, q = d.args
            out[key] = od.FloatDistribution(low, low + q * math.floor((high - low) / q + 1e-9), step=q)
        elif d.kind == "randint":
            out[key] = od.IntDistribution(d.args[0], d.args[1] - 1)
        else:
            out[key] = od.CategoricalDistribution(d.args)
    return out


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep needs, validated: base config, search space and tune settings."""

    config: Config
    space: SearchSpace
    tune: TuneConfig
    path: Path
    raw_search: Mapping[str, Any]

    @property
    def max_t(self) -> int:
        return self.tune.max_t or self.config.optim.epochs


def load_sweep(path: str | os.PathLike, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Sweep:
    """Parse and validate a search-space file (base config + ``search:`` + ``tune:``).

    Values are checked first, then the world (files, architectures, tags) for the base
    config and for the config at every edge of the search space, all before Ray starts.
    """
    parsed: ConfigFile = load_file(path, overrides)
    space, edges = _parse_search(parsed.search, parsed.config)
    searched_epochs = "optim.epochs" in space.keys
    if searched_epochs and not parsed.tune.max_t:
        raise ConfigError("search.optim.epochs: set tune.max_t when the number of epochs is searched")
    from dps_tune import preflight  # open_clip's registry: torch from here on

    for cfg in [parsed.config, *edges]:
        preflight.check_config(cfg)
    preflight.check_loggers(parsed.tune.loggers)
    return Sweep(parsed.config, space, parsed.tune, parsed.path, dict(parsed.search))
