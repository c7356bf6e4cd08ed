"""The one package that talks to Ray: the trial, Optuna + ASHA, launch, resume, and tasks.

Ray's reporting API has changed several times; everything Ray-specific stays behind
this door. The training core (:func:`dps_tune.train.run_trial`) knows nothing of it:
each trial receives a frozen :class:`~dps_tune.config.Config` (the sweep's base with
the DPS reference resolved), its searched values, and the DPS ranking computed once
on the driver.

- :mod:`.trial`: the function trainable, and where a restored trial resumes;
- :mod:`.callbacks`: the driver's Tune callbacks (checkpoint pruning, the study's records);
- :mod:`.searcher`: Optuna, told about ASHA's stops as pruned trials;
- :mod:`.connection`: an embedded Ray on loopback, or a running cluster;
- :mod:`.interrupts`: Ctrl-C as a pause, a full storage as one line;
- :mod:`.launch`: sweep, confirmation run and resume;
- :mod:`.tasks`: evaluations as Ray tasks, or in this process.
"""

from __future__ import annotations

import os

# Set before Ray reads them. The legacy progress reporter is the one that takes our ID/OOD
# columns; frequent experiment-state saves mean a killed driver loses (almost) nothing.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Snapshots are forced whenever a trial checkpoints; with few kept checkpoints that is by design.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# An embedded Ray starts no idle workers ahead of need: Tune gives every trial actor a runtime
# environment of its own (PL_DISABLE_FORK), so a prestarted plain worker never runs a trial; two of
# them were half the worker processes of a small sweep (each importing Ray for nothing).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

from dps_tune.sweep.ray_tune.callbacks import OPTUNA_FILE, restore_points  # noqa: E402
from dps_tune.sweep.ray_tune.connection import shutdown  # noqa: E402
from dps_tune.sweep.ray_tune.interrupts import StorageFull  # noqa: E402
from dps_tune.sweep.ray_tune.launch import Resumable, load_resumable, resume_sweep, run_points, run_sweep  # noqa: E402
from dps_tune.sweep.ray_tune.searcher import PrunedOptunaSearch  # noqa: E402
from dps_tune.sweep.ray_tune.tasks import evaluates_here, map_jobs  # noqa: E402
from dps_tune.sweep.ray_tune.trial import CRASH_AT_EPOCH_ENV, CRASH_MARKER_ENV, HOLD_AT_END_ENV, trainable  # noqa: E402

__all__ = ["CRASH_AT_EPOCH_ENV", "CRASH_MARKER_ENV", "HOLD_AT_END_ENV", "OPTUNA_FILE", "PrunedOptunaSearch",
           "Resumable", "StorageFull", "evaluates_here", "load_resumable", "map_jobs", "restore_points",
           "resume_sweep", "run_points", "run_sweep", "shutdown", "trainable"]
