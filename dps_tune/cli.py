"""The ``dps-tune`` command line.

Every subcommand validates its input first; a :class:`~dps_tune.errors.UserError`
ends the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from dps_tune.errors import UserError

logger = logging.getLogger("dps_tune")


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # raised in a DataLoader worker: the cause is the last line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("dps_tune").setLevel(logging.INFO)


# ----------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from dps_tune.config import load_config, save_json
    from dps_tune.train import run_trial

    cfg = load_config(args.config, args.set)
    out = Path(args.out or f"runs/train-{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_json(cfg, out / "config.json")
    metrics_log = (out / "metrics.jsonl").open("a")
    final = out / "checkpoint"

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        line = json.dumps(metrics)
        print(line, flush=True)
        metrics_log.write(line + "\n")
        metrics_log.flush()
        if checkpoint_dir is not None:
            # Keep only the newest checkpoint; a crash in between leaves .incoming intact.
            incoming = out / ".checkpoint.incoming"
            shutil.rmtree(incoming, ignore_errors=True)
            os.replace(checkpoint_dir, incoming)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(incoming, final)

    try:
        run_trial(cfg, report, resume_from=args.resume, work_dir=out / ".work", progress=not args.no_progress)
    finally:
        metrics_log.close()
        shutil.rmtree(out / ".work", ignore_errors=True)
    print(f"checkpoint: {final}", file=sys.stderr)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from dps_tune import models, suppression

    if args.model not in models.list_architectures():
        raise UserError(f"--model {args.model!r}: not an open_clip architecture")
    if not 0 <= args.masking < 1:
        raise UserError(f"--masking {args.masking}: must be in [0, 1)")
    theta0 = models.pretrained_state_dict(args.model, args.pretrained, seed=args.seed)
    theta1 = models.load_weights_file(args.reference)
    start = time.perf_counter()
    scores = suppression.rank_scores(theta0, theta1)
    seconds = time.perf_counter() - start
    suppression.save_ranking(args.out, scores, model=args.model, pretrained=str(args.pretrained),
                             reference=str(args.reference))
    masks = suppression.select_rows(scores, args.masking, "top")
    rows = suppression.summarize(masks)
    width = max(len(n) for n, _, _ in rows) if rows else 10
    print(f"{'tensor':<{width}}  suppressed / ranked")
    for name, k, n in rows:
        print(f"{name:<{width}}  {k:>10} / {n:<8} {100.0 * k / max(n, 1):5.1f}%")
    total_k, total_n = sum(k for _, k, _ in rows), sum(n for _, _, n in rows)
    print(f"{'total':<{width}}  {total_k:>10} / {total_n:<8} {100.0 * total_k / max(total_n, 1):5.1f}%"
          f"  (masking {args.masking}, ranked in {seconds:.3f} s)")
    print(f"ranking written to {args.out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from dps_tune import image_cache
    from dps_tune.config import load_file, validate_paths, with_overrides
    from dps_tune.data import load_dataset

    cfg = load_file(args.config, args.set, check_paths=False).config
    target = args.out or cfg.data.image_cache
    if target is None:
        raise UserError(f"{args.config}: data.image_cache is not set; pass --out DIR to say where the cache goes")
    if args.size < 1:
        raise UserError(f"--size {args.size}: must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0")
    # The cache directory need not exist yet; every other path the config names must.
    validate_paths(with_overrides(cfg, {"data.image_cache": None}, check_paths=False))
    out = Path(target).expanduser().resolve()
    result = image_cache.prepare(load_dataset(cfg.data), out, size=args.size, workers=args.workers,
                                 skip_bad=args.skip_bad, verify=args.verify, progress=not args.no_progress)
    print(f"image cache: {result.path}")
    print(f"  {result.images} images ({result.decoded} decoded now, {result.reused} from an earlier run), "
          f"{len(result.skipped)} skipped, {args.size} px squares, {result.shards} shard(s), "
          f"{result.nbytes / 2**20:.1f} MiB, content {result.content_hash[:12]}")
    for path, why in result.skipped[:10]:
        print(f"  skipped {path}: {why}")
    if len(result.skipped) > 10:
        print(f"  ... and {len(result.skipped) - 10} more (listed in {result.path / image_cache.MANIFEST})")
    if cfg.data.image_cache is not None and Path(cfg.data.image_cache).resolve() == out:
        print(f"trials of {args.config} read from it (data.image_cache)")
    else:
        print(f"to train from it, set `data.image_cache: {out}` in {args.config}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dps_tune.search_space import load_sweep

    overrides = list(args.set)
    if args.num_samples is not None:
        overrides.append(f"tune.num_samples={args.num_samples}")
    sweep = load_sweep(args.space, overrides)  # every check runs before Ray starts
    from dps_tune import tuning

    try:
        exp_dir = tuning.run_sweep(sweep, address=args.address, storage=args.storage, name=args.name,
                                   dashboard=not args.no_dashboard, shared_storage=args.shared_storage)
    finally:
        tuning.shutdown()
    return _print_sweep_summary(exp_dir, sweep.tune.metric, sweep.tune.mode)


def cmd_resume(args: argparse.Namespace) -> int:
    from dps_tune import results, tuning

    try:
        exp_dir = tuning.resume_sweep(args.exp_dir, address=args.address, dashboard=not args.no_dashboard)
    finally:
        tuning.shutdown()
    tune_meta = results.sweep_meta(exp_dir).get("tune", {})
    return _print_sweep_summary(exp_dir, tune_meta.get("metric", "id_val_f1"), tune_meta.get("mode", "max"))


def _print_sweep_summary(exp_dir: Path | None, metric: str, mode: str) -> int:
    from dps_tune import results

    if exp_dir is None:
        print("sweep finished (remote storage: inspect it with the Ray tools)")
        return 0
    table = results.results_table(exp_dir, metric, mode)
    print()
    print(_format_table(table.head(20)))
    errored = table[table["status"] == "error"]
    print(f"\nexperiment: {exp_dir}")
    print(f"  dps-tune results {exp_dir}")
    print(f"  dps-tune best {exp_dir} --export {exp_dir}/best")
    print(f"  tensorboard --logdir {exp_dir}")
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


def cmd_results(args: argparse.Namespace) -> int:
    from dps_tune import results

    table = results.results_table(args.exp_dir, args.metric, args.mode)
    print(_format_table(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"written to {args.csv}", file=sys.stderr)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    from dps_tune import checkpoint, results

    meta = results.sweep_meta(args.exp_dir).get("tune", {})
    metric = args.metric or meta.get("metric", "id_val_f1")
    mode = args.mode or (meta.get("mode") if not args.metric else None) or results.default_mode(metric)
    path = results.best_checkpoint(args.exp_dir, metric, mode, args.scope)
    metrics = checkpoint.load_checkpoint(path, with_state=False).metrics
    print(f"best by {metric} ({mode}, scope {args.scope}): {path}")
    print("  " + "  ".join(f"{k}={metrics[k]:.4f}" for k in sorted(metrics) if k.endswith(("_acc", "_f1"))))
    if args.export:
        out = checkpoint.export(path, args.export)
        print(f"exported model.safetensors, config.json, metrics.json to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dps_tune import report

    zero_shot = args.zero_shot or report.find_zero_shot(args.exp_dirs)
    if zero_shot is not None and not args.zero_shot:
        print(f"zero-shot metrics: {zero_shot}", file=sys.stderr)
    out = report.render_report(args.exp_dirs, args.out, zero_shot=zero_shot, x_metric=args.x_metric,
                               y_metric=args.y_metric)
    print(f"report written to {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dps_tune import pretrain

    start = time.perf_counter()
    path = pretrain.ensure_pretrained(args.model, force=args.force)
    print(f"pretrained {args.model} ({pretrain.TAG}): {path}  ({time.perf_counter() - start:.1f} s)")
    metrics = pretrain.zero_shot_report(args.model)
    print("zero-shot on the default synthetic world (10 classes, chance 0.100):")
    for split in ("id_val", "id_test", "ood_val", "ood_test"):
        print(f"  {split:<9} acc {metrics[f'{split}_acc']:.3f}   macro-F1 {metrics[f'{split}_f1']:.3f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dps_tune import demo

    return demo.main(args.out, overrides=args.set, dashboard=not args.no_dashboard)


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dps-tune", description="Robust fine-tuning of CLIP (CE, FLYP, DPS), swept with Ray Tune.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages from all libraries")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the base config of a config file as one trial")
    p.add_argument("config", help="YAML config file (search: and tune: blocks are ignored)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value; dotted keys (optim.lr) or unique leaf names (lr)")
    p.add_argument("--out", help="output directory (default: runs/train-ALGORITHM-TIME)")
    p.add_argument("--resume", help="checkpoint directory to continue from")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("rank", help="compute the DPS ranking of a pretrained/reference pair")
    p.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-B-16")
    p.add_argument("--pretrained", required=True, help="pretrained tag, weights file, or none")
    p.add_argument("--reference", required=True, help="CE fine-tuned checkpoint directory or weights file")
    p.add_argument("--masking", type=float, default=0.9, help="fraction of ranked rows to suppress in the summary")
    p.add_argument("--seed", type=int, default=0, help="the trial seed (only matters for --pretrained none)")
    p.add_argument("--out", required=True, help="output file (torch.load(weights_only=True) compatible)")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("prepare", help="decode every image a config uses once into a shared uint8 cache")
    p.add_argument("config", help="YAML config file: its dataset, training and evaluation splits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value; dotted keys (optim.lr) or unique leaf names (lr)")
    p.add_argument("--out", help="cache directory (default: the config's data.image_cache)")
    p.add_argument("--size", type=int, default=256,
                   help="side of the stored squares: shorter side resized to this, centre-cropped (default: 256)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: every usable CPU; 0 decodes in this process)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed and counted in the manifest) instead of stopping")
    p.add_argument("--verify", action="store_true", help="re-hash finished shards and rebuild any that changed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("sweep", help="launch a Ray Tune sweep (Optuna + ASHA) from a search-space file")
    p.add_argument("space", help="YAML file: base config, search: and tune: blocks")
    p.add_argument("--address", help="Ray cluster: auto or ray://HOST:10001 (default: start a local Ray)")
    p.add_argument("--storage", help="experiment storage: a path (default ./runs) or a URI (s3://, gs://)")
    p.add_argument("--name", help="experiment name (default: SPACE-TIME)")
    p.add_argument("--num-samples", type=int, help="override tune.num_samples")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config or tune value")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")
    p.add_argument("--shared-storage", action="store_true",
                   help="--storage is a path every node mounts (NFS); required for a local path on a multi-node cluster")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", help="continue an interrupted sweep from its checkpoints")
    p.add_argument("exp_dir", help="experiment directory written by `dps-tune sweep`")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--no-dashboard", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("results", help="one row per trial: parameters, epochs, status, ID and OOD metrics")
    p.add_argument("exp_dir")
    p.add_argument("--metric", help="sort by this metric (default: the sweep's tune.metric)")
    p.add_argument("--mode", choices=["max", "min"], help="sort order (default: the sweep's tune.mode)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("best", help="find, and optionally export, the best checkpoint of an experiment")
    p.add_argument("exp_dir")
    p.add_argument("--metric", help="default: the sweep's tune.metric")
    p.add_argument("--mode", choices=["max", "min"])
    p.add_argument("--scope", choices=["all", "last"], default="all",
                   help="all: best over every kept checkpoint; last: best by each trial's last result")
    p.add_argument("--export", metavar="DIR", help="write model.safetensors, config.json, metrics.json here")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("report", help="one self-contained HTML page of plots and tables for one or more sweeps")
    p.add_argument("exp_dirs", nargs="+", metavar="EXP_DIR", help="experiment directories of `dps-tune sweep`")
    p.add_argument("--out", required=True, help="HTML file to write (images are embedded)")
    p.add_argument("--zero-shot", metavar="FILE",
                   help="zero-shot metrics: a JSON file or a checkpoint directory "
                        "(default: zero_shot.json next to the first EXP_DIR that has one)")
    p.add_argument("--x-metric", default="id_test_acc", help="ID axis of the ID-vs-OOD plot (default: id_test_acc)")
    p.add_argument("--y-metric", default="ood_test_acc",
                   help="OOD axis of the ID-vs-OOD plot (default: ood_test_acc); the macro-F1 twin is also drawn")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("pretrain", help="build (once, cached) the tiny CLIP pretrained on the synthetic world "
                                        "(pretrained: synthetic) and print its zero-shot accuracy")
    p.add_argument("--model", default="tiny-rn", help="architecture: tiny-rn (the demo's) or tiny-vit")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached weights exist")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the whole study on the synthetic world: zero-shot, CE, DPS and FLYP sweeps, report")
    p.add_argument("--out", help="output directory (default: runs/demo-TIME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every stage (e.g. tune.num_samples=4)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"dps-tune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dps-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
