"""One self-contained HTML page that summarises one or more finished (or running) sweeps.

Ray-free, like :mod:`dps_tune.sweep.results`, whose readers it builds on. The page holds:

* ID against OOD (accuracy and macro-F1) for every trial, coloured by method, with the
  zero-shot model marked: the effective-robustness plot of robust fine-tuning papers;
* the OOD metric against ``dps.masking`` for DPS trials, one panel per suppression arm;
* the sweep metric against epoch for every trial, so ASHA's early stops are visible;
* the best trial per method and the full results table;
* given the output of ``dps-tune wise`` or ``dps-tune soup`` beside the sweeps: WiSE-FT
  curves from the zero-shot star to each fine-tuned model and soups on the ID-vs-OOD
  plots, a table of each method alone, with WiSE-FT and as a soup, and each method's OOD
  test accuracy against CE's WiSE-FT curve at the same ID test accuracy, with an interval
  that resamples the method's and the curve's test images together (:func:`frontier_table`).

Images are PNGs embedded as base64 ``data:`` URIs and the CSS is inline, so the file
opens offline and can be mailed or attached as it is.

Modules, in import order: :mod:`.style` (how methods and metrics are named and drawn),
:mod:`.loading` (sweeps, ensembles and zero-shot metrics read into what is drawn),
:mod:`.figures`, :mod:`.tables`, and :mod:`.page`, which assembles the page from the
skeleton ``page.html`` and the stylesheet ``page.css`` (package data).
"""

from dps_tune.sweep.report.figures import (asha_rungs, plot_id_ood, plot_learning_curves, plot_masking,
                                           plot_params_held, plot_pareto)
from dps_tune.sweep.report.loading import (ZERO_SHOT_FILE, ReportedExperiment, best_checkpoints, confirmed_means,
                                           find_zero_shot, load_experiment, load_zero_shot)
from dps_tune.sweep.report.page import CSS, html_table, render_report
from dps_tune.sweep.report.style import METHOD_STYLE, metric_label
from dps_tune.sweep.report.tables import (CONFIRMED_FIXED, CONFIRMED_PAIRED, FRONTIER_FIXED, FRONTIER_PAIRED,
                                          SUMMARY_METRICS, all_trials_table, ensemble_table, frontier_table,
                                          summary_rows, summary_table)
# Package-private helpers that tests/sweep builds figures and tables from.
from dps_tune.sweep.report.figures import _logit  # noqa: F401
from dps_tune.sweep.report.loading import _Curve, _ensembles, _Marked, _points  # noqa: F401

__all__ = ["CONFIRMED_FIXED", "CONFIRMED_PAIRED", "CSS", "FRONTIER_FIXED", "FRONTIER_PAIRED", "METHOD_STYLE",
           "SUMMARY_METRICS", "ZERO_SHOT_FILE",
           "ReportedExperiment", "all_trials_table", "asha_rungs", "best_checkpoints", "confirmed_means",
           "ensemble_table", "find_zero_shot", "frontier_table", "html_table", "load_experiment", "load_zero_shot", "metric_label",
           "plot_id_ood", "plot_learning_curves", "plot_masking", "plot_params_held", "plot_pareto", "render_report",
           "summary_rows", "summary_table"]
