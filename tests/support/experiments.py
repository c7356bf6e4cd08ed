"""Experiments on disk as dps_tune leaves them: a finished sweep, a WiSE-FT output; and what a resume takes up."""

from __future__ import annotations

import json
from pathlib import Path

from dps_tune.config import config_from_dict, to_dict
from dps_tune.sweep.sweep_file import SweepFile
from support.worlds import tiny_raw

MAX_T = 4
SPLITS = ("id_val", "id_test", "ood_val", "ood_test")


def write_experiment(root: Path, name: str, trials: list[tuple], *,
                     metric: str = "id_val_f1", status: str = "finished") -> Path:
    """A finished sweep as ray_tune.run_sweep leaves it: ``(trial_id, overrides, epochs run, quality[, twist])``.

    ``twist`` makes splits and epochs disagree, so a selection on the wrong thing picks
    another trial: ``{"shift": {split: delta}}`` moves one split's accuracy, and
    ``{"peak": e}`` makes the trial decline after epoch ``e`` (its best evaluation is not its last).
    """
    exp = root / name
    exp.mkdir(parents=True)
    SweepFile(name=name, base=to_dict(config_from_dict(tiny_raw())),
              tune={"metric": metric, "mode": "max", "grace_period": 1, "reduction_factor": 2, "max_t": 0},
              space_file=f"{name}.yaml", max_t=MAX_T, status=status, errors=0).write(exp)
    for i, (trial_id, overrides, epochs, quality, *twist) in enumerate(trials):
        twist = twist[0] if twist else {}
        cfg = to_dict(config_from_dict(tiny_raw(**{"optim.epochs": MAX_T, **overrides})))
        tdir = exp / f"trainable_{trial_id}_{i:05d}"
        tdir.mkdir()
        (tdir / "params.json").write_text(json.dumps({"optim.epochs": MAX_T, **overrides}))
        lines, rows = [], []
        for epoch in range(1, epochs + 1):
            peak = twist.get("peak", MAX_T)
            progress = epoch if epoch <= peak else max(0, 2 * peak - epoch)
            row = {"epoch": float(epoch), "step": 4 * epoch, "train_loss": 1.5 / epoch, "lr": 1e-3,
                   "samples_per_s": 100.0, "max_epoch": MAX_T, "trial_id": trial_id, "training_iteration": epoch,
                   "done": False, "config": {k: v for k, v in overrides.items() if k != "algorithm"}}
            if overrides.get("algorithm") == "dps":  # what a DPS trial reports it held (a stand-in share)
                row["dps_params_held_frac"] = round(0.5 + 0.5 * overrides.get("dps.masking", 0.9), 4)
            for j, split in enumerate(SPLITS):
                ood = split.startswith("ood")
                acc = 0.35 + quality * progress / MAX_T * (0.35 if ood else 0.55) - 0.01 * j
                acc += twist.get("shift", {}).get(split, 0.0)
                row[f"{split}_acc"] = round(acc, 4)
                row[f"{split}_f1"] = round(acc - 0.04, 4)
            lines.append(json.dumps(row))
            rows.append(row)
        (tdir / "result.json").write_text("\n".join(lines) + "\n")
        if not rows:
            continue
        # The kept checkpoint is the best report by the sweep's metric, as keep_checkpoints=1 keeps it.
        row = max(rows, key=lambda r: r[metric])
        ckpt = tdir / "checkpoint_000000"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(b"")
        (ckpt / "config.json").write_text(json.dumps(cfg))
        (ckpt / "metrics.json").write_text(json.dumps({k: v for k, v in row.items() if k != "config"}))
    return exp


def write_wise_output(root: Path, correct: dict, method: str = "ce", checkpoint: str = "/runs/ce/t0/checkpoint_000002",
                      with_predictions: bool = True) -> Path:
    """A `dps-tune wise` output directory for one curve: ``correct`` maps alpha to (id_test, ood_test)
    per-image correctness; wise.csv holds their means, and each row its predictions file."""
    import csv

    import torch

    from dps_tune import checkpoint as ckpt
    from dps_tune.sweep.results import WISE_CSV, WISE_JSON, wise_prediction_file

    root.mkdir(parents=True, exist_ok=True)
    columns = ["method", "rank", "trial", "checkpoint", "alpha", "id_test_acc", "ood_test_acc", "complete"]
    with (root / WISE_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for alpha, (id_c, ood_c) in sorted(correct.items()):
            writer.writerow({"method": method, "rank": 1, "trial": "t0", "checkpoint": checkpoint, "alpha": alpha,
                             "id_test_acc": float(id_c.mean()), "ood_test_acc": float(ood_c.mean()), "complete": 1})
            if with_predictions:  # labels all 0; predicted 0 where right, 1 where wrong
                file = wise_prediction_file(root, checkpoint, alpha)
                file.parent.mkdir(parents=True, exist_ok=True)
                ckpt.write_predictions({s: (torch.zeros(len(c), dtype=torch.int32), torch.tensor(1 - c).int())
                                        for s, c in (("id_test", id_c), ("ood_test", ood_c))}, file)
    (root / WISE_JSON).write_text(json.dumps({"select": "id_val_f1", "methods": {
        method: {"checkpoint": checkpoint, "alpha": 1.0, "trial": "t0"}}}))
    return root


def restore_points_left(exp: Path) -> dict[str, int]:
    """Trial directory name -> step of the checkpoint `resume` takes it up from (the newest one the experiment
    state on the storage names), for the trials that have one; asserts each of them is still there.

    Training up to that step must not be redone. A checkpoint written after that state was
    saved is not one Ray knows of: the trial trains its steps again (one resume interval).
    """
    from dps_tune.sweep import ray_tune

    points = {}
    for trial_id, (_, name) in ray_tune.restore_points(str(exp)).items():
        if name is None:
            continue
        trial_dir = next(exp.glob(f"*_{trial_id}_*"))
        metrics = trial_dir / name / "metrics.json"
        assert metrics.is_file(), f"{trial_dir.name}: its restore point {name} is gone"
        points[trial_dir.name] = json.loads(metrics.read_text())["step"]
    return points
