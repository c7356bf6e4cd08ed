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
    for stage in ("[1/5]", "[2/5] CE sweep", "[3/5] DPS sweep", "[4/5] FLYP sweep", "[5/5] comparison"):
        assert stage in text, stage
    table = text[text.index("[5/5]"):]
    for method in ("zero-shot", "ce", "flyp"):
        assert f"\n{method} " in table, method
    assert "dps (top)" in table or "dps (random)" in table
    zero_shot = json.loads((out / "zero_shot.json").read_text())
    assert zero_shot["id_test_acc"] > 0.2 and zero_shot["ood_test_acc"] > 0.2  # chance is 0.1
    page = (out / "report.html").read_text()
    for plot in ("plot-id-ood-acc", "plot-masking", "plot-learning-curves", "summary-table", "results-table"):
        assert plot in page, plot
    assert (out / "comparison.txt").read_text().strip() in text
    for stage in ("ce", "dps", "flyp"):
        assert (out / stage / "dps_tune_sweep.json").is_file()
