"""Test splits are evaluated only where they are read: at a trial's end, and once per kept checkpoint."""

import json
import shutil

import pytest
import torch

from dps_tune import checkpoint as ckpt
from dps_tune import weight_space
from dps_tune.sweep import test_figures
from dps_tune.train import run_trial

TEST_KEYS = ("id_test_acc", "id_test_f1", "ood_test_acc", "ood_test_f1")
VAL_KEYS = ("id_val_acc", "id_val_f1", "ood_val_acc", "ood_val_f1")


def _in_process(jobs):
    for job in jobs:
        yield job, test_figures.evaluate_job(job)


def _run(cfg, tmp_path, keep_first=False):
    reports, kept = [], []

    def report(metrics, path):
        reports.append(dict(metrics))
        if path is not None and (keep_first and not kept):
            dst = tmp_path / "exp" / "trial_0" / path.name
            shutil.copytree(path, dst)
            kept.append(dst)

    run_trial(cfg, report, work_dir=tmp_path / "work")
    return reports, kept


def test_reports_evaluate_validation_splits_and_the_last_report_every_split(tiny_config, tmp_path):
    reports, _ = _run(tiny_config(**{"optim.epochs": 2}), tmp_path)
    assert len(reports) == 2
    assert all(k in reports[0] for k in VAL_KEYS) and not any(k in reports[0] for k in TEST_KEYS)
    assert all(k in reports[1] for k in VAL_KEYS + TEST_KEYS)


def test_every_report_switch_gives_every_split_at_every_report(tiny_config, tmp_path):
    reports, _ = _run(tiny_config(**{"optim.epochs": 2, "train.eval_test": "every_report"}), tmp_path)
    assert all(all(k in r for k in VAL_KEYS + TEST_KEYS) for r in reports)


def test_a_kept_checkpoint_gets_its_test_figures_once(tiny_config, tmp_path):
    cfg = tiny_config(**{"optim.epochs": 2})
    _, kept = _run(cfg, tmp_path, keep_first=True)
    path = kept[0]
    before = json.loads((path / "metrics.json").read_text())
    assert not any(k in before for k in TEST_KEYS)
    assert set(ckpt.read_predictions(path)) == {"id_val", "ood_val"}

    assert test_figures.complete(str(tmp_path / "exp"), _in_process) == 1
    after = json.loads((path / "metrics.json").read_text())
    assert {k: after[k] for k in before} == before  # nothing the report recorded changes
    # the figures are those of the checkpoint's own weights, evaluated on the test splits
    expected_predictions = {}
    expected = weight_space.Evaluator(cfg)(ckpt.load_checkpoint(path).model_state, splits=["id_test", "ood_test"],
                                           predictions=expected_predictions)
    assert {k: after[k] for k in TEST_KEYS} == {k: expected[k] for k in TEST_KEYS}
    predictions = ckpt.read_predictions(path)
    assert set(predictions) == {"id_val", "id_test", "ood_val", "ood_test"}
    assert torch.equal(predictions["ood_test"][1], expected_predictions["ood_test"][1])
    # once: a second pass finds nothing to do
    assert test_figures.pending_jobs(tmp_path / "exp") == []
    assert test_figures.complete(str(tmp_path / "exp"), _in_process) == 0


def test_the_jobs_stay_in_this_process_without_a_cluster_or_a_gpu(monkeypatch):
    """A sweep's test figures and `wise`/`soup` evaluate in the command itself where Ray would
    only be its own on a CPU machine; a cluster or a GPU gets Ray tasks."""
    import ray

    from dps_tune.sweep import ray_tune
    from dps_tune.sweep.ray_tune import connection

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ray_tune.evaluates_here() is True
    assert ray_tune.evaluates_here("auto") is False
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_tune.evaluates_here() is False
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ray_tune.evaluates_here() is False

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(connection, "connect", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    jobs = [{"x": 1}, {"x": 2}, {"x": 3}]
    assert list(ray_tune.map_jobs(lambda job: 2 * job["x"], jobs)) == [(j, 2 * j["x"]) for j in jobs]
    assert list(ray_tune.map_jobs(lambda job: job["x"], jobs, tasks=False)) == [(j, j["x"]) for j in jobs]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(AssertionError, match="Ray was started"):
        list(ray_tune.map_jobs(lambda job: job["x"], jobs))
