"""A non-editable install works on its own: the demo's configs ship in the wheel.

The wheel is built from this checkout and installed into a fresh virtual environment
with no network: dependencies are not installed again but read from the environment
running the tests, through a ``.pth`` line. Commands then run from an unrelated folder,
so nothing can be found through the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*args, cwd, timeout=1200) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_install_runs_the_demo_config_from_another_directory(tmp_path):
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "runs",
                                                                "__pycache__", ".pytest_cache"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source,
        cwd=tmp_path)
    (wheel,) = wheels.glob("dps_tune-*.whl")
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    # The dependencies of the environment running the tests, after the new one's own packages.
    Path(site, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(py, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    where = run(py, "-c", "import dps_tune.demo.study as s; print(s.__file__); print(s.SPACES / 'demo.yaml')",
                cwd=elsewhere).stdout.split()
    assert where[0].startswith(site), where  # the installed copy, not this checkout
    assert Path(where[1]).is_file(), where

    dps_tune = venv / "bin" / "dps-tune"
    assert "--out" in run(dps_tune, "demo", "--help", cwd=elsewhere).stdout
    out = run(dps_tune, "train", where[1], "--set", "pretrained=none", "--set", "epochs=1",
              "--set", "data.synthetic.train_per_class=8", "--set", "data.synthetic.eval_per_class=4",
              "--set", "data.synthetic.image_size=32", "--out", "run", "--no-progress", cwd=elsewhere)
    metrics = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert metrics and metrics[-1]["epoch"] == 1.0 and "ood_test_acc" in metrics[-1]
    assert (elsewhere / "run" / "checkpoint" / "model.safetensors").is_file()
