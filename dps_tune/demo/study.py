"""``make demo``: a complete robust fine-tuning study on the synthetic world, on a laptop.

1. build (once, cached) the tiny CLIP pretrained on the synthetic world, and evaluate it zero-shot;
   decode the world's images once into an image cache that every trial reads;
2. a CE sweep (Optuna + ASHA) on the daylight (ID) domain;
3. a DPS sweep over masking × lr × wd whose reference is the CE sweep's best checkpoint,
   with a random-suppression control arm at the same ratios;
4. a FLYP sweep;
5. WiSE-FT of each method's best checkpoint, and a greedy soup of the CE checkpoints,
   evaluated as Ray tasks where there is a GPU, else in this process (see map_jobs);
6. a confirmation run: each method's selected configuration retrained with 3 fresh seeds;
7. a comparison table (the trial best on the selection metric for each method, with its
   ``id_test`` and ``ood_test`` figures, beside zero-shot, WiSE-FT and the soup), then the
   confirmed means with 95% t-intervals and the paired DPS(top) − DPS(random) difference,
   and ``report.html``.

All sweeps share one embedded Ray instance.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from dps_tune import models
from dps_tune.demo import findings, pretrain
from dps_tune.errors import UserError
from dps_tune.files import new_directory
from dps_tune.objectives import default_mode, objectives
from dps_tune.paths import command_path, tensorboard_hint
from dps_tune.sweep import candidates, confirm, ensembles, ray_tune, results
from dps_tune.sweep.report import render_report
from dps_tune.sweep.search_space import Sweep, load_sweep
from dps_tune.train import evaluate_start

logger = logging.getLogger(__name__)

# The demo's search spaces ship inside the package, so an installed dps_tune runs the
# demo from any directory; search_spaces/ at the top of the repository links to them.
SPACES = Path(__file__).resolve().with_name("spaces")
STAGES = (("ce", "demo.yaml"), ("dps", "demo_dps.yaml"), ("flyp", "demo_flyp.yaml"))
COLUMNS = ("id_val_acc", "id_test_acc", "id_test_f1", "ood_test_acc", "ood_test_f1")
# WiSE-FT's grid in the demo: five points keep the stage short on a laptop.
DEMO_ALPHAS = "0:1:0.25"
CONFIRM_SEEDS = (1, 2)  # `dps-tune confirm` defaults to 5; two keep the demo a laptop run
# The demo's confirmation leaves out the bottom-rows ablation to stay a laptop run;
# `dps-tune confirm` runs it too.
DEMO_SKIPS = ("dps (bottom)",)
STAGES_TOTAL = 7


def environment() -> dict[str, str]:
    """What the demo's figures depend on besides the code's inputs: versions, threads, device."""
    import platform

    import torch

    import dps_tune

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"dps_tune": dps_tune.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": str(torch.get_num_threads()), "device": device}


def world_overrides(world: str) -> list[str]:
    """The ``--set`` overrides that run the demo on ``world`` with the pretraining built for it."""
    return [f"data.synthetic.world={world}", f"pretrained={pretrain.tag_for(world)}"]


def split_sizes(cfg) -> dict[str, int]:
    """Images per evaluation split of ``cfg``'s dataset (the synthetic world is generated if needed)."""
    from dps_tune.data.datasets import load_dataset

    return {split: len(records) for split, records in load_dataset(cfg.data).splits.items()}


def world_header(cfg) -> str:
    """What the figures below rest on: the world, each split's size and locations, and the
    binomial standard error of an accuracy measured on it (at its worst, p = 0.5)."""
    from dps_tune.data import synthetic

    world = cfg.data.synthetic
    layout = synthetic.LAYOUTS[world.world]
    lines = [f"world: {world.world} ({world.classes} classes, chance {1 / world.classes:.3f}); "
             f"{world.classes * world.train_per_class:,} training images at "
             f"{len(layout.locations['train'])} locations"]
    for split, n in split_sizes(cfg).items():
        se = math.sqrt(0.25 / n)
        lines.append(f"  {split:<9} {n:>6,} images at {len(layout.locations[split]):>2} locations: "
                     f"an accuracy's binomial standard error is at most {se:.4f} ({1 / n:.4f} per image)")
    return "\n".join(lines)


def image_cache_overrides(cfg, overrides: list[str]) -> list[str]:
    """Decode the demo world's images once into an image cache (as `dps-tune prepare` does) and
    return the override that makes every trial read it, unless ``overrides`` name a cache already.

    A trial of the demo config then trains about twice as fast: reading the PNGs took 2.2 times as
    long as reading the cache over two epochs of 2,000 images on one core. The cache keeps each
    image at the world's size and the trial crops and resizes it, as it would the file."""
    from dps_tune.config import split_overrides
    from dps_tune.data import cache_writer, synthetic
    from dps_tune.data.datasets import load_dataset
    from dps_tune.paths import cache_dir

    if cfg.data.dataset != "synthetic" or "data.image_cache" in split_overrides(overrides)[0]:
        return []
    world = cfg.data.synthetic
    where = cache_dir() / "image_cache" / synthetic.world_key(world)
    cache_writer.prepare(load_dataset(cfg.data), where, size=world.image_size, progress=False)
    return [f"data.image_cache={where}"]


def _say(text: str) -> None:
    print(text, flush=True)


def _load_stage(space: str, reference: Path, overrides: list[str]) -> Sweep:
    extra = [f"dps.reference_experiment={reference}"] if space == "demo_dps.yaml" else []
    return load_sweep(SPACES / space, extra + overrides)


def comparison_rows(zero_shot: dict[str, float], exp_dirs: list[Path], metric: str,
                    wise: dict | None = None, soup: dict | None = None) -> list[dict]:
    rows = [{"method": "zero-shot", "trial": "-", **zero_shot}]
    for row in results.best_per_method(exp_dirs, metric, default_mode(metric)):
        rows.append(row)
        rec = (wise or {}).get("methods", {}).get(row["method"])
        if rec:
            rows.append({"method": f"  + wise a={rec['alpha']:g}", "trial": rec["trial"], **rec["metrics"]})
        rec = (soup or {}).get("soups", {}).get(row["method"])
        if rec:
            rows.append({"method": "  greedy soup", "trial": f"{len(rec['ingredients'])} of {rec['candidates']}",
                         **rec["metrics"]})
    return rows


def format_comparison(rows: list[dict]) -> str:
    head = f"{'method':<16} {'selected trial':<16} " + " ".join(f"{c:>12}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        trial = str(r.get("trial", "-"))
        vals = " ".join(f"{r[c]:>12.3f}" if c in r else f"{'':>12}" for c in COLUMNS)
        lines.append(f"{r['method']:<16} {trial:<16} {vals}")
    return "\n".join(lines)


def _ensembles(out: Path, exp_dirs: list[Path], metric: str) -> tuple[dict, dict]:
    """Stage 5: WiSE-FT for every method and a greedy CE soup, on the demo's Ray (or here: see map_jobs)."""
    start = time.time()

    def mapper(jobs):
        return ray_tune.map_jobs(ensembles.evaluate_job, jobs)

    _say(f"\n[5/{STAGES_TOTAL}] WiSE-FT (alphas {DEMO_ALPHAS}) of each method's best checkpoint, and a greedy CE soup")
    wise = ensembles.run_wise(exp_dirs, out / "wise", alphas=candidates.parse_alphas(DEMO_ALPHAS), top_k=1,
                              select=metric, mapper=mapper)
    soup = ensembles.run_soup([exp_dirs[0]], out / "soup", method="ce", select=metric, mapper=mapper)
    chosen = ", ".join(f"{m} a={r['alpha']:g}" for m, r in wise["methods"].items())
    ce = soup["soups"]["ce"]
    _say(f"      WiSE-FT chose {chosen}; the CE soup took {len(ce['ingredients'])} of {ce['candidates']} "
         f"checkpoints ({time.time() - start:.0f} s)")
    return wise, soup


def _confirm(out: Path, exp_dirs: list[Path], metric: str, overrides: list[str]) -> tuple[Path, dict]:
    """Stage 6: each method's selected configuration, and DPS's controls at its configuration, retrained with
    fresh seeds on the demo's Ray; zero-shot beside them. Of the demo's overrides only the trials' resources
    apply: the rest built the sweeps the configurations come from."""
    from dps_tune.config import split_overrides

    start = time.time()
    resources = {k: v for k, v in split_overrides(overrides)[1].items() if k in ("cpus_per_trial", "gpus_per_trial")}

    def announce(variants) -> None:
        _say(f"\n[6/{STAGES_TOTAL}] confirmation: {len(variants)} configurations "
             f"({', '.join(v.method for v in variants)}; the DPS controls at dps (top)'s configuration) x "
             f"{len(CONFIRM_SEEDS)} fresh seeds, full epochs, no early stopping")

    location, variants = confirm.run_confirmation(exp_dirs, metric, CONFIRM_SEEDS, name="confirm",
                                                  storage_path=str(out), tune_overrides=resources, skip=DEMO_SKIPS,
                                                  dashboard=False, announce=announce)
    summary = confirm.conclude(location, confirm.selected(variants))
    _say(f"      {len(variants) * len(CONFIRM_SEEDS)} trials in {time.time() - start:.0f} s")
    return Path(location), summary


def ce_wise_curve(wise_dir: Path) -> list[tuple[float, float, float]]:
    """CE's WiSE-FT curve, (alpha, id_test_acc, ood_test_acc) per alpha of the checkpoint ``wise`` chose."""
    summary = results.read_ensemble(wise_dir)
    chosen = summary["methods"]["ce"]["checkpoint"]
    return [(float(r["alpha"]), float(r["id_test_acc"]), float(r["ood_test_acc"])) for r in summary["rows"]
            if r["method"] == "ce" and r["checkpoint"] == chosen]


# WiSE-FT's default mix. The WiSE-FT paper finds it above both ends of the curve on ImageNet's shifts.
WISE_MIX = 0.5


def wise_mix_comparisons(sides: tuple | None) -> list[findings.Comparison]:
    """CE's WiSE-FT mix at :data:`WISE_MIX` against the two ends of its curve (α = 0 is the
    zero-shot model, α = 1 the fine-tuned one) on OOD test accuracy. ``sides`` is what
    :func:`dps_tune.sweep.confirm.wise_mix_sides` returns for the confirmed CE seeds: the
    comparisons are paired two-level bootstraps on the same seeds and test images."""
    from dps_tune import stats

    if sides is None:
        return []
    mix, fine_tuned, zero_shot = sides
    seeds = mix.shape[0]
    out = []
    for end, name in ((zero_shot, "its α = 0 (zero-shot)"), (fine_tuned, "its α = 1 (CE)")):
        gap = stats.paired_two_level_bootstrap(mix, end).interval()
        out.append(findings.Comparison(f"CE's WiSE-FT mix α = {WISE_MIX:g}", name, "ood_test_acc", gap.mean, gap.low,
                                       gap.high, note=f"{seeds} seed{'s' * (seeds != 1)} and the test images "
                                                      "resampled, outside the Holm family"))
    return out


def write_findings(out: Path, header: list[str], exp_confirm: Path, summary: dict, wise_dir: Path) -> Path:
    """``findings.md``: the confirmation's comparisons, CE's WiSE-FT mix against the ends of its curve,
    and where each method lies against that curve."""
    from dps_tune import stats

    seeds = len(CONFIRM_SEEDS)
    comparisons = [findings.Comparison(p["a"], p["b"], p["metric"], p["mean"], p["low"], p["high"],
                                       note=f"{p['n']} seed{'s' * (p['n'] != 1)}, Holm-adjusted over "
                                            f"{p['family']} comparisons", differs=p["differs"])
                   for p in summary["pairs"]]
    against_zero = [c for c in comparisons if c.b == confirm.ZERO_SHOT]
    between = [c for c in comparisons if c.b != confirm.ZERO_SHOT]
    curve = ce_wise_curve(wise_dir)
    curve_correct = results.wise_curve_correct(wise_dir, "ce")  # None for an older wise: the curve held fixed
    _, correct = confirm.finished_seeds(exp_confirm)
    mix_sides = confirm.wise_mix_sides(exp_confirm, "ce", WISE_MIX) if "ce" in correct else None
    frontier = []
    for method in results.in_method_order(summary["methods"]):
        row = summary["methods"][method]
        if method in ("ce", confirm.ZERO_SHOT) or "id_test_acc" not in row or "ood_test_acc" not in row:
            continue
        chosen = sorted(correct.get(method, {}))
        mats = [confirm.matrix(correct[method], chosen, m) for m in ("id_test_acc", "ood_test_acc")]
        gap = stats.wise_frontier_gap(curve, row["id_test_acc"]["mean"], row["ood_test_acc"]["mean"],
                                      method_correct=tuple(mats) if all(m is not None for m in mats) else None,
                                      curve_correct=curve_correct)
        frontier.append(findings.frontier_sentence(method, gap, row["id_test_acc"]["mean"], seeds))
    page = findings.render("What the demo found", header, [
        ("Against zero-shot", findings.sentences(against_zero)),
        ("Between methods and DPS's controls", findings.sentences(between)),
        ("Along CE's WiSE-FT curve", findings.sentences(wise_mix_comparisons(mix_sides))),
        ("Against CE's WiSE-FT curve", frontier),
    ])
    path = out / "findings.md"
    path.write_text(page)
    return path


def run_demo(out: Path, *, overrides: list[str] | None = None, dashboard: bool = True) -> int:
    """Run the whole study into ``out``; returns a process exit status."""
    overrides = list(overrides or [])
    start = time.time()
    out = out.resolve()
    # Validate every stage before any work; the DPS reference (the CE sweep) exists only
    # once CE is done, so it is checked for real then.
    with new_directory(out):  # the DPS stage's reference_experiment: it must exist to be checked
        sweeps = {name: _load_stage(space, out, overrides) for name, space in STAGES}
    base = sweeps["ce"].config
    metric = objectives(sweeps["ce"].tune)[0][0]  # with several objectives, the first selects

    env = environment()
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    _say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    _say(world_header(base))
    _say(f"[1/{STAGES_TOTAL}] pretrained tiny CLIP ({base.model}, pretrained={base.pretrained!r})")
    tag = models.tag_key(base.pretrained)
    if tag in pretrain.TAGS:  # the tag this world's stages load: built here once, before any trial
        pretrain.ensure_pretrained(base.model, tag=tag)
    cached = image_cache_overrides(base, overrides)
    if cached:
        overrides = overrides + cached
        base = _load_stage(STAGES[0][1], out, overrides).config
        _say(f"      images decoded once into {base.data.image_cache}; every trial reads them from there")
    zero_shot = evaluate_start(base)
    (out / "zero_shot.json").write_text(json.dumps(zero_shot, indent=2))
    _say("      zero-shot: " + "  ".join(f"{k}={zero_shot[k]:.3f}" for k in COLUMNS)
         + f" ({time.time() - start:.0f} s)")

    exp_dirs = []
    try:
        for i, (name, space) in enumerate(STAGES, start=2):
            sweep = _load_stage(space, out / "ce", overrides)
            t = sweep.tune
            _say(f"\n[{i}/{STAGES_TOTAL}] {name.upper()} sweep: {t.num_samples} trials, Optuna TPE + ASHA on {t.metric}, "
                 f"{t.max_concurrent_trials} at a time, up to {sweep.max_t} epochs each")
            began = time.time()
            exp = Path(ray_tune.run_sweep(sweep, storage_path=str(out), name=name, dashboard=dashboard))
            exp_dirs.append(exp)
            table = results.results_table(exp)
            _say(f"      {name}: {(table['status'] == 'completed').sum()} completed, "
                 f"{(table['status'] == 'early-stopped').sum()} stopped early by ASHA, "
                 f"{(table['status'] == 'error').sum()} failed ({time.time() - began:.0f} s)")
        wise, soup = _ensembles(out, exp_dirs, metric)
        confirmed = _confirm(out, exp_dirs, metric, overrides)
    finally:
        ray_tune.shutdown()

    _say(f"\n[7/{STAGES_TOTAL}] comparison: for each method, the checkpoint best on {metric}, with its test "
         f"figures; WiSE-FT's alpha and the soup chosen on {metric} too")
    rows = comparison_rows(zero_shot, exp_dirs, metric, wise, soup)
    text = format_comparison(rows)
    _say(text)
    exp_confirm, summary = confirmed
    confirmed_text = (f"confirmed over seeds {', '.join(map(str, CONFIRM_SEEDS))}:\n"
                      + confirm.format_summary(summary))
    _say("\n" + confirmed_text)
    text = text + "\n\n" + confirmed_text
    (out / "comparison.txt").write_text(text + "\n")
    header = [f"Written by `dps-tune demo` ({env['dps_tune']}, torch {env['torch']}, {env['device']}); every sentence "
              "below is chosen by its interval.", "", "```", world_header(base), "```", "",
              f"Confirmation: each method's selected configuration and DPS's controls at dps (top)'s configuration, "
              f"retrained with seeds {', '.join(map(str, CONFIRM_SEEDS))}; intervals from a two-level bootstrap "
              "(seeds, then test images), paired on the same seeds and images, Holm-adjusted over the family."]
    found = write_findings(out, header, exp_confirm, summary, out / "wise")
    _say("\n" + found.read_text())
    report = render_report([*exp_dirs, out / "wise", out / "soup", exp_confirm], out / "report.html",
                           zero_shot=zero_shot)
    minutes = (time.time() - start) / 60
    _say(f"\nreport:   {report}   (open it in a browser)")
    _say(f"findings: {found}")
    cmd = command_path()
    _say(f"inspect:  {cmd} results {exp_dirs[1]}")
    _say(f"          {cmd} best {exp_dirs[0]} --export {out / 'best_ce'}")
    _say(f"          {cmd} report {' '.join(map(str, exp_dirs))} {out / 'wise'} {out / 'soup'} "
         f"--out {out / 'report.html'}")
    _say(f"          {tensorboard_hint(out)}")
    _say(f"          {cmd} results {exp_confirm}")
    _say(f"finished in {minutes:.1f} min")
    return 0


def main(out: str | None = None, overrides: list[str] | None = None, dashboard: bool = True) -> int:
    target = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    if (target / "ce").exists():
        raise UserError(f"--out {target}: holds a demo already; pass another --out")
    logging.getLogger("dps_tune").setLevel(logging.INFO)
    return run_demo(target, overrides=overrides, dashboard=dashboard)
