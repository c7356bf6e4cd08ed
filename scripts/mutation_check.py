"""Mutation check: break the code in ways the tests claim to catch, and see that they do.

Each mutation is applied to a fresh copy of the repository, and the tests named for it
run there, twice. The verdict comes from pytest's own report (JUnit XML), never from its
exit status:

- CAUGHT: a named test failed on an assertion (``assert``, ``pytest.fail``, ``pytest.raises``
  that saw nothing), both times;
- MISSED: every named test passed, both times;
- ERROR: a named test broke another way (an import or collection error, a TypeError, a
  fixture that failed): the mutation broke the code, but no test caught what it changed;
- NOT RUN: pytest ran none of the named tests (a misspelt name);
- TIMEOUT: the run outlived ``--timeout`` seconds and was killed;
- FLAKY: the two runs disagreed.

A control run, in a copy made the same way but left unmutated, comes first: every named
test must pass there, or the check stops (exit 2). Exit 1 when any mutation was not CAUGHT.

Run from the repository root with the project's Python:
``.venv/bin/python scripts/mutation_check.py [N ...] [--timeout S] [--runs R]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info", "node_modules")
# What a failure's message starts with when the test failed on an assertion.
ASSERTION = ("AssertionError", "assert ", "Failed:")


@dataclass(frozen=True)
class Mutation:
    what: str
    path: str  # relative to the repository root
    old: str  # replaced once; must occur in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (a file, or file::test[param])


MUTS = [
 ("iWildCam id_val/id_test swapped", "dps_tune/data/datasets.py",
  '"id_val": "id_val", "id_test": "id_test"', '"id_val": "id_test", "id_test": "id_val"',
  "tests/data/test_datasets.py::test_iwildcam_layout_splits_and_names"),
 ("relative paths resolved from the config file's folder", "dps_tune/config.py",
  "raw = _absolute_paths(raw, Path.cwd())", "raw = _absolute_paths(raw, Path(path).resolve().parent)",
  "tests/test_config.py::test_paths_made_absolute"),
 ("train crop ignores its generator", "dps_tune/data/datasets.py",
  "top, left, h, w = crop_params(img.height, img.width, gen)",
  "top, left, h, w = crop_params(img.height, img.width, torch.Generator().manual_seed(0))",
  "tests/data/test_datasets.py::test_train_transform_shape_and_determinism"),
 ("ties at the cut broken in reverse order", "dps_tune/suppression.py",
  "order = torch.sort(flat, descending=True, stable=True).indices",
  "order = flat.numel() - 1 - torch.sort(flat.flip(0), descending=True, stable=True).indices",
  "tests/test_suppression.py::test_a_tie_at_the_cut_goes_to_the_earlier_tensor_and_row"),
 ("ranking cache key ignores theta0", "dps_tune/suppression.py",
  'key = hashlib.sha256(f"{RULE_VERSION}|{d0}|{d1}".encode())', 'key = hashlib.sha256(f"{RULE_VERSION}|{d1}".encode())',
  "tests/test_suppression.py::test_ranking_cache_hit"),
 ("no lock around the pretrained build", "dps_tune/demo/pretrain.py",
  'with file_lock(path.with_name(path.name + ".lock")):', 'with contextlib.nullcontext():',
  "tests/demo/test_pretrain.py::test_build_is_deterministic_and_concurrent_builders_share_one_file"),
 ("report's best per method from each trial's last report", "dps_tune/sweep/report/tables.py",
  "            for h in t.history:", "            for h in t.history[-1:]:",
  "tests/sweep/test_report.py::test_report_shows_every_plot_and_the_tables"),
 ("macro-F1 over every label seen", "dps_tune/metrics.py",
  "labels = torch.unique(y_true)  # [L]", "labels = torch.unique(torch.cat([y_true, y_pred]))  # [L]",
  "tests/test_metrics.py"),
 ("no loss log without a progress bar", "dps_tune/train.py",
  'logger.info("step %d/%d (epoch %.2f): loss %.4f, lr %.3g"', 'logger.debug("step %d/%d (epoch %.2f): loss %.4f, lr %.3g"',
  "tests/test_train.py::test_loss_is_logged_every_log_every_steps_without_a_progress_bar"),
 ("no zero-gradient hook", "dps_tune/suppression.py",
  "self._handles.append(p.register_post_accumulate_grad_hook(_zero_rows_hook(rows)))", "pass",
  "tests/test_suppression.py::test_suppressed_rows_get_a_zero_gradient_before_clipping"),
 ("one template for every class per step", "dps_tune/methods.py",
  "pick = torch.randint(num_templates, (num_classes,), generator=self.generator)",
  "pick = torch.randint(num_templates, (1,), generator=self.generator).expand(num_classes).contiguous()",
  "tests/test_methods.py"),
 ("test-split selection accepted", "dps_tune/objectives.py",
  "    if metric in metric_names(splits) and metric not in allowed:", "    allowed = metric_names(splits) + ['train_loss']\n    if False:",
  "tests/test_config.py::test_tune_block_is_validated tests/test_config.py::test_best_refuses_to_select_on_a_test_split"),
 ("workers get no code through runtime_env", "dps_tune/sweep/ray_tune/connection.py",
  'runtime_env={"py_modules": [package_dir]})', 'runtime_env={})',
  "tests/sweep/test_ray_tune.py::test_sweep_on_a_running_cluster"),
 ("export names the plain architecture", "dps_tune/models.py",
  '        return f"{arch}-quickgelu"', '        return arch',
  "tests/test_checkpoint.py"),
 ("a weights-only report may let Ray drop the newest train state", "dps_tune/retention.py",
  "            return FULL  # writing weights only would make Ray drop the only way to resume",
  "            pass",
  "tests/test_retention.py"),
 ("WiSE-FT's alpha 0 end is not the zero-shot weights", "dps_tune/weight_space.py",
  "    if alpha == 0.0:\n        return dict(theta0)", "    if alpha == 0.0:\n        alpha = 1e-3",
  "tests/test_weight_space.py"),
 ("greedy soup keeps a candidate that does not improve", "dps_tune/weight_space.py",
  "        accepted = sign * value > sign * best", "        accepted = True",
  "tests/test_weight_space.py::test_greedy_soup_never_falls_below_its_best_ingredient"),
 ("a safetensors file cut short passes the header check", "dps_tune/layout.py",
  "    if 8 + n + end > size:", "    if False:",
  "tests/test_models.py::test_the_safetensors_header_check_reads_what_safetensors_writes_and_refuses_every_cut"),
 ("a second driver of a running experiment is let through", "dps_tune/sweep/storage.py",
  "        if not held:", "        if False:",
  "tests/sweep/test_launch_checks.py::test_a_sweep_whose_experiment_another_process_drives_is_refused_before_ray"),
 ("a train refused by its data leaves its run directory", "dps_tune/files.py",
  "            shutil.rmtree(made, ignore_errors=True)", "            pass",
  "tests/test_input_matrix.py::test_bad_input_is_one_line_exit_2_and_leaves_nothing[train/csv/corrupt]"),
 ("the resume race: Ray deletes a superseded checkpoint before its experiment state stops naming it",
  "dps_tune/sweep/ray_tune/launch.py",
  "tune.CheckpointConfig(num_to_keep=None,", "tune.CheckpointConfig(num_to_keep=t.keep_checkpoints,",
  "tests/sweep/test_ray_tune.py::test_killed_driver_resumes"),
 ("a trial resumes from its latest checkpoint, with train state or without", "dps_tune/sweep/ray_tune/trial.py",
  "with_state = [(path, metrics) for path, metrics, state in kept if state]",
  "with_state = [(path, metrics) for path, metrics, state in kept]",
  "tests/sweep/test_pruning.py::test_a_trial_resumes_from_the_newest_checkpoint_ray_knows_that_holds_train_state"),
 ("a trial resumes from a checkpoint written after the experiment state Ray restores", "dps_tune/sweep/ray_tune/trial.py",
  'if k[0].rstrip("/").rsplit("/", 1)[1] <= latest_name]', "if True]",
  "tests/sweep/test_pruning.py::test_a_trial_resumes_from_the_newest_checkpoint_ray_knows_that_holds_train_state"),
 ("the driver deletes the train state an unfinished trial resumes from", "dps_tune/sweep/ray_tune/callbacks.py",
  "for path in with_state if ended else with_state[:-1]:", "for path in with_state:",
  "tests/sweep/test_pruning.py::test_an_unfinished_trial_keeps_its_best_its_restore_point_with_state_and_all_that_is_newer"),
 ("the driver deletes while the restore point is not on the storage", "dps_tune/sweep/ray_tune/callbacks.py",
  'if not known or not known[-1][0].rstrip("/").endswith("/" + latest):', "if not known:",
  "tests/sweep/test_pruning.py::test_nothing_is_deleted_while_the_restore_point_is_missing"),
 ("a trial restored on its last epoch's checkpoint trains again from epoch 0", "dps_tune/sweep/ray_tune/trial.py",
  "if latest is not None and _trained_to(latest) >= last_epoch:", "if False:",
  "tests/sweep/test_confirm.py::test_a_confirmation_killed_after_a_trial_s_last_report_ends_that_trial_without_"
  "training_it_again"),
]

MUTATIONS = [Mutation(what, path, old, new, tuple(tests.split())) for what, path, old, new, tests in MUTS]


def copy_repo(mutation: Mutation | None) -> Path:
    """A copy of the repository (without its environment, history or caches), with ``mutation`` applied."""
    dst = Path(tempfile.mkdtemp(prefix="dps_tune_mutation_")) / "repo"
    shutil.copytree(SRC, dst, ignore=COPY_IGNORE)
    if mutation is not None:
        target = dst / mutation.path
        text = target.read_text()
        if mutation.old not in text:
            raise SystemExit(f"mutation {mutation.what!r}: its text is no longer in {mutation.path}; update it")
        target.write_text(text.replace(mutation.old, mutation.new, 1))
    return dst


def node_id(case: ET.Element) -> str:
    """A JUnit testcase's pytest node id: classname ``tests.sweep.test_x[.Class]`` and name ``test_y[param]``."""
    parts = case.get("classname", "").split(".")
    names = [p for p in parts if p]
    # The module is the last part that names a test file; what follows is a test class.
    module = max((i for i, p in enumerate(names) if p.startswith("test_")), default=len(names) - 1)
    path = "/".join(names[:module + 1]) + ".py"
    return "::".join([path, *names[module + 1:], case.get("name", "")])


def matches(node: str, named: tuple[str, ...]) -> bool:
    """Whether ``node`` is one of the named tests (a file names all its tests; a test name all its params)."""
    return any(node == n or node.startswith(n + "::") or node.startswith(n + "[") for n in named)


def verdict(report: Path, named: tuple[str, ...]) -> tuple[str, str]:
    """One run's outcome from its JUnit report: (CAUGHT | PASSED | ERROR | NOT RUN, the line that says why)."""
    if not report.is_file():
        return "ERROR", "pytest wrote no report"
    cases = [c for c in ET.parse(report).getroot().iter("testcase")]
    errors = [c for c in cases if c.find("error") is not None]
    if any(c.get("name", "") == "" or not c.get("classname") for c in errors):
        return "ERROR", "a collection error: " + (errors[0].find("error").get("message") or "")[:200]
    ours = [c for c in cases if matches(node_id(c), named)]
    if not ours:
        return "NOT RUN", f"none of {' '.join(named)} ran"
    for case in ours:
        failure = case.find("failure")
        if failure is not None and (failure.get("message") or "").startswith(ASSERTION):
            return "CAUGHT", f"{node_id(case)}: {(failure.get('message') or '').splitlines()[0][:160]}"
    broken = next((c for c in ours if c.find("failure") is not None or c.find("error") is not None), None)
    if broken is not None:
        element = broken.find("failure") if broken.find("failure") is not None else broken.find("error")
        return "ERROR", f"{node_id(broken)}: {(element.get('message') or '').splitlines()[0][:160]}"
    if all(c.find("skipped") is not None for c in ours):
        return "NOT RUN", "every named test was skipped"
    return "PASSED", f"{sum(c.find('skipped') is None for c in ours)} named test(s) passed"


def run_tests(repo: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """The named tests in ``repo``, in a process group of their own; TIMEOUT when they outlive ``timeout``."""
    report = repo.parent / "report.xml"
    report.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             f"--junitxml={report}", *tests], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", f"still running after {timeout:.0f} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started (Ray)
        except ProcessLookupError:
            pass
        proc.wait()
    return verdict(report, tests)


def judge(outcomes: list[tuple[str, str]]) -> tuple[str, str]:
    """The mutation's verdict from its runs."""
    kinds = {kind for kind, _ in outcomes}
    if len(kinds) > 1:
        return "FLAKY", " / ".join(f"{kind}: {why}" for kind, why in outcomes)
    kind, why = outcomes[0]
    return {"PASSED": "MISSED"}.get(kind, kind), why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", type=int, help="run only these mutations (their numbers)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run of a mutation's tests may take")
    parser.add_argument("--runs", type=int, default=2, help="runs per mutation; results that differ are FLAKY")
    args = parser.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTATIONS) if not args.only or i in args.only]

    control = copy_repo(None)
    try:
        tests = tuple(sorted({t for _, m in chosen for t in m.tests}))
        kind, why = run_tests(control, tests, args.timeout * max(1, len(chosen)))
    finally:
        shutil.rmtree(control.parent, ignore_errors=True)
    print(f" - control, an unmutated copy: {kind}: {why}", flush=True)
    if kind != "PASSED":
        return 2

    counts: dict[str, int] = {}
    for i, mutation in chosen:
        outcomes = []
        for _ in range(args.runs):
            repo = copy_repo(mutation)
            try:
                outcomes.append(run_tests(repo, mutation.tests, args.timeout))
            finally:
                shutil.rmtree(repo.parent, ignore_errors=True)
        kind, why = judge(outcomes)
        counts[kind] = counts.get(kind, 0) + 1
        print(f"{i:2d} {kind:7s} {mutation.what}: {why}", flush=True)
    print("summary: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())), flush=True)
    return 0 if set(counts) <= {"CAUGHT"} else 1


if __name__ == "__main__":
    sys.exit(main())
