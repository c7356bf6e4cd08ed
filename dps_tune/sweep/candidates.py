"""What ``wise`` and ``soup`` may combine: the candidates of finished sweeps, read and checked without torch.

Candidates are the kept checkpoints of the given experiments, grouped by method (``ce``,
``flyp``, ``dps (top)``, ``dps (random)``) and ranked by a validation metric. Every
check of the command line (the alpha grid, the metric, the experiments, ``--method``)
runs here, before :mod:`dps_tune.sweep.ensembles` imports torch to evaluate anything.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dps_tune.errors import UserError
from dps_tune.layout import CONFIG_FILE, MODEL_FILE, OPEN_CLIP_KEY, read_safetensors_header
from dps_tune.objectives import default_mode
from dps_tune.sweep import results


@dataclass(frozen=True)
class Candidate:
    """A kept checkpoint that may enter an ensemble."""

    path: Path
    method: str
    trial: str
    status: str
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def theta0(self) -> tuple[str, str]:
        return self.config["model"], self.config["pretrained"]


def parse_alphas(text: str) -> list[float]:
    """``0:1:0.1`` (start:stop:step, stop included) or ``0,0.5,1``; each in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise UserError(f"--alphas {text}: needs start <= stop and a step > 0")
            n = int(math.floor((stop - start) / step + 1e-9))
            alphas = [round(start + i * step, 10) for i in range(n + 1)]
        else:
            alphas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--alphas {text}: expected START:STOP:STEP or a comma-separated list of numbers") from None
    if not alphas:
        raise UserError(f"--alphas {text}: an empty grid")
    bad = [a for a in alphas if not (0.0 <= a <= 1.0)]
    if bad:
        raise UserError(f"--alphas {text}: alpha {bad[0]} is outside [0, 1]")
    return sorted(set(alphas))


def load_candidates(exp_dirs: Sequence[str | os.PathLike], metric: str, *, include_stopped: bool = True,
                    ) -> dict[str, list[Candidate]]:
    """Per method, the kept checkpoints that report ``metric``, best first; checked to share one θ0."""
    if not exp_dirs:
        raise UserError("no experiment directory given")
    mode = default_mode(metric)
    found: dict[str, list[Candidate]] = {}
    seen_metric = False
    for exp in exp_dirs:
        view, sweep = results.open_sweep(exp)
        for trial in results.load_trials(view):
            status = results.trial_status(trial, sweep.max_t, sweep.ended)
            for path, metrics in results.checkpoints(trial.path):
                if metric in metrics:
                    seen_metric = True
                if status == "early-stopped" and not include_stopped:
                    continue
                if status not in ("completed", "early-stopped") or not results._finite(metrics.get(metric)):
                    continue
                config = results.checkpoint_json(path, CONFIG_FILE)
                config.pop(OPEN_CLIP_KEY, None)
                method = results.method_name(config)
                found.setdefault(method, []).append(Candidate(path, method, trial.trial_id, status, metrics, config))

    if not seen_metric:
        raise UserError(f"--select {metric}: no checkpoint of {', '.join(map(str, exp_dirs))} reports it")
    if not found:
        what = "finished trial" if include_stopped else "completed trial (ASHA-stopped ones need --include-stopped)"
        raise UserError(f"{', '.join(map(str, exp_dirs))}: no {what} with a kept checkpoint to take")
    thetas = {c.theta0 for cs in found.values() for c in cs}
    if len(thetas) > 1:
        listed = ", ".join(f"{m}/{p}" for m, p in sorted(thetas))
        raise UserError(f"the experiments start from different weights ({listed}); "
                        "ensembles need one θ0 and one architecture: pass experiments of one model")
    sign = 1.0 if mode == "max" else -1.0
    return {m: sorted(found[m], key=lambda c: -sign * c.metrics[metric]) for m in results.in_method_order(found)}


def check_candidates(exp_dirs: Sequence[str | os.PathLike], select: str, *, include_stopped: bool = True,
                     method: str | None = None) -> dict[str, list[Candidate]]:
    """:func:`load_candidates`, and ``method`` among them: what a command checks before any work."""
    groups = load_candidates(exp_dirs, select, include_stopped=include_stopped)
    if method is not None and method not in groups:
        raise UserError(f"--method {method}: not among the experiments' methods ({', '.join(groups)})")
    for c in (c for cs in groups.values() for c in cs):
        if (c.path / MODEL_FILE).is_file():  # a mirror of remote storage holds a stand-in instead
            read_safetensors_header(c.path / MODEL_FILE, f"checkpoint {c.path}")
    return groups


