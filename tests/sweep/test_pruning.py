"""What the driver deletes, and where a trial resumes, on real checkpoint directories (no Ray run).

The end-to-end tests (killed driver, Ctrl-C, a full disk) meet these rules only in the
windows a kill happens to hit; here each rule is checked on its own, in milliseconds.
"""

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray import tune

from dps_tune.config import TuneConfig
from dps_tune.layout import METRICS_FILE, MODEL_FILE, STATE_FILE
from dps_tune.sweep.ray_tune import callbacks
from dps_tune.sweep.ray_tune import trial as trial_module

ACC = [0.5, 0.9, 0.6, 0.7, 0.4]  # checkpoint_000000 .. 000004's id_val_acc


def trial_dir(tmp_path: Path, *, without_state: tuple[int, ...] = ()) -> Path:
    trial = tmp_path / "trainable_00000"
    for i, acc in enumerate(ACC):
        ckpt = trial / f"checkpoint_{i:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / METRICS_FILE).write_text(json.dumps({"epoch": i + 1, "id_val_acc": acc}))
        (ckpt / MODEL_FILE).write_bytes(b"weights")
        if i not in without_state:
            (ckpt / STATE_FILE).write_bytes(b"state")
    return trial


def left(trial: Path) -> dict[str, bool]:
    """Checkpoint name -> whether it still holds train state."""
    return {p.name: (p / STATE_FILE).is_file() for p in sorted(trial.glob("checkpoint_*"))}


def prune(trial: Path, status: str, latest: str, **tune_cfg) -> dict[str, bool]:
    pruner = callbacks.CheckpointPruner(TuneConfig(metric="id_val_acc", keep_checkpoints=1, **tune_cfg))
    pruner._prune_trial(pafs.LocalFileSystem(), str(trial), status, latest)
    return left(trial)


def test_an_unfinished_trial_keeps_its_best_its_restore_point_with_state_and_all_that_is_newer(tmp_path):
    trial = trial_dir(tmp_path)
    # The stored experiment state names checkpoint 3: 4 is newer (Ray may not know it yet) and stays whole.
    # Of 0-3, the best (1) and the restore point (3) stay; only the restore point keeps its train state.
    assert prune(trial, "RUNNING", "checkpoint_000003") == {
        "checkpoint_000001": False, "checkpoint_000003": True, "checkpoint_000004": True}


def test_an_ended_trial_keeps_no_train_state_up_to_its_restore_point(tmp_path):
    trial = trial_dir(tmp_path)
    assert prune(trial, "TERMINATED", "checkpoint_000003") == {
        "checkpoint_000001": False, "checkpoint_000003": False, "checkpoint_000004": True}


def test_an_errored_trial_keeps_its_train_state_for_resume(tmp_path):
    trial = trial_dir(tmp_path)
    assert prune(trial, "ERROR", "checkpoint_000003")["checkpoint_000003"] is True


def test_the_full_scheme_deletes_checkpoints_but_no_train_state(tmp_path):
    trial = trial_dir(tmp_path)
    assert prune(trial, "TERMINATED", "checkpoint_000003", checkpoint_scheme="full") == {
        "checkpoint_000001": True, "checkpoint_000003": True, "checkpoint_000004": True}


def test_nothing_is_deleted_while_the_restore_point_is_missing(tmp_path):
    trial = trial_dir(tmp_path)
    before = left(trial)
    assert prune(trial, "RUNNING", "checkpoint_000009") == before  # named, but not (yet) on the storage


@pytest.mark.parametrize("without_state,latest,expected", [
    ((), "checkpoint_000003", "checkpoint_000003"),
    ((3,), "checkpoint_000003", "checkpoint_000002"),  # the latest holds weights only: the newest with state
    ((1, 2, 3), "checkpoint_000003", "checkpoint_000000"),
    ((), "checkpoint_000001", "checkpoint_000001"),  # 2-4 were written after the state Ray restores
])
def test_a_trial_resumes_from_the_newest_checkpoint_ray_knows_that_holds_train_state(tmp_path, without_state, latest,
                                                                                   expected):
    trial = trial_dir(tmp_path, without_state=without_state)
    start = trial_module._resume_point(tune.Checkpoint(str(trial / latest), filesystem=pafs.LocalFileSystem()), None)
    assert Path(start.path).name == expected


def test_a_trial_with_no_train_state_anywhere_starts_over(tmp_path):
    trial = trial_dir(tmp_path, without_state=(0, 1, 2, 3, 4))
    latest = tune.Checkpoint(str(trial / "checkpoint_000004"), filesystem=pafs.LocalFileSystem())
    assert trial_module._resume_point(latest, None) is None
