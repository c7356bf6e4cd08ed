"""The HTML report, from small finished experiments written by hand in a sweep's on-disk format."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from dps_tune import cli
from dps_tune.sweep import report, results
from dps_tune.errors import UserError
from support.experiments import write_experiment, write_wise_output

ZERO_SHOT = {"id_val_acc": 0.41, "id_val_f1": 0.38, "id_test_acc": 0.40, "id_test_f1": 0.37,
             "ood_val_acc": 0.33, "ood_val_f1": 0.30, "ood_test_acc": 0.31, "ood_test_f1": 0.28}


@pytest.fixture
def experiments(tmp_path) -> list[Path]:
    runs = tmp_path / "runs"
    dps = {"algorithm": "dps", "dps.reference": "ce_best"}
    baselines = write_experiment(runs, "baselines", [
        ("ce000001", {"algorithm": "ce", "optim.lr": 1e-3}, 4, 0.9),
        ("ce000002", {"algorithm": "ce", "optim.lr": 3e-4}, 1, 0.5),
        # best on OOD validation and on both test splits, but not on the sweep's metric (id_val_f1)
        ("ce000003", {"algorithm": "ce", "optim.lr": 2e-3}, 4, 0.7,
         {"shift": {"ood_val": 0.2, "id_test": 0.2, "ood_test": 0.2}}),
        ("ce000004", {"algorithm": "ce", "optim.lr": 1e-4}, 2, 0.6),
        ("fl000001", {"algorithm": "flyp", "optim.lr": 1e-3}, 4, 0.85),
        ("fl000002", {"algorithm": "flyp", "optim.lr": 5e-3}, 1, 0.3),
    ])
    masking = write_experiment(runs, "dps", [
        ("dt000001", {**dps, "dps.masking": 0.3, "dps.suppress": "top"}, 4, 0.8),
        # the best single evaluation (epoch 2), yet the worst last report of the completed top trials
        ("dt000002", {**dps, "dps.masking": 0.6, "dps.suppress": "top"}, 4, 1.9, {"peak": 2}),
        ("dt000003", {**dps, "dps.masking": 0.9, "dps.suppress": "top"}, 2, 0.6),
        ("dr000001", {**dps, "dps.masking": 0.3, "dps.suppress": "random"}, 4, 0.75),
        ("dr000002", {**dps, "dps.masking": 0.6, "dps.suppress": "random"}, 1, 0.4),
        ("dr000003", {**dps, "dps.masking": 0.9, "dps.suppress": "random"}, 4, 0.65),
    ], metric="id_val_acc")
    return [baselines, masking]


def images(page: str) -> dict[str, Image.Image]:
    """Every embedded PNG of the page, decoded, by its ``<img>`` id."""
    found = {}
    for tag in re.findall(r"<img [^>]*>", page):
        img_id = re.search(r'id="([^"]+)"', tag).group(1)
        assert re.search(r'alt="[^"]{20,}"', tag), tag[:200]
        data = re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1)
        found[img_id] = Image.open(io.BytesIO(base64.b64decode(data)))
        found[img_id].load()
    return found


def table(page: str, table_id: str) -> str:
    return re.search(rf'<table id="{table_id}">.*?</table>', page, re.S).group(0)


def test_report_shows_every_plot_and_the_tables(experiments, tmp_path):
    out = report.render_report(experiments, tmp_path / "out" / "report.html", zero_shot=ZERO_SHOT)
    page = out.read_text()

    imgs = images(page)
    assert set(imgs) == {"plot-id-ood-acc", "plot-id-ood-f1", "plot-masking", "plot-params-held",
                         "plot-learning-curves", "plot-pareto"}
    for img_id, img in imgs.items():
        assert img.format == "PNG" and img.width >= 500 and img.height >= 300, (img_id, img.size)
    assert imgs["plot-learning-curves"].height > imgs["plot-id-ood-acc"].height  # a panel per experiment

    all_trials = table(page, "results-table")
    for trial_id in ("ce000001", "ce000002", "fl000002", "dt000003", "dr000003"):
        assert f"<td>{trial_id}</td>" in all_trials
    for column in ("experiment", "algorithm", "masking", "suppress", "status", "id_test_acc", "ood_test_f1"):
        assert f"<th>{column}</th>" in all_trials
    assert all_trials.count('class="early-stopped"') == 5
    assert '<tr class="zero-shot"><td>zero-shot</td><td>zero-shot</td>' in all_trials  # first row
    assert all_trials.index("zero-shot") < all_trials.index("ce000001")
    assert '<td class="num">0.31</td>' in all_trials  # zero-shot ood_test_acc

    # the best trial per method, by each sweep's own metric; zero-shot on top
    summary = table(page, "summary-table")
    order = [summary.index(f"<td>{m}</td>") for m in ("zero-shot", "ce", "flyp", "dps (top)", "dps (random)")]
    assert order == sorted(order)
    for best in ("ce000001", "fl000001", "dt000002", "dr000001"):
        assert f"<td>{best}</td>" in summary
    # not the trial best on a test split or on OOD validation, nor the one best by last report
    assert "<td>ce000003</td>" not in summary and "<td>dt000001</td>" not in summary
    assert "id_val_acc (max)" in summary and "id_val_f1 (max)" in summary
    # the numbers the demo prints for the same selection
    shown = report.summary_table([report.load_experiment(e) for e in experiments], None).set_index("method")
    for exp, metric in zip(experiments, ("id_val_f1", "id_val_acc")):
        for row in results.best_per_method([exp], metric):
            for m in report.SUMMARY_METRICS:
                assert shown.loc[row["method"], m] == row[m], (row["method"], m)

    assert "baselines" in page and str(experiments[1].resolve()) in page
    assert not re.search(r"https?://", page)
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)


def test_report_without_dps_trials_says_so(experiments, tmp_path):
    page = report.render_report(experiments[:1], tmp_path / "r.html").read_text()
    assert set(images(page)) == {"plot-id-ood-acc", "plot-id-ood-f1", "plot-learning-curves", "plot-pareto"}
    assert 'id="plot-masking-missing"' in page and "No DPS trials" in page
    assert "zero-shot" not in table(page, "results-table")


def test_report_of_a_running_sweep(tmp_path):
    """A sweep still running, with a trial that has not reported yet."""
    exp = write_experiment(tmp_path, "live", [("ce000001", {"algorithm": "ce"}, 2, 0.8),
                                              ("ce000002", {"algorithm": "ce"}, 0, 0.5)], status="running")
    page = report.render_report([exp], tmp_path / "r.html").read_text()
    assert set(images(page)) == {"plot-id-ood-acc", "plot-id-ood-f1", "plot-learning-curves", "plot-pareto"}
    assert table(page, "results-table").count('<tr class="running">') == 2
    assert "<td>ce000001</td>" in table(page, "summary-table")


def test_zero_shot_sources(experiments, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metrics.json").write_text(json.dumps({"epoch": 0, "step": 0, **ZERO_SHOT}))
    assert report.load_zero_shot(ckpt) == ZERO_SHOT
    assert report.find_zero_shot(experiments) is None
    (experiments[0].parent / report.ZERO_SHOT_FILE).write_text(json.dumps(ZERO_SHOT))
    assert report.find_zero_shot(experiments) == experiments[0].parent / report.ZERO_SHOT_FILE
    with pytest.raises(UserError, match="no \\*_acc or \\*_f1"):
        (tmp_path / "bad.json").write_text('{"loss": 1.0}')
        report.load_zero_shot(tmp_path / "bad.json")


def test_cli_report(experiments, tmp_path, capsys):
    (experiments[0].parent / report.ZERO_SHOT_FILE).write_text(json.dumps(ZERO_SHOT))
    out = tmp_path / "report.html"
    assert cli.main(["report", *map(str, experiments), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert report.ZERO_SHOT_FILE in page and '<tr class="zero-shot">' in page  # found next to the sweeps

    missing = tmp_path / "nope"
    assert cli.main(["report", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such directory" in err and str(missing) in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", str(empty), "--out", str(out)]) == 2
    assert "not a dps_tune experiment" in capsys.readouterr().err

    assert cli.main(["report", str(experiments[0]), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert cli.main(["report", str(experiments[0]), "--out", str(not_a_dir / "report.html")]) == 2
    assert "cannot create its directory" in capsys.readouterr().err


def test_best_scope_all_takes_the_best_evaluation_and_last_the_best_last_report(experiments):
    dps = experiments[1]
    by_all = results.best_checkpoint(dps, "id_val_acc", "max", scope="all")
    by_last = results.best_checkpoint(dps, "id_val_acc", "max", scope="last")
    assert by_all.parent.name.startswith("trainable_dt000002")  # its epoch-2 peak beats every other report
    assert by_last.parent.name.startswith("trainable_dt000001")  # the best of the trials' last reports
    table_ = results.results_table(dps, "id_val_acc", "max")
    assert table_.iloc[0]["trial_id"] == "dt000001"  # results sorts by last report too


def test_id_ood_plot_marks_methods_early_stops_zero_shot_and_the_fit(experiments):
    """What the README says the plot shows, read back from the figure itself."""
    import matplotlib.colors as mcolors

    exps = [report.load_experiment(e) for e in experiments]
    fig = report.plot_id_ood(report._points(exps), "id_test_acc", "ood_test_acc", ZERO_SHOT)
    ax = fig.axes[0]
    scatters = ax.collections
    hollow = [c for c in scatters if len(c.get_facecolors()) == 0]  # facecolors="none"
    filled = [c for c in scatters if len(c.get_facecolors()) and c.get_facecolors()[0][3] > 0]
    # one hollow point per early-stopped trial, one filled point per completed trial, plus the zero-shot star
    assert sum(len(c.get_offsets()) for c in hollow) == 5
    star = [c for c in filled if mcolors.to_hex(c.get_facecolors()[0]) == mcolors.to_hex("gold")]
    assert len(star) == 1 and tuple(star[0].get_offsets()[0]) == (ZERO_SHOT["id_test_acc"], ZERO_SHOT["ood_test_acc"])
    assert sum(len(c.get_offsets()) for c in filled) - 1 == 12 - 5  # 12 trials, 5 stopped early
    # each method its own colour, the same in every report
    for method in ("ce", "flyp", "dps (top)", "dps (random)"):
        color = mcolors.to_rgba(report.METHOD_STYLE[method][0])
        assert any(len(c.get_edgecolors()) and tuple(c.get_edgecolors()[0][:3]) == color[:3] for c in scatters), method
    styles = {line.get_linestyle() for line in ax.lines}
    assert {"--", ":"} <= styles  # y = x and the linear fit
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "zero-shot" in labels and "hollow: early-stopped" in labels and "a trial's last report" in labels
    assert any("fit on logit scale" in t for t in labels)
    assert (ax.get_xscale(), ax.get_yscale()) == ("logit", "logit")  # effective robustness as the field draws it


def test_id_ood_plot_labels_best_checkpoints_and_confirmed_means_and_fits_on_logits(experiments):
    import numpy as np

    exps = [report.load_experiment(e) for e in experiments]
    points = report._points(exps)
    best = report.best_checkpoints(exps, "id_test_acc", "ood_test_acc")
    assert len(best) == 12  # one per trial that reported
    confirmed = [report._Marked("dps (top)", 0.7, 0.45, (0.68, 0.72), (0.40, 0.50), 5)]
    fig = report.plot_id_ood(points, "id_test_acc", "ood_test_acc", ZERO_SHOT, best=best, confirmed=confirmed)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "a trial's best checkpoint" in labels and "confirmed mean, 95% CI (5 seeds)" in labels
    diamonds = [c for c in ax.collections if hasattr(c, "get_sizes") and len(c.get_offsets()) == 1
                and c.get_sizes()[0] == 22]
    assert len(diamonds) == 12
    # the dotted baseline is a straight line in logit space through the CE trials' logits
    ce = [(p.value("id_test_acc"), p.value("ood_test_acc")) for p in points if p.method == "ce"]
    slope, intercept = np.polyfit(report._logit([x for x, _ in ce]), report._logit([y for _, y in ce]), 1)
    fit = next(line for line in ax.lines if line.get_linestyle() == ":")
    xs, ys = fit.get_data()
    assert np.allclose(report._logit(ys), slope * report._logit(xs) + intercept, atol=1e-6)


def test_ensemble_table_shows_every_alpha_and_both_choices_and_the_frontier_gap():
    import numpy as np

    def m(id_acc, ood_acc, id_val, ood_val):
        return {"id_test_acc": id_acc, "ood_test_acc": ood_acc, "id_val_f1": id_val, "ood_val_f1": ood_val}

    ce = report._Curve("ce", [(0.0, m(0.60, 0.45, 0.50, 0.40)), (0.5, m(0.70, 0.50, 0.60, 0.48)),
                              (1.0, m(0.80, 0.30, 0.70, 0.30))], chosen=1.0)
    table_ = report.ensemble_table([ce], [], [{"kind": "wise", "select": "id_val_f1"}])
    rows = table_[table_["method"] == "ce"].set_index("variant")
    assert list(rows.index) == ["WiSE-FT, alpha 0", "WiSE-FT, alpha 0.5", "fine-tuned (alpha 1)"]
    assert rows.loc["fine-tuned (alpha 1)", "alpha chosen"] == "chosen on id_val_f1"
    assert rows.loc["WiSE-FT, alpha 0.5", "alpha chosen"] == "chosen on ood_val_f1 (OOD validation)"
    # DPS's best checkpoint against CE's curve: 0.43 OOD at ID 0.75, where the curve gives 0.40
    rng = np.random.default_rng(0)
    correct = ((rng.random((1, 300)) < 0.75).astype(float), (rng.random((1, 300)) < 0.43).astype(float))
    best = [{"method": "dps (top)", "id_test_acc": 0.75, "ood_test_acc": 0.43, "_correct": correct},
            {"method": "flyp", "id_test_acc": 0.9, "ood_test_acc": 0.2}]  # beyond the curve's ID range
    confirmed = [report._Marked("dps (top)", 0.65, 0.40, (0.6, 0.7), (0.3, 0.5), 5)]
    gaps = report.frontier_table([ce], best, confirmed).set_index("point")
    top = gaps.loc["best checkpoint (selected on validation)"]
    assert top.iloc[0]["OOD minus CE's WiSE-FT curve"] == pytest.approx(0.03)
    assert top.iloc[0]["95% CI"].startswith("[")
    assert top.iloc[0]["interval resamples"] == report.FRONTIER_FIXED  # this curve has no per-image correctness
    assert np.isnan(top.iloc[1]["OOD minus CE's WiSE-FT curve"])  # flyp: outside, no number made up
    assert gaps.loc["confirmed mean (5 seeds)", "OOD minus CE's WiSE-FT curve"] == pytest.approx(0.40 - 0.475)
    assert report.frontier_table([], best, confirmed) is None  # no CE curve, no comparison


def _ci(text: str) -> tuple[float, float]:
    low, high = text.strip("[]").split(", ")
    return float(low), float(high)


def test_the_frontier_interval_resamples_ce_s_curve_on_the_images_wise_recorded(tmp_path):
    import numpy as np

    rng = np.random.default_rng(5)
    n = 300
    correct = {a: ((rng.random(n) < p_id).astype(float), (rng.random(n) < p_ood).astype(float))
               for a, p_id, p_ood in ((0.0, 0.5, 0.45), (0.5, 0.7, 0.5), (1.0, 0.9, 0.3))}
    wise = write_wise_output(tmp_path / "wise", correct)
    [ce], _ = report._ensembles([results.read_ensemble(wise)])
    assert sorted(ce.correct) == [0.0, 0.5, 1.0]
    for a, (id_c, ood_c) in correct.items():  # read back image for image, each row's mean its csv figure
        assert np.array_equal(ce.correct[a][0], id_c) and np.array_equal(ce.correct[a][1], ood_c)
        assert dict(ce.points)[a]["ood_test_acc"] == ood_c.mean()
    # DPS's best checkpoint is, image for image, CE's alpha 0.5: on the curve in every paired resample
    at = dict(ce.points)[0.5]
    best = [{"method": "dps (top)", "id_test_acc": at["id_test_acc"], "ood_test_acc": at["ood_test_acc"],
             "_correct": tuple(v[None, :] for v in correct[0.5])}]
    row = report.frontier_table([ce], best, []).iloc[0]
    low, high = _ci(row["95% CI"])
    assert row["interval resamples"] == report.FRONTIER_PAIRED and abs(low) < 1e-4 and abs(high) < 1e-4
    # a confirmed mean: its interval resamples the seeds, then the images (the curve's on the same ones)
    def confirmed(seeds):
        id_c, ood_c = np.stack([s[0] for s in seeds]), np.stack([s[1] for s in seeds])
        return report._Marked("dps (top)", float(id_c.mean()), float(ood_c.mean()), seeds=len(seeds),
                              correct=(id_c, ood_c))
    same = [correct[0.5]] * 3  # three seeds, each image for image CE's alpha 0.5: on the curve every time
    row = report.frontier_table([ce], [], [confirmed(same)]).iloc[0]
    low, high = _ci(row["95% CI"])
    assert row["point"] == "confirmed mean (3 seeds)" and row["interval resamples"] == report.CONFIRMED_PAIRED
    assert abs(row["OOD minus CE's WiSE-FT curve"]) < 1e-12 and abs(low) < 1e-4 and abs(high) < 1e-4
    # seeds that disagree on OOD: the seed-to-seed spread widens the interval
    flip = rng.random(n) < 0.3
    spread = [correct[0.5], (correct[0.5][0], np.where(flip, 1 - correct[0.5][1], correct[0.5][1])),
              (correct[0.5][0], np.where(flip, 0.0, correct[0.5][1]))]
    row = report.frontier_table([ce], [], [confirmed(spread)]).iloc[0]
    low, high = _ci(row["95% CI"])
    assert low < row["OOD minus CE's WiSE-FT curve"] < high and high - low > 0.02
    # without the seeds' predictions a confirmed mean has its gap and no interval
    bare = report._Marked("dps (top)", float(at["id_test_acc"]), float(at["ood_test_acc"]), seeds=3)
    row = report.frontier_table([ce], [], [bare]).iloc[0]
    assert row["95% CI"] == "" and row["interval resamples"] == ""
    # an older wise output (no predictions): the curve held fixed, a wide interval, and the table says so
    [old], _ = report._ensembles([results.read_ensemble(write_wise_output(tmp_path / "old", correct,
                                                                         with_predictions=False))])
    assert old.correct is None
    row = report.frontier_table([old], best, []).iloc[0]
    low, high = _ci(row["95% CI"])
    assert row["interval resamples"] == report.FRONTIER_FIXED and high - low > 0.05
    # one row's predictions missing: no paired curve from a part of it
    assert sorted(results.wise_curve_correct(wise, "ce")) == [0.0, 0.5, 1.0]
    next((wise / results.WISE_PREDICTIONS).iterdir()).unlink()
    assert results.wise_curve_correct(wise, "ce") is None
