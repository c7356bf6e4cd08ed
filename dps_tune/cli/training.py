"""The commands that train one model or prepare for it: ``train``, ``rank``, ``prepare`` and ``pretrain``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from dps_tune.cli.base import Command, add_set_option, check_out_dir, check_out_file
from dps_tune.config import PAPER_EXCLUDE, QUOTAS, SYNTHETIC_WORLDS, check_choice, check_exclude, split_list
from dps_tune.errors import UserError
from dps_tune.layout import CONFIG_FILE, STATE_FILE


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


class Pretrain(Command):
    name = "pretrain"
    help = ("build (once, cached) the tiny CLIP pretrained on the synthetic world (pretrained: synthetic) "
            "and print its zero-shot accuracy")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="tiny-rn", choices=["tiny-rn", "tiny-vit"],
                       help="architecture: tiny-rn (the demo's) or tiny-vit")
        p.add_argument("--world", default="wild", choices=list(SYNTHETIC_WORLDS),
                       help="the synthetic world whose pretraining to build: wild (pretrained: synthetic) or "
                            "eroding (pretrained: synthetic_eroding)")
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
