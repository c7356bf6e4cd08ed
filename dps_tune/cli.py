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
    theta0 = models.pretrained_state_dict(args.model, args.pretrained)
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


def cmd_demo(args: argparse.Namespace) -> int:
    """One CE trial on the synthetic world (the full study arrives with the sweep service)."""
    root = Path(__file__).resolve().parents[1]
    config = root / "search_spaces" / "demo.yaml"
    ns = argparse.Namespace(config=str(config), set=[], out=args.out, resume=None, no_progress=False)
    return cmd_train(ns)


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dps-tune", description=__doc__.splitlines()[0])
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
    p.add_argument("--out", required=True, help="output file (torch.load(weights_only=True) compatible)")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("demo", help="run the embedded demo on the synthetic world")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
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
