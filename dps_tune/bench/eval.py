"""``python -m dps_tune.bench eval``: evaluation images a sweep spends, test splits at every report or once.

Counts, for a search space, the images its trials evaluate:

* **every report** (the baseline, ``train.eval_test: every_report``): every split at every report;
* **end** (the default): the validation splits at every report; the test splits once per
  kept checkpoint: at a trial's last report when it trains to the end, and afterwards for
  each other checkpoint it keeps (``tune.keep_checkpoints``).

Reports per trial follow ASHA's rungs: of ``num_samples`` trials, a share ``1/η^k`` is
promoted past the k-th rung (grace period ``g``, rungs at ``g·η^k`` epochs), which is what
ASHA converges to when trials arrive together. With ``--experiment EXP`` the counts come
from a finished experiment's own reports and kept checkpoints instead.

Prints, for the demo's world and for WILDS iWildCam v2.0's split sizes (id_val 7,314,
id_test 8,154, ood_val 14,961, ood_test 42,791), the images per sweep under each policy
and their ratio.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dps_tune.layout import MODEL_FILE
from dps_tune.objectives import is_test_split
from dps_tune.sweep.sweep_file import SweepFile

IWILDCAM_SIZES = {"id_val": 7314, "id_test": 8154, "ood_val": 14961, "ood_test": 42791}
REPO_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@dataclass(frozen=True)
class Trial:
    reports: int  # evaluations during training (one per epoch unless eval_every_steps)
    finished: bool  # trained to its last epoch (its last report evaluates every split)
    kept: int  # checkpoints kept when it ended


def asha_trials(num_samples: int, epochs: int, grace: int, eta: int, keep: int) -> list[Trial]:
    """The trials of a sweep under ASHA's rung promotion, ``1/eta`` of them past each rung."""
    rungs = []
    r = int(max(1, min(grace, epochs)))
    while r < epochs:
        rungs.append(r)
        r *= eta
    trials = []
    for i in range(num_samples):
        stop = epochs
        for k, rung in enumerate(rungs):
            # trial i survives rung k when it is among the best 1/eta^(k+1) of the sweep
            if i >= num_samples / eta ** (k + 1):
                stop = rung
                break
        trials.append(Trial(reports=int(stop), finished=stop == epochs, kept=int(min(keep, stop))))
    return trials


def images(trials: list[Trial], sizes: dict[str, int]) -> tuple[int, int]:
    """(images evaluated with test splits at every report, images evaluated with test splits once)."""
    val = sum(n for s, n in sizes.items() if not is_test_split(s))
    test = sum(n for s, n in sizes.items() if is_test_split(s))
    before = sum(t.reports * (val + test) for t in trials)
    after = sum(t.reports * val + t.kept * test for t in trials)
    return before, after


def experiment_trials(exp: Path) -> list[Trial]:
    """The reports and kept checkpoints of a finished experiment's trials."""
    max_t = SweepFile.load(exp).max_t
    trials = []
    for tdir in sorted(p.parent for p in exp.glob("*/params.json")):
        rows = [json.loads(line) for line in (tdir / "result.json").read_text().splitlines() if line.strip()] \
            if (tdir / "result.json").is_file() else []
        kept = len([p for p in tdir.glob("checkpoint_*") if (p / MODEL_FILE).is_file()])
        last = rows[-1].get("epoch", 0) if rows else 0
        trials.append(Trial(reports=len(rows), finished=bool(max_t) and last >= max_t, kept=max(kept, 1)))
    return trials


def _line(label: str, trials: list[Trial], sizes: dict[str, int]) -> str:
    before, after = images(trials, sizes)
    split_text = ", ".join(f"{s} {n:,}" for s, n in sizes.items())
    return (f"{label}: {len(trials)} trials, {sum(t.reports for t in trials)} reports ({split_text}): "
            f"every report {before:,} images, test once per kept checkpoint {after:,} images, "
            f"{before / after:.2f}x fewer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dps_tune.bench eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, help="count a finished experiment's own reports instead")
    args = parser.parse_args(argv)
    from dps_tune.config import SyntheticConfig
    from dps_tune.demo.study import SPACES

    world = SyntheticConfig()
    demo_sizes = {s: world.classes * world.eval_per_class for s in ("id_val", "id_test", "ood_val", "ood_test")}
    if args.experiment:
        print(_line(f"experiment {args.experiment}", experiment_trials(args.experiment), demo_sizes))
        return 0
    totals = {"demo": [0, 0], "iwildcam": [0, 0]}
    spaces = [("demo", SPACES / n, demo_sizes) for n in ("demo.yaml", "demo_dps.yaml", "demo_flyp.yaml")]
    spaces += [("iwildcam", REPO_SPACES / n, IWILDCAM_SIZES)
               for n in ("iwildcam_ce.yaml", "iwildcam_dps.yaml", "iwildcam_flyp.yaml") if (REPO_SPACES / n).is_file()]
    for kind, space, sizes in spaces:
        trials = space_trials(space)
        print(_line(f"{kind} {space.name}", trials, sizes))
        before, after = images(trials, sizes)
        totals[kind][0] += before
        totals[kind][1] += after
    for kind, (before, after) in totals.items():
        if after:
            print(f"eval: {kind} sweeps evaluate {before:,} images with test splits at every report, {after:,} with "
                  f"test splits once per kept checkpoint: {before / after:.2f}x fewer")
    return 0


def space_trials(space: Path) -> list[Trial]:
    """The trials of a search space, read without checking its data (iWildCam need not be on this disk)."""
    import yaml

    from dps_tune.config import tune_config_from_dict

    raw = yaml.safe_load(space.read_text())
    t = tune_config_from_dict(raw.get("tune") or {})
    epochs = int(raw.get("optim", {}).get("epochs", 20))
    return asha_trials(t.num_samples, epochs, t.grace_period, t.reduction_factor, t.keep_checkpoints)
