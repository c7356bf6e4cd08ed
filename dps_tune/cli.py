"""The ``dps-tune`` command line: one small class per command, its arguments next to its action.

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

from dps_tune.config import scalar_objective
from dps_tune.errors import UserError, first_line

logger = logging.getLogger("dps_tune")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("dps_tune").setLevel(logging.INFO)


def add_set_option(parser: argparse.ArgumentParser, help: str = "override a config value; dotted keys "
                   "(optim.lr) or unique leaf names (lr); tune.* keys set the tune: block") -> None:
    """The ``--set KEY=VALUE`` option, repeatable, shared by every command that reads a config."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


class Command:
    """A subcommand: :meth:`add_arguments` declares its options, :meth:`run` is its action."""

    name = ""
    help = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


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
        from dps_tune import preflight
        from dps_tune.config import load_config, save_json
        from dps_tune.sweep import reference
        from dps_tune.train import run_trial

        cfg = load_config(args.config, args.set)
        preflight.check_config(cfg)
        if args.resume is not None and not (Path(args.resume) / "train_state.pt").is_file():
            raise UserError(f"--resume {args.resume}: not a checkpoint directory with a training state "
                            "(train_state.pt)")
        resolved = reference.resolve(cfg)
        cfg = resolved.config
        out = Path(args.out or f"runs/train-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True, exist_ok=True)
        save_json(cfg, out / "config.json")
        final = out / "checkpoint"

        with (out / "metrics.jsonl").open("a") as metrics_log:
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
        p.add_argument("--seed", type=int, default=0, help="the trial seed (only matters for --pretrained none)")
        p.add_argument("--out", required=True, help="output file (torch.load(weights_only=True) compatible)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune import models, preflight, suppression

        preflight.check_model(args.model, args.pretrained, key="--model", pretrained_key="--pretrained")
        preflight.check_weights("--reference", args.reference)
        if not 0 <= args.masking < 1:
            raise UserError(f"--masking {args.masking}: must be in [0, 1)")
        theta1 = models.load_weights_file(args.reference)
        theta0 = models.pretrained_state_dict(args.model, args.pretrained, seed=args.seed)
        start = time.perf_counter()
        scores = suppression.rank_scores(theta0, theta1)
        seconds = time.perf_counter() - start
        suppression.save_ranking(args.out, scores, model=args.model, pretrained=str(args.pretrained),
                                 reference=str(args.reference))
        rows = suppression.summarize(suppression.select_rows(scores, args.masking, "top"))
        width = max(len(n) for n, _, _ in rows) if rows else 10
        print(f"{'tensor':<{width}}  suppressed / ranked")
        for name, k, n in rows:
            print(f"{name:<{width}}  {k:>10} / {n:<8} {100.0 * k / max(n, 1):5.1f}%")
        total_k, total_n = sum(k for _, k, _ in rows), sum(n for _, _, n in rows)
        print(f"{'total':<{width}}  {total_k:>10} / {total_n:<8} {100.0 * total_k / max(total_n, 1):5.1f}%"
              f"  (masking {args.masking}, ranked in {seconds:.3f} s)")
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
        from dps_tune import preflight
        from dps_tune.config import load_config
        from dps_tune.data import cache_writer
        from dps_tune.data.datasets import load_dataset

        cfg = load_config(args.config, args.set)
        target = args.out or cfg.data.image_cache
        if target is None:
            raise UserError(f"{args.config}: data.image_cache is not set; pass --out DIR to say where the cache goes")
        if args.size < 1:
            raise UserError(f"--size {args.size}: must be >= 1")
        if args.workers is not None and args.workers < 0:
            raise UserError(f"--workers {args.workers}: must be >= 0")
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


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster: auto or ray://HOST:10001 (default: $RAY_ADDRESS, else start "
                                     "a local Ray)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the experiment's storage is a path every node mounts (NFS); required for a local path "
                        "on a multi-node cluster")


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
        _add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.sweep.search_space import load_sweep

        post = [x.strip() for x in args.post.split(",") if x.strip()]
        unknown = [x for x in post if x not in ("wise", "soup")]
        if unknown:
            raise UserError(f"--post {args.post}: {unknown[0]!r} is not one of wise, soup")
        overrides = list(args.set)
        if args.num_samples is not None:
            overrides.append(f"tune.num_samples={args.num_samples}")
        sweep = load_sweep(args.space, overrides)  # every check runs before Ray starts
        if post:
            from dps_tune.config import objectives
            from dps_tune.paths import is_remote

            post_metric = objectives(sweep.tune)[0][0]  # with several objectives, the first selects
            if args.storage and is_remote(args.storage):
                raise UserError(f"--post {args.post}: needs a local --storage (the ensembles read the weights)")
        from dps_tune.sweep import ray_tune

        try:
            exp_dir = ray_tune.run_sweep(sweep, address=args.address, storage_path=args.storage, name=args.name,
                                         dashboard=not args.no_dashboard, shared_storage=args.shared_storage)
            status = _print_sweep_summary(exp_dir, *scalar_objective(sweep.tune))
            if post:
                _post_ensembles(exp_dir, post, post_metric, args)
        finally:
            ray_tune.shutdown()
        return status


class Resume(Command):
    name = "resume"
    help = "continue an interrupted sweep from its checkpoints"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dir", help="experiment written by `dps-tune sweep`: a directory or a storage URI")
        _add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.sweep import ray_tune

        job = ray_tune.load_resumable(args.exp_dir)  # checked before Ray starts
        try:
            exp_dir = ray_tune.resume_sweep(job, address=args.address, dashboard=not args.no_dashboard,
                                            shared_storage=args.shared_storage)
        finally:
            ray_tune.shutdown()
        return _print_sweep_summary(exp_dir, *scalar_objective(job.tune))


def _print_sweep_summary(exp_dir: str, metric: str, mode: str) -> int:
    from dps_tune.paths import command_path, tensorboard_hint
    from dps_tune.sweep import results, storage

    table = results.results_table(storage.local_view(exp_dir), metric, mode)
    cmd = command_path()
    print()
    print(_format_table(table.head(20)))
    errored = table[table["status"] == "error"]
    print(f"\nexperiment: {exp_dir}")
    print(f"  {cmd} results {exp_dir}")
    print(f"  {cmd} best {exp_dir} --export best")
    print(f"  {tensorboard_hint(exp_dir)}")
    if len(errored):
        print(f"dps-tune: {len(errored)} trial(s) failed after their retries: "
              f"{', '.join(errored['trial_id'])} (see error.txt in their directories)", file=sys.stderr)
        return 1
    return 0


def _format_table(df) -> str:
    if df.empty:
        return "(no trials)"
    show = df.copy()
    for col in show.columns:
        if show[col].dtype.kind == "f":
            show[col] = show[col].map(lambda v: "" if v != v else f"{v:.4g}")
        else:
            show[col] = show[col].map(lambda v: "" if v is None else v)
    return show.to_string(index=False)


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
        from dps_tune.config import DEFAULT_METRIC, default_mode, scalar_objective
        from dps_tune.sweep import results, storage

        if args.resamples < 100:
            raise UserError(f"--resamples {args.resamples}: at least 100 are needed for a 95% interval")
        exp = storage.local_view(args.exp_dir)
        if args.pareto:
            metrics, modes = results.pareto_objectives(exp)
            table = results.pareto_table(exp, metrics, modes)
            print(f"non-dominated trials on {', '.join(f'{m} ({d})' for m, d in zip(metrics, modes))}:")
        elif args.bootstrap:
            tune_meta = results.sweep_meta(exp).get("tune")
            metric, mode = (args.metric, args.mode) if args.metric else (
                scalar_objective(tune_meta) if tune_meta else (DEFAULT_METRIC, None))
            mode = mode or default_mode(metric)
            table = results.bootstrap_table(exp, metric, mode, resamples=args.resamples)
            print(f"each trial's kept checkpoint best on {metric} ({mode}); 95% bootstrap intervals, "
                  f"{args.resamples} resamples:")
        else:
            table = results.results_table(exp, args.metric, args.mode)
        print(_format_table(table))
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
        from dps_tune import checkpoint
        from dps_tune.config import DEFAULT_METRIC, check_selection_metric, default_mode
        from dps_tune.sweep import results, storage

        if args.metric is not None:
            check_selection_metric("--metric", args.metric)
        exp = storage.local_view(args.exp_dir)
        meta = results.sweep_meta(exp).get("tune")
        own_metric, own_mode = scalar_objective(meta) if meta else (DEFAULT_METRIC, None)
        metric = args.metric or own_metric
        mode = args.mode or (own_mode if not args.metric else None) or default_mode(metric)
        path = results.best_checkpoint(exp, metric, mode, args.scope)
        metrics = json.loads((path / checkpoint.METRICS_FILE).read_text())
        print(f"best by {metric} ({mode}, scope {args.scope}): {storage.source(path)}")
        print("  " + "  ".join(f"{k}={metrics[k]:.4f}" for k in sorted(metrics) if k.endswith(("_acc", "_f1"))))
        if args.export:
            out = checkpoint.export(storage.fetch_weights(path), args.export)
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
        from dps_tune.sweep import report, storage

        exps = [storage.local_view(e) for e in args.exp_dirs]
        zero_shot = args.zero_shot or report.find_zero_shot(exps)
        if zero_shot is not None and not args.zero_shot:
            print(f"zero-shot metrics: {zero_shot}", file=sys.stderr)
        out = report.render_report(exps, args.out, zero_shot=zero_shot, x_metric=args.x_metric,
                                   y_metric=args.y_metric)
        print(f"report written to {out}")
        return 0


# ------------------------------------------------------------------------ ensembles


def _add_ensemble_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="finished experiments of `dps-tune sweep`")
    p.add_argument("--select", default="id_val_f1",
                   help="validation metric that ranks checkpoints and chooses (never a test split); default id_val_f1")
    p.add_argument("--out", help=f"output directory (default: {what} next to the first EXP_DIR); a killed run "
                                 "given the same --out redoes no finished evaluation")
    p.add_argument("--address", help="Ray cluster to evaluate on: auto or ray://HOST:10001 (default: $RAY_ADDRESS, "
                                     "else a local Ray)")
    p.add_argument("--in-process", action="store_true",
                   help="evaluate one after another in this process instead of as Ray tasks")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _ensemble_mapper(args: argparse.Namespace):
    from dps_tune.sweep import ensembles

    if args.in_process:
        return ensembles.map_in_process
    from dps_tune.sweep import ray_tune

    return lambda jobs: ray_tune.map_jobs(ensembles.evaluate_job, jobs, address=args.address)


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


def _default_out(args: argparse.Namespace, name: str) -> Path:
    from dps_tune.paths import is_remote

    if args.out:
        return Path(args.out)
    first = args.exp_dirs[0]
    return Path("runs") / name if is_remote(first) else Path(first).resolve().parent / name


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    head = f"{'':<24}" + "".join(f"{c:>13}" for c in columns)
    print(head)
    for r in rows:
        print(f"{r['label']:<24}" + "".join(f"{r[c]:>13.4f}" if isinstance(r.get(c), float) else f"{'':>13}"
                                             for c in columns))


def _post_ensembles(exp_dir: str, post: list[str], metric: str, args: argparse.Namespace) -> None:
    """``sweep --post wise,soup``: the ensembles of the sweep just run, on its Ray."""
    from dps_tune.sweep import ensembles, ray_tune

    def mapper(jobs):
        return ray_tune.map_jobs(ensembles.evaluate_job, jobs, address=args.address)

    exp = Path(exp_dir)
    if "wise" in post:
        out = exp.with_name(exp.name + "-wise")
        summary = ensembles.run_wise([exp], out, alphas=ensembles.parse_alphas("0:1:0.1"), select=metric,
                                     mapper=mapper)
        for method, rec in summary["methods"].items():
            print(f"WiSE-FT {method}: alpha {rec['alpha']:g}, ood_test_acc {rec['metrics'].get('ood_test_acc', 0):.4f}"
                  f" (fine-tuned {rec['fine_tuned'].get('ood_test_acc', 0):.4f}) -> {rec['export']}")
    if "soup" in post:
        out = exp.with_name(exp.name + "-soup")
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
        from dps_tune.config import check_selection_metric
        from dps_tune.sweep import ensembles

        check_selection_metric("--select", args.select)
        alphas = ensembles.parse_alphas(args.alphas)
        if args.top_k < 1:
            raise UserError(f"--top-k {args.top_k}: must be >= 1")
        out = _default_out(args, "wise")
        ensembles.check_candidates(args.exp_dirs, args.select)  # every input check before any work
        bar, update = _progress_bar(args, "wise")
        start = time.perf_counter()
        try:
            summary = ensembles.run_wise(args.exp_dirs, out, alphas=alphas, top_k=args.top_k, select=args.select,
                                         mapper=_ensemble_mapper(args), progress=update)
        finally:
            if bar is not None:
                bar.close()
            _shutdown_ray()
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
        from dps_tune.config import check_selection_metric
        from dps_tune.sweep import ensembles

        check_selection_metric("--select", args.select)
        out = _default_out(args, "soup")
        ensembles.check_candidates(args.exp_dirs, args.select, include_stopped=args.include_stopped,
                                   method=args.method)
        bar, update = _progress_bar(args, "soup")
        try:
            summary = ensembles.run_soup(args.exp_dirs, out, method=args.method, greedy=args.greedy,
                                         select=args.select, include_stopped=args.include_stopped,
                                         mix_methods=args.mix_methods, mapper=_ensemble_mapper(args), progress=update)
        finally:
            if bar is not None:
                bar.close()
            _shutdown_ray()
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
    help = "retrain each method's selected configuration with N fresh seeds; mean, 95%% intervals, paired differences"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="finished experiments of `dps-tune sweep`")
        p.add_argument("--seeds", type=int, default=3, help="seeds per method, at least 2 (default 3): 1..N")
        p.add_argument("--select", default="id_val_f1",
                       help="validation metric that selects each method's configuration (default id_val_f1)")
        p.add_argument("--storage", help="where the confirmation experiment goes (default: beside the first EXP_DIR)")
        p.add_argument("--name", help="its name (default: confirm-TIME)")
        add_set_option(p, help="override a value of every selected configuration (epochs=..., say); "
                               "tune.* keys set the run's resources")
        _add_cluster_options(p)

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.config import (check_selection_metric, parse_override, resolve_key, tune_config_from_dict,
                                     validate_tune, with_overrides)
        from dps_tune.paths import is_remote
        from dps_tune.sweep import confirm, reference, results, storage

        if args.seeds < 2:
            raise UserError(f"--seeds {args.seeds}: at least 2 seeds are needed for an interval")
        check_selection_metric("--select", args.select)
        pairs = [parse_override(o) for o in args.set]
        tune_over = {k[len("tune."):]: v for k, v in pairs if k.startswith("tune.")}
        cfg_over = {resolve_key(k): v for k, v in pairs if not k.startswith("tune.")}
        variants = confirm.select_variants(args.exp_dirs, args.select)
        configs = [with_overrides(v.config, cfg_over) for v in variants]
        first_meta = results.sweep_meta(storage.local_view(args.exp_dirs[0]))
        tune_raw = {**first_meta.get("tune", {}), "metric": args.select, "mode": "max", "asha_metric": "",
                    "keep_checkpoints": 1, "max_t": 0, **tune_over}
        tune_cfg = tune_config_from_dict(tune_raw)
        for c in configs:
            validate_tune(tune_cfg, c)
        dps_refs = {c.dps.reference for c in configs if c.algorithm == "dps"}
        if len(dps_refs) > 1:
            raise UserError(f"the DPS configurations use different references ({', '.join(sorted(dps_refs))}); "
                            "confirm one DPS stage at a time")
        ranking = None
        for c in configs:
            if c.algorithm == "dps":
                ranking = reference.resolve(c).ranking
                break
        seeds = list(range(1, args.seeds + 1))
        base = configs[0]
        overrides = [confirm.overrides(base, c) for c in configs]
        first = args.exp_dirs[0]
        storage_path = args.storage or (str(Path(first).resolve().parent) if not is_remote(first) else None)
        name = args.name or f"confirm-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"confirming {len(configs)} configurations x {len(seeds)} seeds (selected on {args.select}):")
        for v in variants:
            print(f"  {v.method:<14} trial {v.trial}  {args.select}={v.value:.4f}  {v.checkpoint}")
        from dps_tune.sweep import ray_tune

        try:
            exp = ray_tune.run_points(base, overrides, seeds, tune_cfg, ranking=ranking, name=name,
                                      storage_path=storage_path, address=args.address,
                                      dashboard=not args.no_dashboard, shared_storage=args.shared_storage,
                                      meta={"confirm": {"select": args.select, "seeds": seeds,
                                                        "experiments": [str(e) for e in args.exp_dirs]}})
        finally:
            ray_tune.shutdown()
        view = storage.local_view(exp)
        summary = confirm.summarize(view)
        if not is_remote(exp):
            confirm.write_summary(view, summary, variants)
        print()
        print(confirm.format_summary(summary))
        print(f"\nexperiment: {exp}  (confirm.json, confirm.csv; `dps-tune results {exp}`)")
        return 0


class DashboardCommand(Command):
    name = "dashboard"
    help = "a live dashboard of sweeps: optuna-dashboard per experiment and the report, behind a token"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="sweep directories (running or finished)")
        p.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; see the README's SSH tunnel)")
        p.add_argument("--port", type=int, default=8788, help="port (default 8788; 0: any free port)")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.sweep import dashboard

        if not 0 <= args.port <= 65535:
            raise UserError(f"--port {args.port}: must be between 0 and 65535")
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"dashboard: listening on {args.host}, not only this machine: anyone who reaches it and has the "
                  "token sees these sweeps", file=sys.stderr)

        def ready(url: str) -> None:
            print(f"dashboard: {url}", flush=True)
            print("(the token is needed once per browser; Ctrl-C stops the server)", file=sys.stderr, flush=True)

        try:
            dashboard.serve(args.exp_dirs, host=args.host, port=args.port, ready=ready)
        except KeyboardInterrupt:
            pass
        return 0


def _shutdown_ray() -> None:
    if "dps_tune.sweep.ray_tune" in sys.modules:
        sys.modules["dps_tune.sweep.ray_tune"].shutdown()


# ----------------------------------------------------------------------------- demo


class Pretrain(Command):
    name = "pretrain"
    help = ("build (once, cached) the tiny CLIP pretrained on the synthetic world (pretrained: synthetic) "
            "and print its zero-shot accuracy")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny-rn", help="architecture: tiny-rn (the demo's) or tiny-vit")
        p.add_argument("--force", action="store_true", help="rebuild even if the cached weights exist")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.demo import pretrain

        start = time.perf_counter()
        path = pretrain.ensure_pretrained(args.model, force=args.force)
        print(f"pretrained {args.model} ({pretrain.TAG}): {path}  ({time.perf_counter() - start:.1f} s)")
        metrics = pretrain.zero_shot_report(args.model)
        print("zero-shot on the default synthetic world (10 classes, chance 0.100):")
        for split in ("id_val", "id_test", "ood_val", "ood_test"):
            print(f"  {split:<9} acc {metrics[f'{split}_acc']:.3f}   macro-F1 {metrics[f'{split}_f1']:.3f}")
        return 0


class Demo(Command):
    name = "demo"
    help = "the whole study on the synthetic world: zero-shot, CE, DPS and FLYP sweeps, report"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", help="output directory (default: runs/demo-TIME)")
        add_set_option(p, help="override a value in every stage (e.g. tune.num_samples=4)")
        p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")

    def run(self, args: argparse.Namespace) -> int:
        from dps_tune.demo import study

        return study.main(args.out, overrides=args.set, dashboard=not args.no_dashboard)


COMMANDS: tuple[Command, ...] = (Train(), Rank(), Prepare(), SweepCommand(), Resume(), Results(), Best(), Report(),
                                 Wise(), Soup(), Confirm(), DashboardCommand(), Pretrain(), Demo())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dps-tune",
                                     description="Robust fine-tuning of CLIP (CE, FLYP, DPS), swept with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages from all libraries")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"dps-tune: error: {' '.join(first_line(exc, 2000).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dps-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
