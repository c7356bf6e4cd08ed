import json
from pathlib import Path

from support.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_train_demo_config_prints_metric_lines(tmp_path):
    """The README's first single-trial command, run as a user would."""
    proc = run_cli("train", "search_spaces/demo.yaml", "--set", "algorithm=ce", "--set", "epochs=1",
                   "--out", tmp_path / "run", "--no-progress", cwd=ROOT)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout
    assert {"id_val_acc", "ood_test_acc", "id_val_f1", "ood_test_f1", "epoch"} <= set(lines[-1])
    ck = tmp_path / "run" / "checkpoint"
    assert (ck / "model.safetensors").is_file() and (ck / "train_state.pt").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["epochs"] == 1


def test_train_resume_continues_an_interrupted_run_exactly(tmp_path, write_yaml, monkeypatch, capsys):
    """Ctrl-C after the first epoch's checkpoint, then `train --resume`: the same weights as an unbroken run."""
    import torch

    from dps_tune import cli
    from dps_tune.checkpoint import load_checkpoint
    from dps_tune.cli import training
    from support.worlds import tiny_raw

    path = write_yaml(tiny_raw(**{"optim.epochs": 2}))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "unbroken"), "--no-progress"]) == 0

    real_keep = training._keep_newest

    def interrupted(src, final):
        real_keep(src, final)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_keep_newest", interrupted)
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "checkpoint"
    assert load_checkpoint(ckpt).loop.epoch == 1
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run"), "--resume", str(ckpt), "--no-progress"]) == 0
    capsys.readouterr()
    a = load_checkpoint(tmp_path / "unbroken" / "checkpoint")
    b = load_checkpoint(ckpt)
    assert b.loop.epoch == 2 and all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8]  # epoch 1 before the interrupt, epoch 2 after the resume


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, write_yaml, monkeypatch, capsys):
    """ENOSPC in the middle of epoch 2's checkpoint: one line, exit 2, epoch 1's checkpoint whole, no stray files."""
    import errno

    import torch

    from dps_tune import checkpoint, cli
    from support.worlds import tiny_raw

    path = write_yaml(tiny_raw(**{"optim.epochs": 2}))
    real_save = checkpoint.save_file
    calls = []

    def fills_the_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "checkpoint_00000008" in filename:  # epoch 2 (4 steps an epoch): half a file, then the disk is full
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "run"
    assert cli.main(["train", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[-1] and "previous checkpoint is intact" in err[-1], err
    assert any("checkpoint_00000008" in c for c in calls)
    monkeypatch.undo()
    kept = checkpoint.load_checkpoint(out / "checkpoint")
    assert kept.loop.epoch == 1 and kept.loop.step == 4
    assert json.loads((out / "checkpoint" / "metrics.json").read_text())["step"] == 4
    assert all(torch.isfinite(v).all() for v in kept.model_state.values() if v.is_floating_point())
    assert not list(out.rglob(".*.tmp-*")) and not (out / ".work").exists()
    # and the run goes on from it once there is room again
    assert cli.main(["train", str(path), "--out", str(out), "--resume", str(out / "checkpoint"), "--no-progress"]) == 0
    assert checkpoint.load_checkpoint(out / "checkpoint").loop.epoch == 2


def test_the_console_script_flushes_everything_and_keeps_the_exit_status(tmp_path, write_yaml):
    """`dps-tune` ends without tearing the interpreter down: its output and files are whole, its status kept."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "dps_tune.cli"]
    # Buffered output, as from a pipe: only the command's own flush before its exit writes it out.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    ok = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    for name in ("train", "sweep", "resume", "results", "best", "report", "wise", "soup", "confirm", "demo", "dashboard"):
        assert name in ok.stdout, name
    bad = subprocess.run([*command, "results", str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such directory" in bad.stderr, bad.stderr
    # A command that imports torch and writes files: every line and every file is complete at exit.
    out = tmp_path / "run"
    from support.worlds import tiny_raw

    proc = subprocess.run([*command, "train", str(write_yaml(tiny_raw())), "--set", "epochs=1", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert last["epoch"] == 1 and json.loads((out / "checkpoint" / "metrics.json").read_text())["epoch"] == 1


def test_commands_run_in_a_fork_once_every_dps_tune_module_is_imported():
    """pytest-xdist imports every test module before the first test, and some dps_tune modules set defaults in
    os.environ when they are imported (the Ray package: RAY_DEDUP_LOGS, TUNE_GLOBAL_CHECKPOINT_S, ...). A
    command must still run in a fork of the CLI server: once, that difference sent every command of the suite
    to a new interpreter, 5 to 7 CPU-seconds of imports each."""
    import importlib
    import os
    import pkgutil

    import pytest

    import dps_tune
    from support import cli_server

    if not cli_server.ENABLED:
        pytest.skip("DPS_TUNE_TEST_FORK=0: every command runs in a subprocess")
    for module in pkgutil.walk_packages(dps_tune.__path__, "dps_tune."):
        if not module.name.endswith("__main__"):  # a __main__ runs its command when imported
            importlib.import_module(module.name)
    proc = cli_server.run_in_fork(["--help"], dict(os.environ), 300, None)
    assert proc is not None, cli_server.changed_since_taken()
    assert proc.returncode == 0 and "sweep" in proc.stdout, proc.stderr[-2000:]


def test_a_command_that_cannot_fork_is_counted_with_the_variables_that_kept_it_out(monkeypatch):
    """The run's summary says where commands ran and why not in a fork (support/cli_tally.py), so that a
    fallback for every command, as once happened unseen, shows in every run's output."""
    import os

    import pytest

    from support import cli_server, cli_tally

    if not cli_server.ENABLED:
        pytest.skip("DPS_TUNE_TEST_FORK=0: every command runs in a subprocess")
    assert cli_server.drift(os.environ) == []  # the autouse fixture in conftest.py fails a test that changes this
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "PYTHONPATH": "elsewhere", "DPS_TUNE_CACHE": "any"}
    before = dict(cli_tally.TALLY)
    try:
        assert cli_server.run_in_fork(["--help"], env, 60, None) is None
        reason = "its environment differs from the server's in PYTHONPATH, RAY_ADDRESS"  # DPS_TUNE_* is read later
        assert cli_tally.TALLY[reason] == before.get(reason, 0) + 1
    finally:  # no command ran: the run's summary must not count one
        cli_tally.TALLY.clear()
        cli_tally.TALLY.update(before)
    assert cli_server.fallback_reason(env) == reason
    assert cli_server.fallback_reason(dict(os.environ)) is None

    line = cli_tally.summary([{"fork": 3, reason: 1}, {"fork": 2, "another thread held the server": 2}, {}])
    assert line == ("dps-tune commands of run_cli and run_killed: 5 in forks of the CLI server, 3 in new "
                    f"interpreters (2 because another thread held the server; 1 because {reason})")
    assert cli_tally.summary([{}, {}]) is None

    # What conftest.py's autouse fixture fails a test for: a change left in the process's own environment.
    assert cli_server.changed_since_taken() == []
    monkeypatch.setenv("TUNE_SOMETHING", "1")
    monkeypatch.delenv("RAY_DEDUP_LOGS")
    dedup = cli_server.SERVER_ENV["RAY_DEDUP_LOGS"]  # "0", dps_tune's default, unless the user set it
    assert cli_server.changed_since_taken() == [f"RAY_DEDUP_LOGS=None (the server has {dedup!r})",
                                                "TUNE_SOMETHING='1' (the server has None)"]
