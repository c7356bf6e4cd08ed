"""``dps_tune_sweep.json``: what makes a directory an experiment, as one typed record.

`dps-tune sweep` and `dps-tune confirm` write it when their run starts and again when it
ends (finished, or interrupted by Ctrl-C); `resume` marks it running again. Every command
that reads an experiment reads it first. This module is the only one that knows its keys.

Version 1 added ``version``; a file without it (written before) holds the same keys and
reads as version 0. A file of a later version than :data:`VERSION` is refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dps_tune.config import Config, TuneConfig, config_from_dict, to_dict
from dps_tune.errors import UserError
from dps_tune.files import read_json_object, write_json
from dps_tune.objectives import default_mode, scalar_objective

SWEEP_FILE = "dps_tune_sweep.json"
VERSION = 1
RUNNING, FINISHED, INTERRUPTED = "running", "finished", "interrupted"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ()


@dataclass(frozen=True)
class Confirmation:
    """What a confirmation run (`dps-tune confirm`) records of its selection, for `resume` to summarise it too."""

    select: str
    seeds: tuple[int, ...]
    selected: tuple[Mapping[str, Any], ...]  # one record per configuration (see confirm.selected)
    experiments: tuple[str, ...] = ()  # the experiments it selected from

    def to_json(self) -> dict[str, Any]:
        return {"select": self.select, "seeds": list(self.seeds), "experiments": list(self.experiments),
                "selected": [dict(s) for s in self.selected]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Confirmation:
        seeds = data.get("seeds")
        selected = data.get("selected")
        return cls(select=str(data.get("select") or ""),
                   seeds=tuple(s for s in seeds if _integer(s) is not None) if isinstance(seeds, list) else (),
                   selected=tuple(s for s in selected if isinstance(s, Mapping)) if isinstance(selected, list) else (),
                   experiments=_strings(data.get("experiments")))


@dataclass(frozen=True)
class SweepFile:
    """One experiment's ``dps_tune_sweep.json``.

    ``base`` and ``tune`` are kept as the file holds them (what :func:`~dps_tune.config.to_dict`
    wrote), so a file is read whole even where this version would refuse a value;
    :meth:`base_config` builds and checks the config. ``tune`` is None for a file without
    a tune block: it cannot be resumed. Keys this version does not know stay in ``extra``
    and are written back as they were.
    """

    name: str
    base: Mapping[str, Any]
    tune: Mapping[str, Any] | None
    search: Mapping[str, Any] = field(default_factory=dict)
    max_t: float | None = None  # the epochs ASHA allows a trial
    status: str | None = None  # RUNNING, FINISHED or INTERRUPTED; None in a file that never said
    trials: int | None = None  # how many trials the run has
    space_file: str | None = None  # the search-space file a sweep was launched from
    started: str | None = None
    finished: str | None = None  # when the run last ended (finished or interrupted)
    interrupted: tuple[str, ...] = ()  # Ray's ids of the trials an interrupted run left to `resume`
    errors: int | None = None  # trials that ended in an error
    confirm: Confirmation | None = None  # only in a confirmation run's file
    version: int = VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, name: str, base: Config, tune: TuneConfig, *, max_t: float, trials: int,
            search: Mapping[str, Any] | None = None, space_file: str | None = None,
            confirm: Confirmation | None = None) -> SweepFile:
        """The file of a run that starts now."""
        return cls(name=name, base=to_dict(base), tune=to_dict(tune), search=dict(search or {}), max_t=max_t,
                   status=RUNNING, trials=trials, space_file=space_file, started=_now(), confirm=confirm)

    # ---------------------------------------------------------------- what it says

    def objective(self, metric: str | None = None, mode: str | None = None) -> tuple[str, str]:
        """The (metric, mode) this experiment's trials and checkpoints are ranked by.

        Its own: the scalar objective of its tune block (:func:`~dps_tune.objectives.scalar_objective`),
        or, without one, the default metric with its default mode. A ``metric`` given (a
        command's ``--metric``) replaces it, with that metric's default mode; a ``mode``
        given (``--mode``) wins over either.
        """
        if metric is not None:
            return metric, mode or default_mode(metric)
        own_metric, own_mode = scalar_objective(self.tune or {})
        return own_metric, mode or own_mode

    @property
    def ended(self) -> bool:
        """Whether the run has stopped: finished, or interrupted (Ctrl-C)."""
        return self.status in (FINISHED, INTERRUPTED)

    @property
    def planned_trials(self) -> int | None:
        """How many trials the run has: as recorded, else its tune block's ``num_samples``."""
        samples = (self.tune or {}).get("num_samples")
        return self.trials or _integer(samples) or None

    def base_config(self) -> Config:
        """The base config, built and checked (a :class:`~dps_tune.errors.ConfigError` when it is not valid)."""
        return config_from_dict(self.base)

    # ---------------------------------------------------------------- changes

    def running(self) -> SweepFile:
        """The file of this run as `resume` continues it."""
        return dataclasses.replace(self, status=RUNNING)

    def finished_now(self, errors: int) -> SweepFile:
        """The file of this run as it finishes now, ``errors`` of its trials in an error."""
        return dataclasses.replace(self, status=FINISHED, interrupted=(), finished=_now(), errors=errors)

    def interrupted_now(self, left: Sequence[str], errors: int) -> SweepFile:
        """The file of this run as Ctrl-C stops it now: ``left`` are the trials `resume` goes on with (Ray's ids;
        trials never started are not among them)."""
        return dataclasses.replace(self, status=INTERRUPTED, interrupted=tuple(sorted(left)), finished=_now(),
                                   errors=errors)

    # ---------------------------------------------------------------- the file

    def to_json(self) -> dict[str, Any]:
        """The file's content; optional fields that are not set are left out, as older versions left them."""
        optional = {"space_file": self.space_file, "max_t": self.max_t, "status": self.status,
                    "trials": self.trials, "started": self.started, "finished": self.finished,
                    "errors": self.errors}
        out: dict[str, Any] = {"version": VERSION, "name": self.name, "base": dict(self.base)}
        if self.tune is not None:
            out["tune"] = dict(self.tune)
        out["search"] = dict(self.search)
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.finished is not None or self.interrupted:
            out["interrupted"] = list(self.interrupted)
        if self.confirm is not None:
            out["confirm"] = self.confirm.to_json()
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> SweepFile:
        """Read the content of a sweep file; ``where`` names the experiment in the :class:`UserError` that
        refuses one without a base config, with a tune block that is not a mapping, or of a later version."""
        version = data.get("version", 0)
        if _integer(version) is None or version < 0:
            raise UserError(f"experiment {where!r}: {SWEEP_FILE} has version {version!r}, not a version number")
        if version > VERSION:
            raise UserError(f"experiment {where!r}: {SWEEP_FILE} is of version {version}; this dps_tune reads "
                            f"versions up to {VERSION} (a newer dps_tune wrote it)")
        base, tune = data.get("base"), data.get("tune")
        if not isinstance(base, Mapping) or not isinstance(tune, (Mapping, type(None))):
            raise UserError(f"experiment {where!r}: {SWEEP_FILE} is incomplete (no base config)")
        search, confirm, status = data.get("search"), data.get("confirm"), data.get("status")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            name=str(data.get("name") or ""), base=dict(base), tune=dict(tune) if tune is not None else None,
            search=dict(search) if isinstance(search, Mapping) else {}, max_t=_number(data.get("max_t")),
            status=status if isinstance(status, str) else None, trials=_integer(data.get("trials")),
            space_file=data.get("space_file") if isinstance(data.get("space_file"), str) else None,
            started=data.get("started") if isinstance(data.get("started"), str) else None,
            finished=data.get("finished") if isinstance(data.get("finished"), str) else None,
            interrupted=_strings(data.get("interrupted")), errors=_integer(data.get("errors")),
            confirm=Confirmation.from_json(confirm) if isinstance(confirm, Mapping) else None,
            version=version, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, exp_dir: str | os.PathLike, where: str | None = None) -> SweepFile | None:
        """The sweep file of the local folder ``exp_dir``, or None when it has none.

        A file cut short, not a JSON object, incomplete or of a later version is one
        :class:`UserError` naming the experiment (``where``, else ``exp_dir``) and the file.
        """
        path = Path(exp_dir) / SWEEP_FILE
        if not path.is_file():
            return None
        where = where or str(path.parent)
        return cls.from_json(read_json_object(path, f"experiment {where!r}"), where)

    @classmethod
    def load(cls, exp_dir: str | os.PathLike, where: str | None = None) -> SweepFile:
        """:meth:`read`, and a folder without a sweep file is a :class:`UserError` too: not an experiment."""
        found = cls.read(exp_dir, where)
        if found is None:
            raise UserError(f"experiment {where or str(exp_dir)!r}: not a dps_tune experiment (no {SWEEP_FILE}; "
                            "give a directory that `dps-tune sweep` or `dps-tune confirm` wrote)")
        return found

    def write(self, exp_dir: str | os.PathLike) -> Path:
        """Write the file into the local folder ``exp_dir``, atomically; returns its path."""
        path = Path(exp_dir) / SWEEP_FILE
        write_json(path, self.to_json())
        return path
