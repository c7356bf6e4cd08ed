"""`make demo` as a new user runs it: every stage for real (pretrained model, three sweeps,
WiSE-FT, soup, confirmation, report), and the regime the README shows, on its confirmation."""

import json
import subprocess
from pathlib import Path

import pytest

from support.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 8.4 minutes alone on 2 cores with a cold cache; longer beside the other tests
def test_demo_runs_the_whole_study(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--no-dashboard", cwd=ROOT, timeout=3500)
    text = proc.stdout
    stages = ("[1/7]", "[2/7] CE sweep", "[3/7] DPS sweep", "[4/7] FLYP sweep", "[5/7] WiSE-FT",
              "[6/7] confirmation", "[7/7] comparison")
    assert [text.index(s) for s in stages] == sorted(text.index(s) for s in stages)
    assert text.startswith("environment: dps_tune ") and "torch" in text.splitlines()[0]
    table = text[text.index("[7/7]"):]
    for method in ("zero-shot", "ce", "flyp", "dps (top)"):
        assert f"\n{method} " in table, method
    # WiSE-FT under every method, the greedy soup under CE, both chosen on validation
    assert table.count("  + wise a=") == 3 and table.count("  greedy soup") == 1
    wise = json.loads((out / "wise" / "wise.json").read_text())
    assert set(wise["methods"]) == {"ce", "dps (top)", "flyp"} and wise["alphas"] == [0, 0.25, 0.5, 0.75, 1.0]
    assert all(Path(m["export"], "model.safetensors").is_file() for m in wise["methods"].values())
    assert (out / "soup" / "soup_ce" / "model.safetensors").is_file()
    # the confirmation: every method and DPS's matched controls over the same 2 seeds, zero-shot beside them
    confirmed = json.loads((out / "confirm" / "confirm.json").read_text())
    assert set(confirmed["methods"]) == {"ce", "dps (top)", "dps (random)", "dps (masking 1.0)", "flyp", "zero-shot"}
    assert all(r["seeds"] == [1, 2] for m, r in confirmed["methods"].items() if m != "zero-shot")
    pairs = {(p["a"], p["b"], p["metric"]) for p in confirmed["pairs"]}
    for a in ("ce", "flyp", "dps (top)"):
        assert {(a, "zero-shot", "id_test_acc"), (a, "zero-shot", "ood_test_acc")} <= pairs, a
    assert ("dps (top)", "dps (random)", "ood_test_acc") in pairs and "Holm" in table
    # iWildCam's regime, on this run's confirmation: zero-shot well above chance (0.1) but far from
    # solved; CE and FLYP each beat it on ID and OOD test accuracy by at least 0.10, each interval
    # (Holm-adjusted) excluding 0; CE's OOD test accuracy at least 0.08 below its ID
    methods = confirmed["methods"]
    assert 0.2 <= methods["zero-shot"]["id_test_acc"]["mean"] <= 0.6, methods["zero-shot"]
    gains = {(p["a"], p["metric"]): p for p in confirmed["pairs"] if p["b"] == "zero-shot"}
    for a in ("ce", "flyp"):
        for metric in ("id_test_acc", "ood_test_acc"):
            gain = gains[(a, metric)]
            assert gain["mean"] >= 0.10 and gain["low"] > 0, gain
    assert methods["ce"]["id_test_acc"]["mean"] - methods["ce"]["ood_test_acc"]["mean"] >= 0.08, methods["ce"]
    # the world's header: every split's size and its standard error
    assert "id_val     1,000 images at 12 locations" in text and "ood_test   1,000 images at 12 locations" in text
    # findings.md: each sentence chosen by its interval, one per compared pair
    findings = (out / "findings.md").read_text()
    sections = ("Against zero-shot", "Along CE's WiSE-FT curve", "Against CE's WiSE-FT curve")
    assert all(f"## {s}" in findings for s in sections), findings
    for a in ("ce", "flyp", "dps (top)"):
        assert any(line.startswith(f"- {a} beats zero-shot") or line.startswith(f"- {a} is below zero-shot")
                   or line.startswith(f"- The data cannot tell {a} from zero-shot") for line in findings.splitlines()), a
    zero_shot = json.loads((out / "zero_shot.json").read_text())
    assert 0.2 < zero_shot["id_test_acc"] < 0.6 and zero_shot["ood_test_acc"] > 0.15  # chance is 0.1
    page = (out / "report.html").read_text()
    for plot in ("plot-id-ood-acc", "plot-masking", "plot-learning-curves", "summary-table", "results-table",
                 "ensemble-table"):
        assert plot in page, plot
    # the frontier table: the confirmed means against CE's curve, their intervals from each seed's test predictions
    from dps_tune.sweep import report
    assert 'id="frontier-table"' in page and "confirmed mean (2 seeds)" in page
    means = report.confirmed_means([report.load_experiment(out / "confirm")], "id_test_acc", "ood_test_acc")
    assert {m.method for m in means} == set(confirmed["methods"]) - {"zero-shot"}
    assert all(m.correct[0].shape == m.correct[1].shape == (2, 1000) for m in means)
    assert all(m.correct[1].mean() == pytest.approx(m.y) for m in means)
    assert (out / "comparison.txt").read_text().strip() in text
    for stage in ("ce", "dps", "flyp"):
        assert (out / stage / "dps_tune_sweep.json").is_file()
    # The commands the demo prints at the end work as printed, from the same directory.
    printed = [line.split(":", 1)[1].strip() if line.startswith("inspect:") else line.strip()
               for line in text.splitlines()[text.splitlines().index(next(
                   x for x in text.splitlines() if x.startswith("inspect:"))):]]
    results_cmd, best_cmd, report_cmd = printed[0].split(), printed[1].split(), printed[2].split()
    assert results_cmd[1:2] == ["results"] and best_cmd[1:2] == ["best"] and report_cmd[1:2] == ["report"]
    for cmd in (results_cmd, best_cmd, report_cmd):
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, (cmd, again.stderr[-2000:])
    assert (out / "best_ce" / "model.safetensors").is_file()


def test_printed_command_path_works_from_this_shell(tmp_path, monkeypatch):
    """Without .venv/bin on PATH the demo prints the path of dps-tune, not a bare name."""
    from dps_tune.demo.study import command_path

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    cmd = command_path()
    assert Path(cmd).is_file() and Path(cmd).name == "dps-tune", cmd
    proc = subprocess.run([cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sweep" in proc.stdout


@pytest.mark.parametrize("world", ["wild", "eroding"])
def test_the_demo_builds_the_pretraining_of_its_own_world_only(world, tmp_path, monkeypatch):
    """Stage 1 builds (or finds) the pretrained model that the world's stages load, and no other: `--world
    eroding` once built the wild world's model first, a cold cache's longest step, for nothing."""
    from dps_tune.demo import pretrain, study

    calls = []

    class Built(Exception):
        pass

    def ensure(arch=pretrain.DEMO_ARCH, settings=None, *, tag=pretrain.TAG, force=False):
        calls.append((arch, tag))
        raise Built

    monkeypatch.setattr(pretrain, "ensure_pretrained", ensure)
    overrides = study.world_overrides(world) + ["data.synthetic.train_per_class=2", "data.synthetic.eval_per_class=2"]
    with pytest.raises(Built):
        study.run_demo(tmp_path / "demo", overrides=overrides, dashboard=False)
    assert calls == [(pretrain.DEMO_ARCH, pretrain.tag_for(world))]
