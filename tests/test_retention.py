"""The checkpoint economy's decisions, against a model of Ray's CheckpointManager."""

import math

import pytest

from dps_tune.retention import FULL, NOTHING, Plan, Retention


class RayKeeps:
    """What Ray's _CheckpointManager keeps: the best ``keep`` by score (later wins ties), plus the latest."""

    def __init__(self, keep: int):
        self.keep, self.kept, self.n = keep, [], 0

    def register(self, score: float, state: bool, epoch: float) -> None:
        item = (score, self.n, state, epoch)
        self.n += 1
        ranked = sorted([*self.kept, item], key=lambda x: (x[0], x[1]))
        best = ranked[-self.keep:]
        self.kept = sorted(set(best) | {item}, key=lambda x: x[1])

    def newest_state_epoch(self) -> float | None:
        with_state = [k for k in self.kept if k[2]]
        return with_state[-1][3] if with_state else None


def drive(keep: Retention, ray: RayKeeps, scores, *, deleted_states=True):
    plans = []
    for epoch, score in enumerate(scores, 1):
        metrics = {"epoch": float(epoch), "id_val_f1": score}
        plan = keep.plan(metrics)
        plans.append(plan)
        if plan.weights:
            if plan.state and deleted_states:  # the trainable deletes superseded train state
                ray.kept = [(s, n, False, e) for s, n, _, e in ray.kept]
            ray.register(score, plan.state, float(epoch))
        keep.record(metrics, plan)
    return plans


def test_weights_only_for_reports_that_can_enter_the_top_k_or_the_last_epoch():
    keep = Retention(metric="id_val_f1", mode="max", keep=2, last_epoch=6, resume_every_minutes=1e9)
    plans = drive(keep, RayKeeps(2), [0.5, 0.6, 0.55, 0.4, 0.7, 0.1])
    assert [p.weights for p in plans] == [True, True, True, False, True, True]  # 0.55 beats 0.5
    assert not any(p.state for p in plans)  # nothing is due in under the interval, and the last epoch needs none


def test_mode_min_ranks_the_other_way():
    keep = Retention(metric="loss", mode="min", keep=1, last_epoch=9, resume_every_minutes=1e9)
    wrote = []
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 1.0], 1):
        plan = keep.plan({"epoch": epoch, "loss": loss})
        keep.record({"epoch": epoch, "loss": loss}, plan)
        wrote.append(plan.weights)
    assert wrote == [True, True, False, True]


def test_resume_every_epochs_writes_state_on_its_schedule():
    keep = Retention(metric="id_val_f1", mode="max", keep=2, last_epoch=7, resume_every=2)
    plans = drive(keep, RayKeeps(2), [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01])
    assert [p.state for p in plans] == [False, True, False, True, False, True, False]


def test_state_follows_the_clock_when_no_epoch_interval_is_set():
    now = [0.0]
    keep = Retention(metric="id_val_f1", mode="max", keep=1, last_epoch=9, resume_every_minutes=10,
                     clock=lambda: now[0])
    states = []
    for epoch, minutes in enumerate([4, 8, 11, 15, 19, 22], 1):
        now[0] = minutes * 60.0
        plan = keep.plan({"epoch": epoch, "id_val_f1": 0.1})
        keep.record({"epoch": epoch, "id_val_f1": 0.1}, plan)
        states.append(plan.state)
    assert states == [False, False, True, False, False, True]


@pytest.mark.parametrize("seed", range(40))
def test_ray_never_drops_the_newest_train_state_of_an_unfinished_trial(seed):
    """Random learning curves: after every report, a resumable checkpoint is kept once one was written."""
    import random

    rng = random.Random(seed)
    k = rng.choice([1, 2, 3])
    keep = Retention(metric="id_val_f1", mode="max", keep=k, last_epoch=100, resume_every=rng.choice([1, 2, 3, 5]))
    ray = RayKeeps(k)
    written_state_at = None
    for epoch in range(1, 40):
        score = rng.choice([rng.random(), 0.5, float("nan")])
        metrics = {"epoch": float(epoch), "id_val_f1": score}
        plan = keep.plan(metrics)
        if plan.weights:
            if plan.state:
                ray.kept = [(s, n, False, e) for s, n, _, e in ray.kept]
                written_state_at = float(epoch)
            ray.register(-math.inf if math.isnan(score) else score, plan.state, float(epoch))
        keep.record(metrics, plan)
        assert ray.newest_state_epoch() == written_state_at, (epoch, ray.kept)
        # the mirror agrees with Ray on what is kept
        assert [(m.order, m.state) for m in keep.kept] == [(n, s) for _, n, s, _ in ray.kept]


def test_restore_reads_what_ray_kept_and_restarts_the_clock():
    keep = Retention(metric="id_val_f1", mode="max", keep=2, last_epoch=9, resume_every=2)
    keep.restore([({"epoch": 2.0, "id_val_f1": 0.6}, True), ({"epoch": 3.0, "id_val_f1": 0.7}, False)],
                 resumed_epoch=2.0)
    assert keep.plan({"epoch": 3.0, "id_val_f1": 0.5}) == NOTHING  # cannot beat 0.6 and 0.7
    assert keep.plan({"epoch": 3.0, "id_val_f1": 0.65}) == FULL  # would push the state at epoch 2 out
    assert keep.plan({"epoch": 4.0, "id_val_f1": 0.1}) == FULL  # two epochs after the resumed one
    assert keep.plan({"epoch": 9.0, "id_val_f1": 0.1}) == Plan(weights=True, state=False)
