"""Which reports of a sweep trial write a checkpoint, and which of those carry the train state.

A checkpoint serves two readers. Selection (``best``, WiSE-FT, soups) reads weights,
config and metrics; resuming also reads the train state: optimizer, loop position and
RNG, twice the weights under AdamW. A sweep keeps, per trial, the ``keep`` best
checkpoints by the sweep metric plus the latest one (Ray's ``CheckpointConfig``), so:

* **weights** are written only when the report can enter that top ``keep``, or at the
  last epoch;
* **train state** is written on a schedule: every ``resume_every`` epochs when that is
  set, else every ``resume_every_minutes`` of training. A crash loses at most one
  interval; the retry resumes from the newest checkpoint that holds train state.
  Train state needs the weights of the same step, so a state report writes both.
* a weights-only report must not make Ray drop the newest state checkpoint: when that
  checkpoint would fall out of the kept set, the new report carries the state instead.

:class:`Retention` mirrors Ray's rule for what it keeps (the best ``keep`` by score,
ties to the later report, plus the latest) so it can tell all this before writing.
It holds no Ray: the trainable feeds it the kept checkpoints when a trial restores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


def score(metrics: Mapping, metric: str, sign: float) -> float:
    """How Ray ranks a checkpoint by ``metric`` (``sign`` 1 for max, -1 for min): higher is better."""
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return -math.inf  # Ray ranks NaN and a missing metric below every number
    return sign * float(value)


def kept(scores: list[float], keep: int) -> set[int]:
    """Which of a trial's checkpoints (their scores, oldest first) Ray keeps: the best ``keep``, later winning
    ties, and the latest."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return set(ranked[-keep:]) | ({len(scores) - 1} if scores else set())


@dataclass(frozen=True)
class Plan:
    """What one report writes: ``weights`` (with config and metrics) and ``state`` (resume)."""

    weights: bool
    state: bool


NOTHING = Plan(False, False)
FULL = Plan(True, True)


@dataclass
class _Kept:
    score: float
    order: int
    state: bool
    epoch: float


class Retention:
    """Decides, report by report, what a trial writes; see the module docstring."""

    def __init__(self, *, metric: str, mode: str, keep: int, last_epoch: float, resume_every: int = 0,
                 resume_every_minutes: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if keep < 1:
            raise ValueError(f"keep = {keep}: must be >= 1")
        self.metric, self.sign, self.keep = metric, (1.0 if mode == "max" else -1.0), keep
        self.last_epoch = last_epoch  # the trial ends here (optim.epochs, or the scheduler's max_t)
        self.resume_every, self.resume_every_s = resume_every, resume_every_minutes * 60.0
        self.clock = clock
        self.kept: list[_Kept] = []
        self._order = 0
        self._state_epoch = 0.0
        self._state_time = clock()

    # ----------------------------------------------------------------- restore

    def restore(self, kept: Iterable[tuple[Mapping, bool]], *, resumed_epoch: float) -> None:
        """Take the checkpoints Ray still keeps for this trial (metrics, holds state), oldest first."""
        self.kept = [_Kept(self._score(m), i, s, float(m.get("epoch", 0))) for i, (m, s) in enumerate(kept)]
        self._order = len(self.kept)
        self._state_epoch, self._state_time = resumed_epoch, self.clock()

    # -------------------------------------------------------------------- plan

    def _score(self, metrics: Mapping) -> float:
        return score(metrics, self.metric, self.sign)

    def state_due(self, epoch: float) -> bool:
        if self.resume_every:
            return epoch - self._state_epoch >= self.resume_every - 1e-9
        return self.clock() - self._state_time >= self.resume_every_s

    def plan(self, metrics: Mapping) -> Plan:
        """What the report of ``metrics`` should write."""
        epoch = float(metrics.get("epoch", 0))
        if epoch >= self.last_epoch:
            return Plan(weights=True, state=False)  # the trial is done: nothing to resume
        if self.state_due(epoch):
            return FULL
        new = _Kept(self._score(metrics), self._order, False, epoch)
        if not self._enters_top(new):
            return NOTHING
        newest_state = next((k for k in reversed(self.kept) if k.state), None)
        if newest_state is not None and newest_state not in self._survivors(new):
            return FULL  # writing weights only would make Ray drop the only way to resume
        return Plan(weights=True, state=False)

    def _enters_top(self, new: _Kept) -> bool:
        ranked = sorted(self.kept, key=lambda k: (k.score, k.order))
        return len(ranked) < self.keep or new.score > ranked[-self.keep].score

    def _survivors(self, new: _Kept) -> list[_Kept]:
        """What Ray keeps after registering ``new``: the best ``keep`` (later wins ties), and ``new``."""
        ranked = sorted([*self.kept, new], key=lambda k: (k.score, k.order))
        best = ranked[-self.keep:]
        return best if new in best else [*best, new]

    def record(self, metrics: Mapping, plan: Plan) -> None:
        """The report of ``metrics`` was made as ``plan`` says: update the mirror of Ray's kept set."""
        epoch = float(metrics.get("epoch", 0))
        if plan.state:
            self._state_epoch, self._state_time = epoch, self.clock()
            for k in self.kept:
                k.state = False  # the trainable deletes superseded train state
        if not plan.weights:
            return
        new = _Kept(self._score(metrics), self._order, plan.state, epoch)
        self._order += 1
        self.kept = sorted(self._survivors(new), key=lambda k: k.order)
