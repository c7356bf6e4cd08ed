"""The commands that ensemble and confirm finished sweeps: ``wise``, ``soup`` and ``confirm``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from dps_tune.cli.base import (Command, add_cluster_options, add_set_option, check_address, check_name, check_out_dir,
                               shutdown_ray)
from dps_tune.errors import UserError


def _add_ensemble_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="finished experiments of `dps-tune sweep`")
    p.add_argument("--select", default="id_val_f1",
                   help="validation metric that ranks checkpoints and chooses (never a test split); default id_val_f1")
    p.add_argument("--out", help=f"output directory (default: {what} next to the first EXP_DIR); a killed run "
                                 "given the same --out redoes no finished evaluation")
    p.add_argument("--address", help="Ray cluster to evaluate on: auto or ray://HOST:10001 (default: $RAY_ADDRESS, "
                                     "else a local Ray)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true",
                       help="evaluate one after another in this process instead of as Ray tasks")
    where.add_argument("--ray-tasks", action="store_true",
                       help="evaluate as Ray tasks even where this process would serve (a local Ray without a GPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _ensemble_mapper(args: argparse.Namespace):
    from dps_tune.sweep import ensembles

    if args.in_process:
        return ensembles.map_in_process
    from dps_tune.sweep import ray_tune

    return lambda jobs: ray_tune.map_jobs(ensembles.evaluate_job, jobs, address=args.address,
                                          tasks=True if args.ray_tasks else None)


def _progress_bar(args: argparse.Namespace, desc: str):
    if args.no_progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="eval", dynamic_ncols=True)

    def update(done: int, total: int | None) -> None:
        if total is not None:
            bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def _with_progress(args: argparse.Namespace, desc: str, out: Path, work):
    """``work(mapper, progress)`` under a progress bar, writing to ``out``; Ray, if it started, is stopped after.

    A full disk is one line naming ``out``'s disk and its free space: the rows finished
    are kept, and the same command continues once there is room.
    """
    from dps_tune.files import full_disk_names

    bar, update = _progress_bar(args, desc)
    try:
        with full_disk_names(out):
            return work(_ensemble_mapper(args), update)
    finally:
        if bar is not None:
            bar.close()
        shutdown_ray()


def _check_candidates_and_cluster(args: argparse.Namespace, **kwargs) -> None:
    """The last input checks of ``wise`` and ``soup``, before torch is imported: the experiments' candidates
    (and their weights' headers), then the Ray cluster unless evaluating in this process."""
    from dps_tune.sweep import candidates

    candidates.check_candidates(args.exp_dirs, args.select, **kwargs)
    if not args.in_process:
        check_address(args.address)


def _default_out(args: argparse.Namespace, name: str) -> Path:
    from dps_tune.paths import is_remote

    if args.out:
        check_out_dir("--out", args.out)
        return Path(args.out)
    first = args.exp_dirs[0]
    return Path("runs") / name if is_remote(first) else Path(first).resolve().parent / name


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    head = f"{'':<24}" + "".join(f"{c:>13}" for c in columns)
    print(head)
    for r in rows:
        print(f"{r['label']:<24}" + "".join(f"{r[c]:>13.4f}" if isinstance(r.get(c), float) else f"{'':>13}"
                                             for c in columns))


def post_ensembles(exp_dir: str, post: list[str], metric: str, args: argparse.Namespace) -> None:
    """``sweep --post wise,soup``: the ensembles of the sweep just run, on its Ray."""
    from dps_tune.files import full_disk_names
    from dps_tune.sweep import candidates, ensembles, ray_tune

    def mapper(jobs):
        return ray_tune.map_jobs(ensembles.evaluate_job, jobs, address=args.address)

    exp = Path(exp_dir)
    if "wise" in post:
        out = exp.with_name(exp.name + "-wise")
        with full_disk_names(out):
            summary = ensembles.run_wise([exp], out, alphas=candidates.parse_alphas("0:1:0.1"), select=metric,
                                         mapper=mapper)
        for method, rec in summary["methods"].items():
            print(f"WiSE-FT {method}: alpha {rec['alpha']:g}, ood_test_acc {rec['metrics'].get('ood_test_acc', 0):.4f}"
                  f" (fine-tuned {rec['fine_tuned'].get('ood_test_acc', 0):.4f}) -> {rec['export']}")
    if "soup" in post:
        out = exp.with_name(exp.name + "-soup")
        with full_disk_names(out):
            summary = ensembles.run_soup([exp], out, select=metric, mapper=mapper)
        for name, rec in summary["soups"].items():
            print(f"greedy soup {name}: {len(rec['ingredients'])} of {rec['candidates']} checkpoints, "
                  f"ood_test_acc {rec['metrics'].get('ood_test_acc', 0):.4f} -> {rec['export']}")


class Wise(Command):
    name = "wise"
    help = "WiSE-FT: interpolate each method's best checkpoints with the zero-shot weights, choose alpha on validation"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _add_ensemble_options(p, "wise/")
        p.add_argument("--alphas", default="0:1:0.1", help="alpha grid: START:STOP:STEP or a comma list, in [0, 1] "
                                                          "(default 0:1:0.1)")
        p.add_argument("--top-k", type=int, default=1, help="checkpoints per method to interpolate (default 1)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.objectives import check_selection_metric
        from dps_tune.sweep import candidates

        check_selection_metric("--select", args.select)
        alphas = candidates.parse_alphas(args.alphas)
        if args.top_k < 1:
            raise UserError(f"--top-k {args.top_k}: must be >= 1")
        out = _default_out(args, "wise")
        _check_candidates_and_cluster(args)
        from dps_tune.sweep import ensembles
        start = time.perf_counter()
        summary = _with_progress(args, "wise", out, lambda mapper, update: ensembles.run_wise(
            args.exp_dirs, out, alphas=alphas, top_k=args.top_k, select=args.select, mapper=mapper, progress=update))
        cols = ["id_test_acc", "id_test_f1", "ood_test_acc", "ood_test_f1"]
        rows = []
        for method, rec in summary["methods"].items():
            rows.append({"label": f"{method}", **rec["fine_tuned"]})
            rows.append({"label": f"{method} + wise a={rec['alpha']:g}", **rec["metrics"]})
        print(f"WiSE-FT, alpha chosen on {args.select} ({time.perf_counter() - start:.0f} s):")
        _print_table(rows, cols)
        print(f"written: {out / ensembles.WISE_CSV}, {out / ensembles.WISE_JSON}, {out}/wise_<method>/")
        return 0


class Soup(Command):
    name = "soup"
    help = "model soups: average fine-tuned checkpoints of a method (greedy by default, or uniform)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _add_ensemble_options(p, "soup/")
        p.add_argument("--method", help="soup only this method (ce, flyp, 'dps (top)', ...); default: one soup each")
        recipe = p.add_mutually_exclusive_group()
        recipe.add_argument("--greedy", dest="greedy", action="store_true", default=True,
                            help="add a candidate, best first, only if the validation metric improves (default)")
        recipe.add_argument("--uniform", dest="greedy", action="store_false", help="average every candidate")
        p.add_argument("--include-stopped", action="store_true", help="also take trials ASHA stopped early")
        p.add_argument("--mix-methods", action="store_true",
                       help="one soup of every method's checkpoints (they share the architecture and θ0)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.objectives import check_selection_metric

        check_selection_metric("--select", args.select)
        out = _default_out(args, "soup")
        _check_candidates_and_cluster(args, include_stopped=args.include_stopped, method=args.method)
        from dps_tune.sweep import ensembles
        summary = _with_progress(args, "soup", out, lambda mapper, update: ensembles.run_soup(
            args.exp_dirs, out, method=args.method, greedy=args.greedy, select=args.select,
            include_stopped=args.include_stopped, mix_methods=args.mix_methods, mapper=mapper, progress=update))
        cols = [args.select, "id_test_acc", "ood_test_acc", "ood_test_f1"]
        rows = []
        for name, rec in summary["soups"].items():
            rows.append({"label": f"{name} best ingredient", **rec["best_ingredient"]})
            rows.append({"label": f"{name} soup of {len(rec['ingredients'])}/{rec['candidates']}", **rec["metrics"]})
        print(f"{summary['recipe']} soups, selected on {args.select}:")
        _print_table(rows, cols)
        print(f"written: {out / ensembles.SOUP_JSON}, {out}/soup_<method>/")
        return 0


class Confirm(Command):
    name = "confirm"
    help = ("retrain each method's selected configuration, and DPS's controls at its configuration, with N fresh "
            "seeds; zero-shot beside them; two-level bootstrap intervals and Holm-adjusted paired comparisons")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="finished experiments of `dps-tune sweep`")
        p.add_argument("--seeds", type=int, default=5, help="seeds per method, at least 2 (default 5): 1..N")
        p.add_argument("--select", default="id_val_f1",
                       help="validation metric that selects each method's configuration (default id_val_f1)")
        p.add_argument("--storage", help="where the confirmation experiment goes (default: beside the first EXP_DIR)")
        p.add_argument("--name", help="its name (default: confirm-TIME)")
        add_set_option(p, help="override a value of every selected configuration (epochs=..., say); "
                               "tune.* keys set the run's resources")
        add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import split_overrides
        from dps_tune.objectives import check_selection_metric
        from dps_tune.paths import is_remote
        from dps_tune.sweep import confirm

        if args.seeds < 2:
            raise UserError(f"--seeds {args.seeds}: at least 2 seeds are needed for an interval")
        check_selection_metric("--select", args.select)
        check_name(args.name)
        if args.storage and not is_remote(args.storage):
            check_out_dir("--storage", args.storage)
        check_address(args.address)
        cfg_over, tune_over = split_overrides(args.set)
        seeds = list(range(1, args.seeds + 1))
        first = args.exp_dirs[0]
        storage_path = args.storage or (str(Path(first).resolve().parent) if not is_remote(first) else None)

        def announce(variants: Sequence[confirm.Variant]) -> None:
            print(f"confirming {len(variants)} configurations x {len(seeds)} seeds (selected on {args.select}):")
            for v in variants:
                control = " (control at dps (top)'s configuration)" if v.method in confirm.CONTROLS else ""
                print(f"  {v.method:<17} trial {v.trial}  {args.select}={v.value:.4f}  {v.checkpoint}{control}")

        try:
            exp, variants = confirm.run_confirmation(
                args.exp_dirs, args.select, seeds, name=args.name or f"confirm-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage_path, config_overrides=cfg_over, tune_overrides=tune_over,
                address=args.address, dashboard=not args.no_dashboard, shared_storage=args.shared_storage,
                announce=announce)
        finally:
            shutdown_ray()
        finish_confirmation(exp, confirm.selected(variants))
        return 0


def finish_confirmation(exp: str, chosen: Sequence[dict]) -> None:
    """Summarise a finished confirmation run (after `confirm`, or after `resume` of a killed one) and print it."""
    from dps_tune.sweep import confirm

    summary = confirm.conclude(exp, chosen)
    print()
    print(confirm.format_summary(summary))
    print(f"\nexperiment: {exp}  (confirm.json, confirm.csv; `dps-tune results {exp}`)")
