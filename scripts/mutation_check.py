"""Mutation check: break the code in ways the tests claim to catch, and see that they do.

Each entry copies the repository, applies one small mutation, and runs the tests that
should fail on it. Run from the repository root: `python scripts/mutation_check.py [N ...]`
(with the project's Python, e.g. `.venv/bin/python`). Prints CAUGHT or MISSED per mutation.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1])
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
 ("report's best per method from each trial's last report", "dps_tune/sweep/report.py",
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
 ("test-split selection accepted", "dps_tune/config.py",
  "    if metric in metric_names(splits) and metric not in allowed:", "    allowed = metric_names(splits) + ['train_loss']\n    if False:",
  "tests/test_config.py::test_tune_block_is_validated tests/test_config.py::test_best_refuses_to_select_on_a_test_split"),
 ("workers get no code through runtime_env", "dps_tune/sweep/ray_tune.py",
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
  "dps_tune/sweep/ray_tune.py",
  "tune.CheckpointConfig(num_to_keep=None,", "tune.CheckpointConfig(num_to_keep=t.keep_checkpoints,",
  "tests/sweep/test_ray_tune.py::test_killed_driver_resumes"),
]
only = sys.argv[1:]
missed = 0
# Control: without a mutation every listed test passes, so a failure below is the mutation's doing.
control = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *sorted({t for m in MUTS for t in m[4].split()})], cwd=SRC, capture_output=True, text=True)
print(f" - control, no mutation: {control.stdout.strip().splitlines()[-1]}", flush=True)
if control.returncode != 0:
    sys.exit(2)
for i, (what, path, old, new, tests) in enumerate(MUTS):
    if only and str(i) not in only:
        continue
    dst = os.path.join(tempfile.mkdtemp(prefix="dps_tune_mutation_"), "repo")
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info"))
    f = os.path.join(dst, path)
    s = open(f).read()
    assert old in s, (what, old)
    open(f, "w").write(s.replace(old, new, 1))
    env = {**os.environ, "PYTHONPATH": dst}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
                          cwd=dst, env=env, capture_output=True, text=True, timeout=900)
    tail = [l for l in proc.stdout.splitlines() if "passed" in l or "failed" in l]
    missed += proc.returncode == 0
    print(f"{i:2d} {'CAUGHT' if proc.returncode != 0 else 'MISSED'}  {what}: {tail[-1] if tail else proc.stdout[-300:]}",
          flush=True)
    shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
sys.exit(1 if missed else 0)
