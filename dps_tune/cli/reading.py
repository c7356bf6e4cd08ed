"""The commands that read finished sweeps: ``results``, ``best`` (and its export) and ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dps_tune.cli.base import Command, check_out_dir, check_out_file, format_table
from dps_tune.errors import UserError


class Results(Command):
    name = "results"
    help = "one row per trial: parameters, epochs, status, ID and OOD metrics"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dir", help="experiment: a directory or a storage URI (file://, s3://, gs://)")
        p.add_argument("--metric", help="sort by this metric (default: the sweep's tune.metric)")
        p.add_argument("--mode", choices=["max", "min"], help="sort order (default: the sweep's tune.mode)")
        p.add_argument("--csv", help="also write the table to this CSV file")
        view = p.add_mutually_exclusive_group()
        view.add_argument("--pareto", action="store_true",
                          help="only the non-dominated trials on the sweep's objectives (ID and OOD validation "
                               "macro-F1 for a one-metric sweep)")
        view.add_argument("--bootstrap", action="store_true",
                          help="each trial's kept checkpoint best on the metric, with 95%% bootstrap intervals of "
                               "every test metric (1,000 seeded resamples of the evaluation images)")
        p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.sweep import results

        if args.resamples < 100:
            raise UserError(f"--resamples {args.resamples}: at least 100 are needed for a 95% interval")
        exp, sweep = results.open_sweep(args.exp_dir)
        if args.pareto:
            metrics, modes = results.pareto_objectives(exp)
            table = results.pareto_table(exp, metrics, modes)
            print(f"non-dominated trials on {', '.join(f'{m} ({d})' for m, d in zip(metrics, modes))}:")
        elif args.bootstrap:
            metric, mode = sweep.objective(args.metric, args.mode)
            table = results.bootstrap_table(exp, metric, mode, resamples=args.resamples)
            print(f"each trial's kept checkpoint best on {metric} ({mode}); 95% bootstrap intervals, "
                  f"{args.resamples} resamples:")
        else:
            table = results.results_table(exp, args.metric, args.mode)
        if args.metric and args.metric not in table.columns:
            raise UserError(f"--metric {args.metric}: no trial of {args.exp_dir} reports it; the metrics are "
                            f"{', '.join(c for c in table.columns if c.endswith(('_acc', '_f1', '_loss')))}")
        if args.csv:
            check_out_file("--csv", args.csv)
        print(format_table(table))
        if args.csv:
            table.to_csv(args.csv, index=False)
            print(f"written to {args.csv}", file=sys.stderr)
        return 0


class Best(Command):
    name = "best"
    help = "find, and optionally export, the best checkpoint of an experiment"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dir", help="experiment: a directory or a storage URI (file://, s3://, gs://)")
        p.add_argument("--metric", help="a validation metric (id_val_f1, ood_val_acc, ...; never a test split); "
                                        "default: the sweep's tune.metric")
        p.add_argument("--mode", choices=["max", "min"])
        p.add_argument("--scope", choices=["all", "last"], default="all",
                       help="all: best over every kept checkpoint; last: best by each trial's last result")
        p.add_argument("--export", metavar="DIR", help="write model.safetensors, config.json, metrics.json here")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.objectives import check_selection_metric
        from dps_tune.sweep import results, storage

        if args.metric is not None:
            check_selection_metric("--metric", args.metric)
        if args.export:
            check_out_dir("--export", args.export)
        exp, sweep = results.open_sweep(args.exp_dir)
        metric, mode = sweep.objective(args.metric, args.mode)
        path = results.best_checkpoint(exp, metric, mode, args.scope)
        metrics = results.checkpoint_json(path)
        print(f"best by {metric} ({mode}, scope {args.scope}): {storage.source(path)}")
        print("  " + "  ".join(f"{k}={metrics[k]:.4f}" for k in sorted(metrics) if k.endswith(("_acc", "_f1"))))
        if args.export:
            from dps_tune import checkpoint  # torch from here on

            from dps_tune.sweep import test_figures

            out = checkpoint.export(storage.fetch_weights(path), args.export)
            for job in test_figures.pending_jobs(out):  # a checkpoint whose sweep ended before its test figures
                print(f"evaluating the export on {', '.join(job['splits'])} (not recorded by its sweep)")
                test_figures.record(job, test_figures.evaluate_job(job))
            print(f"exported model.safetensors, config.json, metrics.json to {out}")
        return 0


class Report(Command):
    name = "report"
    help = "one self-contained HTML page of plots and tables for one or more sweeps"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR",
                       help="experiments of `dps-tune sweep`: directories or storage URIs")
        p.add_argument("--out", required=True, help="HTML file to write (images are embedded)")
        p.add_argument("--zero-shot", metavar="FILE",
                       help="zero-shot metrics: a JSON file or a checkpoint directory "
                            "(default: zero_shot.json next to the first EXP_DIR that has one)")
        p.add_argument("--x-metric", default="id_test_acc", help="ID axis of the ID-vs-OOD plot (default: id_test_acc)")
        p.add_argument("--y-metric", default="ood_test_acc",
                       help="OOD axis of the ID-vs-OOD plot (default: ood_test_acc); the macro-F1 twin is also drawn")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import check
        from dps_tune.objectives import metric_names
        from dps_tune.sweep import report, results

        for key, metric in (("--x-metric", args.x_metric), ("--y-metric", args.y_metric)):
            check(metric in metric_names(), key, metric, f"must be one of {', '.join(metric_names())}")
        check_out_file("--out", args.out)
        if args.zero_shot is not None and not Path(args.zero_shot).exists():
            raise UserError(f"--zero-shot {args.zero_shot}: no such file or directory")
        exps = [Path(e) if Path(e).is_dir() and results.ensemble_kind(e) else results.open_sweep(e)[0]
                for e in args.exp_dirs]
        zero_shot = args.zero_shot or report.find_zero_shot(exps)
        if zero_shot is not None and not args.zero_shot:
            print(f"zero-shot metrics: {zero_shot}", file=sys.stderr)
        out = report.render_report(exps, args.out, zero_shot=zero_shot, x_metric=args.x_metric,
                                   y_metric=args.y_metric)
        print(f"report written to {out}")
        return 0
