"""`make demo`, shrunk: every stage runs for real (pretrained model, three sweeps, report)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_the_whole_study(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dps_tune.cli", "demo", "--out", str(out), "--no-dashboard",
         "--set", "tune.num_samples=2", "--set", "epochs=2", "--set", "data.synthetic.train_per_class=40"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    stages = ("[1/7]", "[2/7] CE sweep", "[3/7] DPS sweep", "[4/7] FLYP sweep", "[5/7] WiSE-FT",
              "[6/7] confirmation", "[7/7] comparison")
    assert [text.index(s) for s in stages] == sorted(text.index(s) for s in stages)
    assert text.startswith("environment: dps_tune ") and "torch" in text.splitlines()[0]
    table = text[text.index("[7/7]"):]
    for method in ("zero-shot", "ce", "flyp"):
        assert f"\n{method} " in table, method
    # Both DPS arms, the method and its random control: with tune.seed 0 the two sampled
    # trials draw suppress = top, then random (Optuna's seeded start-up sampling).
    assert "\ndps (top) " in table and "\ndps (random) " in table
    # WiSE-FT under every method, the greedy soup under CE, both chosen on validation
    assert table.count("  + wise a=") == 4 and table.count("  greedy soup") == 1
    wise = json.loads((out / "wise" / "wise.json").read_text())
    assert set(wise["methods"]) == {"ce", "dps (top)", "dps (random)", "flyp"} and wise["alphas"] == [0, 0.25, 0.5,
                                                                                                     0.75, 1.0]
    assert all(Path(m["export"], "model.safetensors").is_file() for m in wise["methods"].values())
    assert (out / "soup" / "soup_ce" / "model.safetensors").is_file()
    # the confirmation: every method over the same 3 seeds, its interval, and the paired DPS line
    confirmed = json.loads((out / "confirm" / "confirm.json").read_text())
    assert set(confirmed["methods"]) == {"ce", "dps (top)", "dps (random)", "flyp"}
    assert all(r["seeds"] == [1, 2, 3] for r in confirmed["methods"].values())
    assert "dps (top) - dps (random)" in table and "ood_test_acc mean [95% CI]" in table
    zero_shot = json.loads((out / "zero_shot.json").read_text())
    assert zero_shot["id_test_acc"] > 0.2 and zero_shot["ood_test_acc"] > 0.2  # chance is 0.1
    page = (out / "report.html").read_text()
    for plot in ("plot-id-ood-acc", "plot-masking", "plot-learning-curves", "summary-table", "results-table",
                 "ensemble-table"):
        assert plot in page, plot
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
