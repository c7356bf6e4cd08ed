"""The commands that run sweeps: ``sweep``, ``resume`` and ``demo`` (the whole study on the synthetic world)."""

from __future__ import annotations

import argparse

from dps_tune.cli.base import (Command, add_cluster_options, add_set_option, check_address, check_name, check_out_dir,
                               print_sweep_summary)
from dps_tune.cli.ensembling import finish_confirmation, post_ensembles
from dps_tune.config import SYNTHETIC_WORLDS
from dps_tune.errors import UserError
from dps_tune.objectives import scalar_objective


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
