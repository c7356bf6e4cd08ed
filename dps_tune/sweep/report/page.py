"""The report page: the figures as embedded PNGs and the tables as HTML, in the skeleton of ``page.html``.

The skeleton and its stylesheet (``page.css``) are package data, read once at import.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dps_tune.errors import UserError, first_line
from dps_tune.files import write_text
from dps_tune.sweep.report.figures import (plot_id_ood, plot_learning_curves, plot_masking, plot_params_held,
                                           plot_pareto)
from dps_tune.sweep.report.loading import (ReportedExperiment, _Curve, _ensembles, _Marked, _Point, _points, _Soup,
                                           best_checkpoints, confirmed_means, load_experiment, load_zero_shot)
from dps_tune.sweep.report.style import metric_label
from dps_tune.sweep.report.tables import SUMMARY_COLUMNS, all_trials_table, ensemble_table, frontier_table, summary_rows
from dps_tune.sweep.results import ensemble_kind, read_ensemble

logger = logging.getLogger(__name__)

DPI = 110
_DATA = resources.files(__package__)
CSS = _DATA.joinpath("page.css").read_text(encoding="utf-8")
PAGE = Template(_DATA.joinpath("page.html").read_text(encoding="utf-8"))


def render_report(exp_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  zero_shot: Mapping[str, float] | str | os.PathLike | None = None,
                  x_metric: str = "id_test_acc", y_metric: str = "ood_test_acc") -> Path:
    """Write the HTML report of ``exp_dirs`` to ``out`` and return its path.

    ``zero_shot`` is a mapping of metrics, or a JSON file or checkpoint directory to read
    them from (:func:`load_zero_shot`). The ID-vs-OOD plot uses ``x_metric`` and
    ``y_metric`` and is repeated for their accuracy/macro-F1 twins. Raises
    :class:`UserError` for a missing directory, one without trials, or an unwritable ``out``.
    """
    out = Path(out)
    experiments, summaries = _read_inputs(exp_dirs)
    curves, soups = _ensembles(summaries)
    zs, zero_shot_source = _zero_shot(zero_shot)
    _check_output(out)  # after the cheap reads, so a bad input leaves no empty output directory behind

    points = _points(experiments)
    figures = _figures_html(experiments, points, zs, curves, soups, x_metric, y_metric)
    trials = all_trials_table(experiments, zs)
    best_rows = summary_rows(experiments, zs)
    summary = pd.DataFrame(best_rows, columns=SUMMARY_COLUMNS)
    exp_rows = pd.DataFrame([{
        "experiment": e.name, "path": str(e.path.resolve()), "status": e.sweep.status or "unknown",
        "trials": len(e.trials), "selected by": f"{e.metric} ({e.mode})", "max_t": e.sweep.max_t,
    } for e in experiments])
    title = "dps-tune report: " + ", ".join(e.name for e in experiments)
    page = PAGE.substitute(
        figures, title=html.escape(title), css=CSS, generated=html.escape(time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        experiments=len(experiments), trials=len(points), experiments_table=html_table(exp_rows, "experiments"),
        zero_shot_line=_zero_shot_line(zs, zero_shot_source),
        ensembles=_ensembles_html(experiments, curves, soups, summaries, best_rows) if summaries else "",
        summary_table=html_table(summary, "summary-table", ["zero-shot" if m == "zero-shot" else ""
                                                            for m in summary["method"]]),
        results_table=html_table(trials, "results-table", ["zero-shot" if r == "zero-shot" else str(s)
                                                           for r, s in zip(trials["trial_id"], trials["status"])]))
    try:
        write_text(out, page)
    except OSError as exc:
        raise UserError(f"report {str(out)!r}: cannot write ({exc.strerror or first_line(exc)})") from None
    logger.info("report of %d experiment(s) written to %s (%.0f KiB)", len(experiments), out,
                out.stat().st_size / 1024)
    return out


# ----------------------------------------------------------------------------- inputs


def _read_inputs(exp_dirs: Sequence[str | os.PathLike]) -> tuple[list[ReportedExperiment], list[dict[str, Any]]]:
    """The sweeps and the ``wise``/``soup`` outputs among ``exp_dirs``, each directory once."""
    if not exp_dirs:
        raise UserError("no experiment directory given")
    seen: set[Path] = set()
    experiments, summaries = [], []
    for d in exp_dirs:
        if Path(d).resolve() not in seen:
            seen.add(Path(d).resolve())
            if Path(d).is_dir() and ensemble_kind(d):
                summaries.append(read_ensemble(d))
            else:
                experiments.append(load_experiment(d))
    if not experiments:
        raise UserError("no sweep among the directories: the output of wise and soup is drawn beside its sweeps")
    names = [e.name for e in experiments]
    # Two sweeps of the same name (from different storage roots) are told apart by path.
    return [e if names.count(e.name) == 1 else replace(e, name=str(e.path)) for e in experiments], summaries


def _zero_shot(zero_shot: Mapping[str, float] | str | os.PathLike | None
               ) -> tuple[dict[str, float] | None, str | None]:
    """The zero-shot metrics and the file they were read from (None when given as a mapping)."""
    source = None
    if zero_shot is not None and not isinstance(zero_shot, Mapping):
        source = str(zero_shot)
        zero_shot = load_zero_shot(zero_shot)
    return (dict(zero_shot) if zero_shot else None), source


def _check_output(out: Path) -> None:
    """Fail before any plotting when the report cannot be written where asked."""
    if out.is_dir():
        raise UserError(f"report {str(out)!r}: is a directory; give a file name such as report.html")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"report {str(out)!r}: cannot create its directory ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"report {str(out)!r}: not writable")


# ------------------------------------------------------------------------------ parts


def _twin(metric: str) -> str:
    """The same split in the other metric kind: accuracy <-> macro-F1."""
    if metric.endswith("_acc"):
        return metric[:-4] + "_f1"
    if metric.endswith("_f1"):
        return metric[:-3] + "_acc"
    return metric


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    # Figure renders through the Agg canvas without pyplot's global state; no "Software"
    # tag keeps matplotlib's web address out of the file.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_html(img_id: str, fig: Figure | None, alt: str, caption: str, missing: str) -> str:
    if fig is None:
        return f'<p class="note" id="{img_id}-missing">{html.escape(missing)}</p>'
    return (f'<figure><img id="{img_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _figures_html(experiments: Sequence[ReportedExperiment], points: Sequence[_Point], zs: Mapping[str, float] | None,
                  curves: Sequence[_Curve], soups: Sequence[_Soup], x_metric: str, y_metric: str) -> dict[str, str]:
    """Every figure of the page as HTML, by its place in ``page.html``."""
    pairs = [(x_metric, y_metric)]
    if (_twin(x_metric), _twin(y_metric)) != (x_metric, y_metric):
        pairs.append((_twin(x_metric), _twin(y_metric)))
    scatter_html = []
    for x, y in pairs:
        kind = "f1" if y.endswith("_f1") else "acc"
        scatter_html.append(_figure_html(
            f"plot-id-ood-{kind}", plot_id_ood(points, x, y, zs, curves, soups, best_checkpoints(experiments, x, y),
                                               confirmed_means(experiments, x, y)),
            alt=f"Scatter plot of {metric_label(y)} against {metric_label(x)} for every trial, coloured by method"
                + (", zero-shot model marked with a star" if zs else ""),
            caption=f"{metric_label(y)} against {metric_label(x)} on logit-scaled axes. Each trial at its last "
                    "report (its method's marker) and at its best checkpoint by its sweep's metric (small diamond); "
                    "large squares with bars: confirmed means of `dps-tune confirm` with 95% intervals. Hollow "
                    "markers: trials ASHA stopped early (their metrics are from an early epoch). Dotted: the "
                    "baseline fitted on logit-transformed values."
                    + (" Star: the zero-shot model." if zs else "")
                    + (" Lines: WiSE-FT from alpha 0 (the zero-shot weights) to 1 (the fine-tuned model), "
                       "the alpha chosen on validation ringed." if curves else "")
                    + (" Plus signs: model soups." if soups else ""),
            missing=f"No trial reports both {x} and {y}."))
    return {
        "id_ood": "".join(scatter_html),
        "pareto": _figure_html(
            "plot-pareto", plot_pareto(experiments),
            alt="Pareto front: every trial's ID validation metric against its OOD validation metric, "
                "the non-dominated trials ringed and joined",
            caption="Each trial at its last report. Ringed and joined: the trials no other trial of the same "
                    "experiment beats on both (selection on robustness as well as ID).",
            missing="No trial reports both validation metrics."),
        "masking": _figure_html(
            "plot-masking", plot_masking(points, zs),
            alt="OOD test and OOD val metrics against the DPS masking ratio, one panel per suppression arm",
            caption="DPS trials only, each at its last report: circles OOD test, triangles OOD val; "
                    "hollow markers were stopped early by ASHA.",
            missing="No DPS trials in these experiments: there is nothing to plot against dps.masking."),
        "params_held": _figure_html(
            "plot-params-held", plot_params_held(points, zs),
            alt="OOD test metrics against the fraction of all trainable parameters each DPS trial held at the "
                "pretrained weights, coloured by suppression arm",
            caption="DPS trials only, each at its last report. Masking counts ranked rows; this counts parameters, "
                    "the share of the model kept at θ0 (the rest trains). Dashed: zero-shot.",
            missing="No DPS trial reports dps_params_held_frac (trials of dps_tune before 0.3 do not)."),
        "learning_curves": _figure_html(
            "plot-learning-curves", plot_learning_curves(experiments, zs),
            alt="Learning curves: each sweep's selection metric against epoch for every trial; "
                "dashed curves ending in a cross were stopped early by ASHA",
            caption="Solid curves ending in a dot ran to the end; dashed curves ending in a cross were stopped "
                    "early by ASHA at a rung (dash-dotted vertical lines).",
            missing=""),
    }


def _zero_shot_line(zs: Mapping[str, float] | None, source: str | None) -> str:
    if source:
        return f"<p>Zero-shot metrics from <code>{html.escape(source)}</code>.</p>"
    return "<p>Zero-shot metrics given by the caller.</p>" if zs else "<p>No zero-shot metrics given.</p>"


def _ensembles_html(experiments: Sequence[ReportedExperiment], curves: Sequence[_Curve], soups: Sequence[_Soup],
                    summaries: Sequence[Mapping[str, Any]], best_rows: Sequence[Mapping[str, Any]]) -> str:
    table = ensemble_table(curves, soups, summaries)
    return f"""<section id="ensembles">
<h2>WiSE-FT and model soups</h2>
<p class="caption">For each method: every point of its WiSE-FT curve from the fine-tuned checkpoint (alpha 1)
towards the zero-shot weights, the alpha chosen on validation (never on test) and the alpha that OOD validation
would choose, each labelled, and the soup of its checkpoints. From {html.escape(", ".join(s.get("kind", "") for s in summaries))}
output(s).</p>
{html_table(table, "ensemble-table", ["zero-shot" if m == "zero-shot" else "" for m in table["method"]])}
{_frontier_html(curves, [r for r in best_rows if r["method"] != "zero-shot"],
                confirmed_means(experiments, "id_test_acc", "ood_test_acc"))}
</section>"""


def _frontier_html(curves: Sequence[_Curve], best: Sequence[Mapping[str, Any]], confirmed: Sequence[_Marked]) -> str:
    table = frontier_table(curves, best, confirmed)
    if table is None or table.empty:
        return ""
    return f"""<h3>Against CE's WiSE-FT curve</h3>
<p class="caption">Each method's OOD test accuracy minus the OOD test accuracy of CE's WiSE-FT curve at the same ID
test accuracy (interpolated along alpha; empty where the method's ID accuracy lies outside the curve's). Above 0:
more robust than mixing CE with the zero-shot weights at that ID accuracy. The interval resamples the test images:
the method's from its checkpoint's predictions and, paired on the same images, the curve's from the predictions
<code>wise</code> recorded for each alpha, so it counts the curve's own test-set noise. A confirmed mean's interval
resamples its seeds first, then each split's images, so it counts seed-to-seed variance too. Where the wise output
has no per-image predictions (an older <code>wise</code>), the curve is held fixed; the last column says which.</p>
{html_table(table, "frontier-table")}"""


# ----------------------------------------------------------------------------- tables


def _cell(value: Any) -> tuple[str, bool]:
    """HTML text of a table cell and whether it is a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", False
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if isinstance(value, (int, np.integer)):
        return str(value), True
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}", True
    return html.escape(str(value)), False


def html_table(df: pd.DataFrame, table_id: str, row_class: Sequence[str] | None = None) -> str:
    """``df`` as an HTML table, numbers to 4 significant digits; ``row_class`` styles rows."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cells = []
        for value in row:
            text, numeric = _cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        cls = f' class="{html.escape(row_class[i])}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")
