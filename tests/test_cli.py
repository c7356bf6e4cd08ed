import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_demo_config_prints_metric_lines(tmp_path):
    """The README's first single-trial command, run as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "dps_tune.cli", "train", "search_spaces/demo.yaml", "--set", "algorithm=ce",
         "--set", "epochs=1", "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout
    assert {"id_val_acc", "ood_test_acc", "id_val_f1", "ood_test_f1", "epoch"} <= set(lines[-1])
    ck = tmp_path / "run" / "checkpoint"
    assert (ck / "model.safetensors").is_file() and (ck / "train_state.pt").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["epochs"] == 1
