"""A sweep on a real S3 protocol: npm's ``s3rver`` on 127.0.0.1, written and read by pyarrow's S3 client (Ray's too).

Why s3rver: it completes the multipart uploads pyarrow 26 sends for every checkpoint, which
``moto``'s server mode (5.2.1) refuses (every ``CompleteMultipartUpload`` fails). What it
does not do is decode the ``aws-chunked`` bodies the AWS SDK sends by default: it stores the
chunk framing and checksum trailer as the object, unless the client runs with
``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (the setting the README gives for
non-AWS stores, and the one ``dps-tune sweep`` checks for). s3rver 3.7 on Node 20 needs
``NODE_OPTIONS=--openssl-legacy-provider``: the continuation token of a truncated listing
uses a cipher OpenSSL 3 keeps in its legacy provider, and without it those listings fail
with a 500. ``make test`` installs s3rver from ``tests/s3server`` (``npm ci``, pinned by its
lock file); without node or that install the test skips, saying so.

What the protocol has that ``file://`` has not: no rename, multipart uploads, paginated
listings, request checksums, and directories that are only key prefixes.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pytest
from optuna.trial import TrialState
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from support.cli import kill_after_first_checkpoint_deletion, run_cli
from test_dashboard import dashboard_url, start, stop
from test_ray_tune import space

pytestmark = pytest.mark.slow

SERVER = Path(__file__).resolve().parents[1] / "s3server"
ENTRY = SERVER / "node_modules" / "s3rver" / "bin" / "s3rver.js"
BUCKET = "bucket"
EPOCHS = 3  # three checkpoints a trial: keep_checkpoints 1 keeps at most two, so one is deleted mid-sweep


@pytest.fixture
def s3rver(tmp_path, monkeypatch):
    """The port of an s3rver holding an empty ``bucket``, on 127.0.0.1; the AWS settings of a non-AWS store set."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on this machine: the S3 test runs npm's s3rver (`make test` installs it with npm)")
    if not ENTRY.is_file():
        pytest.skip(f"s3rver is not installed in {SERVER}: `make test` runs `npm ci` there when npm is on PATH")
    log_path = tmp_path / "s3rver.log"
    options = f"{os.environ.get('NODE_OPTIONS', '')} --openssl-legacy-provider".strip()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([node, str(ENTRY), "-d", str(tmp_path / "s3rver"), "-a", "127.0.0.1", "-p", "0",
                                 "--configure-bucket", BUCKET], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "NODE_OPTIONS": options}, start_new_session=True)
    try:
        deadline, port = time.time() + 60, None
        while port is None and time.time() < deadline and proc.poll() is None:
            found = re.search(r"S3rver listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            port = found and int(found.group(1))
            time.sleep(0.2)
        assert port, f"s3rver did not start: {log_path.read_text()[-2000:]}"
        # Only this store's settings: no profile, no instance metadata (169.254.169.254), no other endpoint.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")  # s3rver's own pair
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def test_sweep_killed_and_resumed_on_s3_then_read_by_every_command(s3rver, tmp_path):
    from dps_tune.sweep import ray_tune, results, storage

    query = f"endpoint_override=127.0.0.1:{s3rver}&scheme=http"
    root = f"s3://{BUCKET}/runs?{query}"
    exp = f"s3://{BUCKET}/runs/exp?{query}"
    fs, exp_path = storage.resolve(exp)
    assert fs.type_name == "s3" and exp_path == f"{BUCKET}/runs/exp"
    path = space(tmp_path, "s3", search={"lr": {"loguniform": [3e-4, 3e-3]}}, **{"optim.epochs": EPOCHS},
                 tune={"num_samples": 2, "max_concurrent_trials": 2, "grace_period": EPOCHS})

    # The SDK's default checksummed uploads come back as their aws-chunked framing: refused before Ray starts.
    refused = run_cli("sweep", path, "--storage", root, "--name", "exp", "--no-dashboard", check=False,
                      env={"AWS_REQUEST_CHECKSUM_CALCULATION": "when_supported"})
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
    assert "reads back changed" in refused.stderr and "AWS_REQUEST_CHECKSUM_CALCULATION=when_required" in \
        refused.stderr, refused.stderr
    assert not storage.exists(storage.join(exp, "dps_tune_sweep.json"))

    kill_after_first_checkpoint_deletion("sweep", path, "--storage", root, "--name", "exp", "--no-dashboard")

    def read(rel: str) -> bytes:
        with fs.open_input_stream(f"{exp_path}/{rel}") as f:
            return f.read()

    assert json.loads(read("dps_tune_sweep.json"))["status"] == "running"
    # Where resume takes each trial up, as the experiment state on the store names it (its step, read from S3).
    saved = {}
    for trial_id, (_, name) in ray_tune.restore_points(exp).items():
        if name is not None:
            trial = next(i.base_name for i in fs.get_file_info(pafs.FileSelector(exp_path))
                         if f"_{trial_id}_" in i.base_name)
            saved[trial] = json.loads(read(f"{trial}/{name}/metrics.json"))["step"]
    assert saved, "the kill came before any restore point reached the store"

    run_cli("resume", exp, "--no-dashboard")
    assert json.loads(read("dps_tune_sweep.json"))["status"] == "finished"

    # Every trial finished exactly once, in the study and in Ray's results.
    (tmp_path / "db").mkdir()
    assert storage.download(storage.join(exp, "optuna.db"), tmp_path / "db" / "optuna.db")
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp_path / 'db' / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials), study.trials
    view = storage.local_view(exp)
    table = results.results_table(view)
    assert len(table) == 2 and table["trial_id"].is_unique and set(table["status"]) == {"completed"}, table
    for trial in results.load_trials(view):
        assert [h["epoch"] for h in trial.history] == [float(e) for e in range(1, EPOCHS + 1)], trial.history
        # Every line the trial ever wrote: a step up to its restore point was reported once (not trained again).
        raw = [json.loads(line)["step"] for line in (trial.path / "result.json").read_text().splitlines() if line]
        assert all(raw.count(step) == 1 for step in raw if step <= saved.get(trial.path.name, 0)), raw

    # `results`, also with the endpoint from the environment instead of the URI's query.
    out = run_cli("results", exp, "--csv", tmp_path / "r.csv").stdout
    assert out.count("completed") == 2 and "ood_test_acc" in out
    by_env = run_cli("results", f"s3://{BUCKET}/runs/exp", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3rver}"})
    assert by_env.stdout == out

    # `best --export`: the checkpoint it names is real bytes on the store, as the export is.
    best = run_cli("best", exp, "--export", tmp_path / "best").stdout
    chosen = best.split(": ", 1)[1].splitlines()[0].strip()
    assert chosen.startswith(f"s3://{BUCKET}/runs/exp/") and chosen.endswith(f"?{query}"), chosen
    ckpt_fs, ckpt_path = storage.resolve(chosen)
    with ckpt_fs.open_input_stream(f"{ckpt_path}/metrics.json") as f:
        stored = json.loads(f.read())
    with ckpt_fs.open_input_stream(f"{ckpt_path}/model.safetensors") as f:
        weights = load_safetensors(f.read())
    exported = load_file(str(tmp_path / "best" / "model.safetensors"))
    assert weights.keys() == exported.keys() and all((weights[k] == exported[k]).all() for k in exported)
    assert json.loads((tmp_path / "best" / "metrics.json").read_text()) == stored
    kept = [json.loads(p.read_text()) for p in view.glob("*/checkpoint_*/metrics.json")]
    assert stored["id_val_acc"] == max(m["id_val_acc"] for m in kept)
    import open_clip

    assert open_clip.create_model("tiny-vit", pretrained=str(tmp_path / "best" / "model.safetensors"))

    run_cli("report", exp, "--out", tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text().count("completed") >= 2

    # `dashboard` on the S3 experiment, on 127.0.0.1: its index, and its Optuna study through the API.
    dash = start("dashboard", exp, "--port", "0")
    try:
        url = dashboard_url(dash)
        site = url.split("/?token=")[0]
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        index = browser.open(url, timeout=30).read().decode()
        assert '>exp</a>' in index and "finished" in index, index[-2000:]
        browser.open(site + "/open/0", timeout=30)
        api = json.loads(browser.open(site + "/api/studies/1?after=0", timeout=30).read())
        assert [t["state"] for t in api["trials"]] == ["Complete", "Complete"], api["trials"]
    finally:
        stop(dash)
