"""`dps-tune wise` and `dps-tune soup` on a small finished sweep, through a real local Ray."""

import csv
import html
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import yaml

from dps_tune import checkpoint, models
from dps_tune.config import config_from_dict
from dps_tune.data import datasets as data_mod
from dps_tune.evaluate import evaluate_splits, tokenize_prompts
from dps_tune.sweep import report, results
from dps_tune.train import evaluate_start
from support.cli import run_cli, run_killed
from support.worlds import SWEEP_WORLD, tiny_raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    raw = tiny_raw(**{"data.synthetic": SWEEP_WORLD, "data.batch_size": 16, "optim.epochs": 2, "optim.lr": 1e-3})
    raw["search"] = {"lr": {"loguniform": [5e-4, 3e-3]}}
    raw["tune"] = {"metric": "id_val_f1", "num_samples": 3, "max_concurrent_trials": 2, "grace_period": 2,
                   "keep_checkpoints": 2}
    space = tmp / "ce.yaml"
    space.write_text(yaml.safe_dump(raw))
    run_cli("sweep", space, "--storage", tmp / "runs", "--name", "ce", "--no-dashboard")
    return tmp / "runs" / "ce", config_from_dict({k: v for k, v in raw.items() if k not in ("search", "tune")})


@pytest.fixture(scope="module")
def uninterrupted(sweep, tmp_path_factory):
    """``uninterrupted(command, extra)``: the output folder of ``dps-tune COMMAND`` on the sweep with ``extra``
    arguments (evaluated in its own process), run once and whole; shared by the tests that interrupt the same
    command."""
    exp, _ = sweep
    done: dict[tuple, Path] = {}

    def run(command: str, extra: list[str]) -> Path:
        key = (command, *extra)
        if key not in done:
            done[key] = tmp_path_factory.mktemp("whole") / command
            run_cli(command, exp, *extra, "--out", done[key], "--in-process", "--no-progress")
        return done[key]

    return run


def reevaluate_in_plain_open_clip(export: Path) -> dict:
    cfg = checkpoint.read_config(export)
    open_clip.add_model_config(str(export))
    name = json.loads((export / "config.json").read_text())["open_clip_model"]
    model = open_clip.create_model(name, pretrained=str(export / "model.safetensors"))
    spec = data_mod.load_dataset(cfg.data)
    prompts = tokenize_prompts(models.get_tokenizer(cfg.model), spec.classnames, spec.templates)
    loaders = {s: data_mod.eval_loader(r, models.eval_transform(model), batch_size=64, workers=0)
               for s, r in spec.splits.items()}
    return evaluate_splits(model, prompts, loaders)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_row_predictions(out: Path, rows: list[dict]) -> None:
    """Every wise.csv row has its per-image predictions, and on each split their accuracy is the row's;
    at alpha 1 they are the checkpoint's own, image for image (the same images, in the same order)."""
    for r in rows:
        preds = checkpoint.read_prediction_file(results.wise_prediction_file(out, r["checkpoint"], float(r["alpha"])),
                                                "wise row")
        assert {"id_val", "ood_val", "id_test", "ood_test"} <= set(preds), (r, sorted(preds))
        for split, (y_true, y_pred) in preds.items():
            # the figures are float32: within 1e-6, far below one image (1/24 here)
            assert (y_true == y_pred).double().mean().item() == pytest.approx(float(r[f"{split}_acc"]), abs=1e-6)
        if float(r["alpha"]) == 1.0:
            own = checkpoint.read_predictions(r["checkpoint"])
            for split in ("id_test", "ood_test"):
                assert all(a.equal(b) for a, b in zip(preds[split], own[split])), (split, r)


def test_wise_on_a_sweep_through_ray(sweep, tmp_path):
    exp, base = sweep
    out = tmp_path / "wise"
    proc = run_cli("wise", exp, "--alphas", "0:1:0.5", "--top-k", "2", "--out", out, "--no-progress", "--ray-tasks")
    assert "ce + wise a=" in proc.stdout, proc.stdout
    rows = read_csv(out / "wise.csv")
    assert len(rows) == 2 * 3 and {r["alpha"] for r in rows} == {"0.0", "0.5", "1.0"}
    check_row_predictions(out, rows)
    zero_shot = evaluate_start(base)
    for r in rows:
        if float(r["alpha"]) == 0.0:  # alpha 0 is the zero-shot model, exactly
            assert all(float(r[k]) == v for k, v in zero_shot.items()), r
        if float(r["alpha"]) == 1.0:  # alpha 1 is the checkpoint, exactly as its trial evaluated it
            recorded = json.loads((Path(r["checkpoint"]) / "metrics.json").read_text())
            assert all(float(r[k]) == recorded[k] for k in zero_shot), r
    summary = json.loads((out / "wise.json").read_text())
    chosen = summary["methods"]["ce"]
    best = max(float(r["id_val_f1"]) for r in rows)
    assert chosen["metrics"]["id_val_f1"] == best and chosen["selected_on"] == "id_val_f1"
    assert chosen["alpha"] in (0.0, 0.5, 1.0)
    export = Path(chosen["export"])
    recorded = json.loads((export / "metrics.json").read_text())
    assert recorded["wise"]["alpha"] == chosen["alpha"] and recorded["wise"]["theta1"] == chosen["checkpoint"]
    again = reevaluate_in_plain_open_clip(export)
    assert all(again[k] == recorded[k] for k in again), (again, recorded)

    # A killed run: two rows lost and one cut short. The rerun redoes only those.
    lines = (out / "wise.csv").read_text().splitlines()
    (out / "wise.csv").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][: len(lines[-3]) // 2])
    rerun = run_cli("wise", exp, "--alphas", "0:1:0.5", "--top-k", "2", "--out", out, "--no-progress",
                    "--in-process")
    assert "3 of 6 evaluations found" in rerun.stderr, rerun.stderr[-2000:]
    rows_again = read_csv(out / "wise.csv")
    complete = [r for r in rows_again if r["ood_test_f1"]]
    assert len(complete) == 6 and len({(r["checkpoint"], r["alpha"]) for r in complete}) == 6
    assert json.loads((out / "wise.json").read_text())["methods"]["ce"]["alpha"] == chosen["alpha"]
    check_row_predictions(out, complete)
    assert sorted(results.wise_curve_correct(out, "ce")) == [0.0, 0.5, 1.0]


def test_soup_on_a_sweep_through_ray(sweep, tmp_path):
    exp, _ = sweep
    out = tmp_path / "soup"
    proc = run_cli("soup", exp, "--out", out, "--no-progress", "--ray-tasks")
    assert "greedy soups" in proc.stdout
    summary = json.loads((out / "soup.json").read_text())
    soup = summary["soups"]["ce"]
    kept = [json.loads(p.read_text()) for p in exp.glob("*/checkpoint_*/metrics.json")]
    assert soup["candidates"] == len(kept)
    assert soup["metrics"]["id_val_f1"] >= max(m["id_val_f1"] for m in kept)  # never below its best ingredient
    assert soup["ingredients"][0][summary["select"]] == max(m["id_val_f1"] for m in kept)
    assert abs(sum(i["weight"] for i in soup["ingredients"]) - 1) < 1e-9
    assert len(soup["steps"]) == len(kept)
    export = Path(soup["export"])
    recorded = json.loads((export / "metrics.json").read_text())
    assert [i["checkpoint"] for i in recorded["soup"]["ingredients"]] == [i["checkpoint"] for i in soup["ingredients"]]
    again = reevaluate_in_plain_open_clip(export)
    assert all(again[k] == recorded[k] for k in again)

    uniform = run_cli("soup", exp, "--uniform", "--out", tmp_path / "uniform", "--no-progress", "--in-process")
    assert "uniform soups" in uniform.stdout
    assert len(json.loads((tmp_path / "uniform" / "soup.json").read_text())["soups"]["ce"]["ingredients"]) == len(kept)

    # The report draws the WiSE-FT curve and the soup beside the sweep, and tabulates them.
    run_cli("wise", exp, "--alphas", "0,0.5,1", "--out", tmp_path / "wise", "--no-progress", "--in-process")
    run_cli("report", exp, tmp_path / "wise", out, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert 'id="ensemble-table"' in page and "WiSE-FT, alpha" in page and "soup of" in page
    # CE's best checkpoint against its own curve: the interval resamples both on the same images
    assert 'id="frontier-table"' in page and html.escape(report.FRONTIER_PAIRED) in page
    from dps_tune.sweep.results import read_ensemble

    curves, soups = report._ensembles([read_ensemble(tmp_path / "wise"), read_ensemble(out)])
    fig = report.plot_id_ood(report._points([report.load_experiment(exp)]), "id_test_acc", "ood_test_acc", None,
                             curves, soups)
    ax = fig.axes[0]
    wise_line = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
    assert len(wise_line) == 1  # alpha 0, 0.5 and 1 of the one CE curve
    assert list(wise_line[0].get_ydata()) == [m["ood_test_acc"] for _, m in curves[0].points]
    soup_marks = [c for c in ax.collections if c.get_offsets().shape[0] == 1 and
                  tuple(c.get_offsets()[0]) == (soups[0].metrics["id_test_acc"], soups[0].metrics["ood_test_acc"])]
    assert soup_marks


def run_until(kill_at: int, command: str, exp: Path, *args, sig: str = "KILL", calls: Path | None = None):
    """``dps-tune COMMAND EXP ARGS`` killed (SIGKILL, or Ctrl-C with ``sig="INT"``) before its ``kill_at``-th
    evaluation (0: never); with ``calls``, the number of evaluations it ran is written there."""
    return run_killed("dps_tune.sweep.ensembles:evaluate_job", kill_at, command, exp, *args, sig=sig, calls=calls)


def row_key(command: str):
    return (lambda r: (r["checkpoint"], r["alpha"])) if command == "wise" else (lambda r: r["key"])


def assert_same_result(command: str, out: Path, whole: Path) -> None:
    """``out``'s summary and exported model are an uninterrupted run's (``whole``): same choice, figures and
    weights."""
    a, b = json.loads((out / f"{command}.json").read_text()), json.loads((whole / f"{command}.json").read_text())
    group = "methods" if command == "wise" else "soups"
    mine, theirs = a[group]["ce"], b[group]["ce"]
    assert {k: v for k, v in mine.items() if k != "export"} == {k: v for k, v in theirs.items() if k != "export"}
    import torch
    from safetensors.torch import load_file

    weights = [load_file(str(Path(r["export"]) / "model.safetensors")) for r in (mine, theirs)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("command,csv_name,extra,sig", [("wise", "wise.csv", ["--alphas", "0:1:0.25"], "KILL"),
                                                        ("soup", "soup_steps.csv", [], "KILL"),
                                                        ("wise", "wise.csv", ["--alphas", "0:1:0.25"], "INT"),
                                                        ("soup", "soup_steps.csv", [], "INT")])
def test_a_killed_ensemble_run_is_finished_by_a_rerun_that_redoes_nothing(sweep, uninterrupted, tmp_path, command,
                                                                          csv_name, extra, sig):
    """SIGKILL (or Ctrl-C) before the third evaluation, then the same command: it evaluates only what is missing."""
    exp, _ = sweep
    out, whole = tmp_path / command, uninterrupted(command, extra)
    args = [*extra, "--out", out, "--in-process", "--no-progress"]
    total = len(read_csv(whole / csv_name))
    assert total >= 3
    killed = run_until(3, command, exp, *args, sig=sig)
    if sig == "INT":  # one block, exit 130, and the command that continues it
        block = killed.stderr.strip().splitlines()[-2:]
        assert killed.returncode == 130 and "Traceback" not in killed.stderr, killed.stderr[-2000:]
        assert block[0] == f"dps-tune: {command} interrupted (Ctrl-C); what it finished is kept.", block
        assert block[1].endswith(" ".join(map(str, [command, exp, *args]))), block
    else:
        assert killed.returncode == -9, killed.stderr[-2000:]
    finished = [r for r in read_csv(out / csv_name) if r["complete"] == "1"]
    assert len(finished) == 2
    assert not (out / f"{command}.json").exists()  # nothing claims the run finished
    if command == "wise":  # each finished row's predictions were written before the row
        check_row_predictions(out, finished)
        assert len(list((out / results.WISE_PREDICTIONS).iterdir())) == 2

    calls = tmp_path / "calls"
    again = run_until(0, command, exp, *args, sig=sig, calls=calls)
    assert again.returncode == 0, again.stderr[-2000:]
    assert int(calls.read_text()) == total - 2  # the two finished evaluations were not redone
    rows = read_csv(out / csv_name)
    assert len(rows) == total and len({row_key(command)(r) for r in rows}) == total
    if command == "wise":
        check_row_predictions(out, rows)
    assert_same_result(command, out, whole)


@pytest.mark.parametrize("command,csv_name,extra,stops", [
    # Each of wise's 22 rows is a predictions file (one 4 KB page of tmpfs) and a line of wise.csv: 48 KB holds
    # some of them; 1 MB holds them all, but not the chosen model's weights (13.5 MB)
    ("wise", "wise.csv", ["--alphas", "0:1:0.1", "--top-k", "2"], [("48k", "partway"), ("1m", "all")]),
    # soup_steps.csv (under 2 KB) fits on 1 MB, the soup's weights do not
    ("soup", "soup_steps.csv", [], [("1m", "all")]),
])
def test_a_full_disk_stops_an_ensemble_run_in_one_line_and_the_same_command_finishes_it(sweep, uninterrupted, tmp_path,
                                                                                       small_disk, command, csv_name,
                                                                                       extra, stops):
    """--out on a small tmpfs, grown after each stop. Each stop is one line naming the disk and its free space, and
    leaves only whole rows: no summary, no export, no stray file. Every run evaluates only what is missing; the last
    ends as an uninterrupted run does."""
    from dps_tune.files import TEMP_GLOB
    from dps_tune.sweep.results import ensemble_kind

    exp, _ = sweep
    whole = uninterrupted(command, extra)
    expected = {row_key(command)(r): r for r in read_csv(whole / csv_name)}
    total = len(expected)
    disk, grow = small_disk(stops[0][0])
    out, calls = disk / command, tmp_path / "calls"
    args = [*extra, "--out", out, "--in-process", "--no-progress"]
    done = 0
    for size, rows_kept in stops:
        grow(size)
        stopped = run_until(0, command, exp, *args, calls=calls)
        lines = stopped.stderr.strip().splitlines()
        assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
        assert lines[-1].startswith(f"dps-tune: error: the disk is full writing {out} (") and \
            " free of " in lines[-1] and lines[-1].endswith("run the same command again"), lines[-1]
        assert all("evaluations found in" in line for line in lines[:-1]), lines  # and before it, only progress
        assert ensemble_kind(out) is None and not (out / f"{command}.json").exists()
        # wise's per-row predictions are whole files (written atomically), each before its row
        assert not [p.name for p in out.iterdir() if p.name not in (csv_name, results.WISE_PREDICTIONS)], \
            list(out.iterdir())
        assert not list(out.glob(TEMP_GLOB))
        whole_rows = [r for r in read_csv(out / csv_name) if r["complete"] == "1"]
        for r in whole_rows:  # a row marked complete is the row an uninterrupted run wrote
            assert r == expected[row_key(command)(r)], r
        assert len({row_key(command)(r) for r in whole_rows}) == len(whole_rows)
        ran = int(calls.read_text())
        assert len(whole_rows) - done <= ran <= total - done, (ran, done, len(whole_rows))  # nothing finished redone
        assert (0 < len(whole_rows) < total) if rows_kept == "partway" else len(whole_rows) == total, whole_rows
        done = len(whole_rows)

    grow("64m")
    again = run_until(0, command, exp, *args, calls=calls)
    assert again.returncode == 0, again.stderr[-3000:]
    assert int(calls.read_text()) == 0  # every evaluation was kept before the disk filled in the export
    rows = [row_key(command)(r) for r in read_csv(out / csv_name) if r["complete"] == "1"]
    assert len(rows) == total and set(rows) == set(expected)
    assert_same_result(command, out, whole)
    assert not list(out.glob(TEMP_GLOB))
    if command == "wise":  # each row's predictions are whole, whichever run wrote them
        check_row_predictions(out, read_csv(out / csv_name))


def test_bad_ensemble_input_is_one_line_and_writes_nothing(sweep, tmp_path):
    exp, _ = sweep
    other = tmp_path / "other"
    shutil.copytree(exp, other)
    cfg_path = next(other.glob("*/checkpoint_*/config.json"))
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "pretrained": "random"}))
    cases = [
        (["wise", exp, "--alphas", "0:1.5:0.5"], "outside [0, 1]"),
        (["wise", exp, "--alphas", ","], "empty grid"),
        (["wise", exp, "--select", "ood_test_acc"], "a test split never selects"),
        (["wise", exp, "--top-k", "0"], "--top-k 0"),
        (["wise", exp, other], "start from different weights"),
        (["soup", exp, "--method", "flyp"], "--method flyp: not among"),
        (["soup", tmp_path / "nothing"], "no such directory"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        proc = run_cli(*args, "--out", out, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert not out.exists(), args


def test_sweep_post_runs_wise_and_soup_on_the_sweeps_ray(tmp_path):
    raw = tiny_raw(**{"data.synthetic": SWEEP_WORLD, "data.batch_size": 16, "optim.epochs": 2, "optim.lr": 1e-3})
    raw["search"] = {"lr": {"loguniform": [5e-4, 3e-3]}}
    raw["tune"] = {"metric": "id_val_f1", "num_samples": 2, "max_concurrent_trials": 2, "grace_period": 2}
    space = tmp_path / "ce.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = run_cli("sweep", space, "--storage", tmp_path / "runs", "--name", "ce", "--no-dashboard",
                   "--post", "wise,soup")
    assert "WiSE-FT ce: alpha" in proc.stdout and "greedy soup ce:" in proc.stdout
    wise = json.loads((tmp_path / "runs" / "ce-wise" / "wise.json").read_text())
    assert len(wise["alphas"]) == 11 and wise["select"] == "id_val_f1"
    assert len(read_csv(tmp_path / "runs" / "ce-wise" / "wise.csv")) == 11
    assert (tmp_path / "runs" / "ce-soup" / "soup_ce" / "model.safetensors").is_file()
    bad = run_cli("sweep", space, "--storage", tmp_path / "runs", "--name", "x", "--post", "wise,stew", check=False)
    assert bad.returncode == 2 and "--post wise,stew: 'stew' is not one of wise, soup" in bad.stderr
    assert not (tmp_path / "runs" / "x").exists()
