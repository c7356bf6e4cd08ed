"""What the tests share that is not a fixture: the worlds and configs they train on, on-disk experiments
and datasets written in the real layouts, and the ways to run ``dps-tune`` in a subprocess.

Importable as ``support`` because pyproject.toml's pytest settings put tests/ on ``sys.path``.

- :mod:`support.worlds`: the synthetic worlds and the tiny config (``tiny_raw``).
- :mod:`support.experiments`: finished sweeps and WiSE-FT outputs as dps_tune leaves them.
- :mod:`support.datasets`: a small iWildCam in the WILDS layout.
- :mod:`support.cli`: ``run_cli`` and the argv of the commands a test starts itself, also under
  ``kill_after.py`` (a crash at a chosen call); ``cli_forkserver.py`` serves the input matrix and,
  through :mod:`support.cli_server`, every ``run_cli``; :mod:`support.cli_tally` counts where each ran,
  for the line in the run's summary.
"""
