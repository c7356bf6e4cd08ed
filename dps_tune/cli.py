"""The ``dps-tune`` command line: one small class per command, its arguments next to its action.

This module holds the parser, ``main`` and the commands that train, sweep and read sweeps;
:mod:`dps_tune.cli_analysis` holds ``wise``, ``soup``, ``confirm`` and ``dashboard``, and
:mod:`dps_tune.cli_base` what they all share.

Every command checks its input first (values in :mod:`dps_tune.config`, the world in
:mod:`dps_tune.preflight`) and only then builds models, starts Ray or creates
directories. A :class:`~dps_tune.errors.UserError` ends the command with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from dps_tune.cli_analysis import Confirm, DashboardCommand, Soup, Wise, finish_confirmation, post_ensembles
from dps_tune.cli_base import (Command, Parser, add_cluster_options, add_set_option, check_address, check_name,
                               check_out_dir, check_out_file, format_table, print_sweep_summary)
from dps_tune.config import PAPER_EXCLUDE, QUOTAS, SYNTHETIC_WORLDS, check_choice, check_exclude, split_list
from dps_tune.errors import Interrupted, UserError, first_line
from dps_tune.layout import CONFIG_FILE, STATE_FILE
from dps_tune.objectives import scalar_objective

logger = logging.getLogger("dps_tune")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("dps_tune").setLevel(logging.INFO)


# ------------------------------------------------------------------------- training


class Train(Command):
    name = "train"
    help = "run the base config of a config file as one trial"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file (search: and tune: blocks are ignored)")
        add_set_option(p)
        p.add_argument("--out", help="output directory (default: runs/train-ALGORITHM-TIME)")
        p.add_argument("--resume", help="checkpoint directory to continue from")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import load_config, save_json
        from dps_tune.files import new_directory

        cfg = load_config(args.config, args.set)
        if args.out is not None:
            check_out_dir("--out", args.out)
        if args.resume is not None and not (Path(args.resume) / STATE_FILE).is_file():
            raise UserError(f"--resume {args.resume}: not a checkpoint directory with a training state "
                            f"({STATE_FILE})")
        from dps_tune import preflight  # torch and open_clip from here on
        from dps_tune.sweep import reference
        from dps_tune.train import run_trial

        preflight.check_config(cfg)
        if args.resume is not None:
            preflight.check_train_state("--resume", args.resume)
        resolved = reference.resolve(cfg)
        cfg = resolved.config
        out = Path(args.out or f"runs/train-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
        final = out / "checkpoint"
        reported = out / "metrics.jsonl"

        # Refused before its first report (bad data found late, say): no run is left behind.
        with new_directory(out, keep=lambda: final.exists() or reported.stat().st_size > 0), \
                reported.open("a") as metrics_log:
            save_json(cfg, out / CONFIG_FILE)

            def report(metrics: dict, checkpoint_dir: Path | None) -> None:
                line = json.dumps(metrics)
                print(line, flush=True)
                metrics_log.write(line + "\n")
                metrics_log.flush()
                if checkpoint_dir is not None:
                    _keep_newest(checkpoint_dir, final)

            try:
                run_trial(cfg, report, ranking=resolved.ranking, resume_from=args.resume, work_dir=out / ".work",
                          progress=not args.no_progress)
            finally:
                shutil.rmtree(out / ".work", ignore_errors=True)
        print(f"checkpoint: {final}", file=sys.stderr)
        return 0


def _keep_newest(src: Path, final: Path) -> None:
    """Move checkpoint ``src`` to ``final``, replacing the older one; a crash in between keeps one of them."""
    from dps_tune.files import atomic_path

    with atomic_path(final) as tmp:
        src.rename(tmp)


class Rank(Command):
    name = "rank"
    help = "compute the DPS ranking of a pretrained/reference pair"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
        p.add_argument("--pretrained", required=True, help="pretrained tag, weights file, or none")
        p.add_argument("--reference", required=True, help="CE fine-tuned checkpoint directory or weights file")
        p.add_argument("--masking", type=float, default=0.9, help="fraction of ranked rows to suppress in the summary")
        p.add_argument("--quota", default="global", help="global (one cut over all rows) or per_tensor")
        p.add_argument("--exclude", default=",".join(PAPER_EXCLUDE),
                       help="comma-separated name substrings of tensors left out of the ranking")
        p.add_argument("--seed", type=int, default=0, help="the trial seed (only matters for --pretrained none)")
        p.add_argument("--out", required=True, help="output file (torch.load(weights_only=True) compatible)")

    def run(self, args: argparse.Namespace) -> int:
        if not 0 <= args.masking <= 1:
            raise UserError(f"--masking {args.masking}: must be in [0, 1]")
        check_choice("--quota", args.quota, QUOTAS)
        exclude = tuple(split_list(args.exclude))
        check_exclude("--exclude", exclude)
        check_out_file("--out", args.out)
        from dps_tune import models, preflight, suppression  # torch and open_clip from here on

        preflight.check_model(args.model, args.pretrained, key="--model", pretrained_key="--pretrained")
        preflight.check_weights("--reference", args.reference)
        theta1 = models.load_weights_file(args.reference)
        theta0 = models.pretrained_state_dict(args.model, args.pretrained, seed=args.seed)
        start = time.perf_counter()
        scores = suppression.rank_scores(theta0, theta1, exclude)
        seconds = time.perf_counter() - start
        suppression.save_ranking(args.out, scores, model=args.model, pretrained=str(args.pretrained),
                                 reference=str(args.reference))
        masks = suppression.select_rows(scores, args.masking, "top", quota=args.quota, exclude=exclude)
        rows = suppression.summarize(masks)
        width = max(len(n) for n, _, _ in rows) if rows else 10
        print(f"{'tensor':<{width}}  suppressed / ranked")
        for name, k, n in rows:
            print(f"{name:<{width}}  {k:>10} / {n:<8} {100.0 * k / max(n, 1):5.1f}%")
        total_k, total_n = sum(k for _, k, _ in rows), sum(n for _, _, n in rows)
        print(f"{'total':<{width}}  {total_k:>10} / {total_n:<8} {100.0 * total_k / max(total_n, 1):5.1f}%"
              f"  (masking {args.masking}, quota {args.quota}, ranked in {seconds:.3f} s)")
        print()
        print(f"what DPS (top) holds per tensor group, masking {args.masking}, quota {args.quota}:")
        for line in suppression.format_holdings(suppression.holdings(masks, models.parameter_shapes(args.model))):
            print(line)
        print(f"ranking written to {args.out}")
        return 0


class Prepare(Command):
    name = "prepare"
    help = "decode every image a config uses once into a shared uint8 cache"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config file: its dataset, training and evaluation splits")
        add_set_option(p)
        p.add_argument("--out", help="cache directory (default: the config's data.image_cache)")
        p.add_argument("--size", type=int, default=256,
                       help="side of the stored squares: shorter side resized to this, centre-cropped (default: 256)")
        p.add_argument("--workers", type=int, default=None,
                       help="decoding processes (default: every usable CPU; 0 decodes in this process)")
        p.add_argument("--skip-bad", action="store_true",
                       help="leave unreadable images out (listed and counted in the manifest) instead of stopping")
        p.add_argument("--verify", action="store_true", help="re-hash finished shards and rebuild any that changed")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import load_config

        cfg = load_config(args.config, args.set)
        target = args.out or cfg.data.image_cache
        if target is None:
            raise UserError(f"{args.config}: data.image_cache is not set; pass --out DIR to say where the cache goes")
        if args.size < 1:
            raise UserError(f"--size {args.size}: must be >= 1")
        if args.workers is not None and args.workers < 0:
            raise UserError(f"--workers {args.workers}: must be >= 0")
        check_out_dir("--out" if args.out else "data.image_cache", target)
        from dps_tune import preflight  # torch from here on
        from dps_tune.data import cache_writer
        from dps_tune.data.datasets import load_dataset

        preflight.check_config(cfg, image_cache_may_be_missing=True)  # prepare is what creates the cache
        out = Path(target).expanduser().resolve()
        result = cache_writer.prepare(load_dataset(cfg.data), out, size=args.size, workers=args.workers,
                                      skip_bad=args.skip_bad, verify=args.verify, progress=not args.no_progress)
        print(f"image cache: {result.path}")
        print(f"  {result.images} images ({result.decoded} decoded now, {result.reused} from an earlier run), "
              f"{len(result.skipped)} skipped, {args.size} px squares, {result.shards} shard(s), "
              f"{result.nbytes / 2**20:.1f} MiB, content {result.content_hash[:12]}")
        for path, why in result.skipped[:10]:
            print(f"  skipped {path}: {why}")
        if len(result.skipped) > 10:
            print(f"  ... and {len(result.skipped) - 10} more (listed in {result.path / cache_writer.MANIFEST})")
        if cfg.data.image_cache is not None and Path(cfg.data.image_cache).resolve() == out:
            print(f"trials of {args.config} read from it (data.image_cache)")
        else:
            print(f"to train from it, set `data.image_cache: {out}` in {args.config}")
        return 0


# --------------------------------------------------------------------------- sweeps


class SweepCommand(Command):
    name = "sweep"
    help = "launch a Ray Tune sweep (Optuna + ASHA) from a search-space file"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("space", help="YAML file: base config, search: and tune: blocks")
        p.add_argument("--storage", help="experiment storage: a path (default ./runs) or a URI (s3://, gs://)")
        p.add_argument("--name", help="experiment name (default: SPACE-TIME)")
        p.add_argument("--num-samples", type=int, help="override tune.num_samples")
        p.add_argument("--post", default="", metavar="wise,soup",
                       help="after the sweep, on the same Ray: WiSE-FT (alphas 0:1:0.1, top 1) and/or a greedy soup, "
                            "selected on tune.metric, into NAME-wise/ and NAME-soup/ beside the experiment")
        add_set_option(p)
        add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.paths import is_remote
        from dps_tune.sweep.search_space import load_sweep

        post = [x.strip() for x in args.post.split(",") if x.strip()]
        unknown = [x for x in post if x not in ("wise", "soup")]
        if unknown:
            raise UserError(f"--post {args.post}: {unknown[0]!r} is not one of wise, soup")
        overrides = list(args.set)
        if args.num_samples is not None:
            overrides.append(f"tune.num_samples={args.num_samples}")
        check_name(args.name)
        if args.storage and not is_remote(args.storage):
            check_out_dir("--storage", args.storage)
        check_address(args.address)  # one TCP connect, before the search space's open_clip checks
        sweep = load_sweep(args.space, overrides)  # every check runs before Ray starts
        if post:
            from dps_tune.objectives import objectives

            post_metric = objectives(sweep.tune)[0][0]  # with several objectives, the first selects
            if args.storage and is_remote(args.storage):
                raise UserError(f"--post {args.post}: needs a local --storage (the ensembles read the weights)")
        from dps_tune.sweep import ray_tune

        try:
            exp_dir = ray_tune.run_sweep(sweep, address=args.address, storage_path=args.storage, name=args.name,
                                         dashboard=not args.no_dashboard, shared_storage=args.shared_storage)
            status = print_sweep_summary(exp_dir, *scalar_objective(sweep.tune))
            if post:
                post_ensembles(exp_dir, post, post_metric, args)
        finally:
            ray_tune.shutdown()
        return status


class Resume(Command):
    name = "resume"
    help = "continue an interrupted sweep from its checkpoints"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dir", help="experiment written by `dps-tune sweep`: a directory or a storage URI")
        add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.paths import is_remote
        from dps_tune.sweep import results

        if not is_remote(args.exp_dir):
            results.open_sweep(args.exp_dir)  # the cheap checks, before Ray and torch are imported
        check_address(args.address)
        from dps_tune.sweep import ray_tune

        job = ray_tune.load_resumable(args.exp_dir)  # checked before Ray starts
        try:
            exp_dir = ray_tune.resume_sweep(job, address=args.address, dashboard=not args.no_dashboard,
                                            shared_storage=args.shared_storage)
        finally:
            ray_tune.shutdown()
        status = print_sweep_summary(exp_dir, *scalar_objective(job.tune))
        if job.sweep.confirm is not None:  # a confirmation run, killed and resumed: its summary as `confirm` writes it
            finish_confirmation(exp_dir, list(job.sweep.confirm.selected))
        return status


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


# ----------------------------------------------------------------------------- demo


class Pretrain(Command):
    name = "pretrain"
    help = ("build (once, cached) the tiny CLIP pretrained on the synthetic world (pretrained: synthetic) "
            "and print its zero-shot accuracy")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny-rn", choices=["tiny-rn", "tiny-vit"],
                       help="architecture: tiny-rn (the demo's) or tiny-vit")
        p.add_argument("--world", default="wild", choices=list(SYNTHETIC_WORLDS),
                       help="the synthetic world whose pretraining to build: wild (pretrained: synthetic) or "
                            "eroding (pretrained: synthetic-eroding)")
        p.add_argument("--force", action="store_true", help="rebuild even if the cached weights exist")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import SyntheticConfig
        from dps_tune.demo import pretrain

        start = time.perf_counter()
        tag = pretrain.tag_for(args.world)
        path = pretrain.ensure_pretrained(args.model, tag=tag, force=args.force)
        print(f"pretrained {args.model} ({tag}): {path}  ({time.perf_counter() - start:.1f} s)")
        metrics = pretrain.zero_shot_report(args.model, tag, SyntheticConfig(world=args.world))
        print(f"zero-shot on the {args.world} synthetic world (10 classes, chance 0.100):")
        for split in ("id_val", "id_test", "ood_val", "ood_test"):
            print(f"  {split:<9} acc {metrics[f'{split}_acc']:.3f}   macro-F1 {metrics[f'{split}_f1']:.3f}")
        return 0


class Demo(Command):
    name = "demo"
    help = "the whole study on the synthetic world: zero-shot, CE, DPS and FLYP sweeps, report"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="output directory (default: runs/demo-TIME)")
        add_set_option(p, help="override a value in every stage (e.g. tune.num_samples=4)")
        p.add_argument("--world", default="wild", choices=list(SYNTHETIC_WORLDS),
                       help="wild: iWildCam's regime (fine-tuning helps ID and OOD); eroding: zero-shot is robust "
                            "and fine-tuning erodes it (sets data.synthetic.world and pretrained)")
        p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")

    def run(self, args: argparse.Namespace) -> int:
        if args.out:
            check_out_dir("--out", args.out)
        from dps_tune.demo import study

        return study.main(args.out, overrides=study.world_overrides(args.world) + list(args.set or []),
                          dashboard=not args.no_dashboard)


COMMANDS: tuple[Command, ...] = (Train(), Rank(), Prepare(), SweepCommand(), Resume(), Results(), Best(), Report(),
                                 Wise(), Soup(), Confirm(), DashboardCommand(), Pretrain(), Demo())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dps-tune",
                    description="Robust fine-tuning of CLIP (CE, FLYP, DPS), swept with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages from all libraries")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    _setup_logging(args.verbose)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"dps-tune: error: {' '.join(first_line(exc, 2000).split())}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(interrupted_block(exc), file=sys.stderr)
        return 130
    except OSError as exc:
        from dps_tune.files import disk_full, space_left

        if not disk_full(exc):
            raise
        where = exc.filename or "the output"
        print(f"dps-tune: error: the disk is full writing {where} ({space_left(where)}); nothing half-written is "
              "kept: make room, then run the same command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(rerun_block(args.command, list(sys.argv[1:] if argv is None else argv)), file=sys.stderr)
        return 130


# Commands whose finished work survives a Ctrl-C and that the same command line continues.
RERUN_CONTINUES = ("wise", "soup", "prepare")


def rerun_block(command: str, argv: list[str]) -> str:
    """What a Ctrl-C'd command prints: for one that keeps its finished work, the command that continues it."""
    import shlex

    from dps_tune.paths import command_path

    if command not in RERUN_CONTINUES:
        return "dps-tune: interrupted"
    return (f"\ndps-tune: {command} interrupted (Ctrl-C); what it finished is kept.\n"
            f"  continue it with: {command_path()} {shlex.join(argv)}")


def interrupted_block(exc: Interrupted) -> str:
    """What a Ctrl-C'd sweep or confirmation prints: where it stands and the command that continues it."""
    import shlex

    from dps_tune.paths import command_path

    return (f"\ndps-tune: {exc.what} interrupted (Ctrl-C): {exc.finished} trial(s) finished, {exc.to_go} to go; "
            f"its state is saved.\n  continue it with: {command_path()} resume {shlex.quote(exc.location)}")


if __name__ == "__main__":
    sys.exit(main())
