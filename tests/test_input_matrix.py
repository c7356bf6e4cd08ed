"""Every command against every way its input can be wrong: one line, exit 2, nothing left behind.

Each case copies a small world (configs, a search space, a finished experiment written
in a sweep's on-disk format, weights files, a prepared image cache) into a directory of
its own, breaks one thing in it, runs one ``dps-tune`` command there and checks that:

- the command exits with status 2;
- stderr is exactly one line, ``dps-tune...: error: ...``, naming the argument or key and
  the value or path (``expect``), with no traceback;
- the directory is exactly as it was: no half-made experiment, cache shard, checkpoint or
  report, and no cache entry that a later run would trust;
- unless the case is marked ``heavy`` (its input can only be judged by reading weights or
  the open_clip registry), neither torch nor Ray was imported: the refusal came from
  validation, before any expensive start.

Commands run in forked children of a light process (``support/cli_forkserver.py``), so a case
costs a fork, not a Python start; the heavy cases fork from a second one that has torch
and open_clip imported already. The slow launch cases (the same ``--name`` twice at
once) are at the end, with a real Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from support.cli import FORKSERVER
from support.datasets import make_iwildcam
from support.experiments import write_experiment
from support.worlds import tiny_raw

ROOT = Path(__file__).resolve().parents[1]
EXP = "runs/exp"  # the finished experiment of the world
TRIAL = f"{EXP}/trainable_ce000001_00000"  # one of its trials, with a checkpoint


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # what the one stderr line must name
    setup: Callable[[Path], None] | None = None
    heavy: bool = False  # may import torch (it must read weights or open_clip's registry to judge)
    timeout: float = 60.0
    env: dict = field(default_factory=dict)


# ------------------------------------------------------------------ world breakers


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(world: Path) -> None:
        path = world / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def mkdir(rel: str) -> Callable[[Path], None]:
    return lambda world: (world / rel).mkdir(parents=True, exist_ok=True)


def remove(*rels: str) -> Callable[[Path], None]:
    def setup(world: Path) -> None:
        for rel in rels:
            for path in world.glob(rel):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def setup(world: Path) -> None:
        path = world / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return setup


def space(search: dict | None = None, tune: dict | None = None, **config) -> Callable[[Path], None]:
    """A search-space file ``bad.yaml``: the world's tiny config with this search and tune block."""
    raw = tiny_raw(**config)
    raw["search"] = search if search is not None else {"optim.lr": {"loguniform": [1e-4, 1e-3]}}
    raw["tune"] = {"num_samples": 2, **(tune or {})}
    return write("bad.yaml", yaml.safe_dump(raw))


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(world: Path) -> None:
        for s in setups:
            s(world)
    return setup


def every_sweep_file(text: str) -> Callable[[Path], None]:
    return write(f"{EXP}/dps_tune_sweep.json", text)


NOT_SAFETENSORS = b"this is not a safetensors file\n" * 4


def corrupt_every_checkpoint(world: Path) -> None:
    """Every kept checkpoint's weights cut to nothing, as a copy that ran out of space leaves them."""
    for path in (world / EXP).glob("*/checkpoint_*/model.safetensors"):
        path.write_bytes(b"")
NO_EXP = "runs/nothing-here"
CLOSED = "127.0.0.1:1"  # loopback, and nothing listens on port 1: connection refused at once


def _cases() -> list[Case]:
    c: list[Case] = []

    def add(id, argv, expect, setup=None, **kw):
        c.append(Case(id, tuple(argv), tuple(expect), setup, **kw))

    # --- train: the config file --------------------------------------------------
    add("train/config/missing", ["train", "missing.yaml"], ["missing.yaml"])
    add("train/config/is-a-directory", ["train", "adir"], ["adir"], mkdir("adir"))
    add("train/config/empty", ["train", "bad.yaml"], ["bad.yaml"], write("bad.yaml", ""))
    add("train/config/corrupt-yaml", ["train", "bad.yaml"], ["bad.yaml"], write("bad.yaml", "model: [tiny-vit\n  lr: {"))
    add("train/config/not-a-mapping", ["train", "bad.yaml"], ["bad.yaml"], write("bad.yaml", "- 1\n- 2\n"))
    add("train/config/binary", ["train", "weights/bad.safetensors"], ["bad.safetensors"])
    add("train/config/unknown-key", ["train", "bad.yaml"], ["optim.lrr"],
        write("bad.yaml", yaml.safe_dump({**tiny_raw(), "optim": {"lrr": 1.0}})))
    # --- train: values -----------------------------------------------------------
    for id, setting, expect in [
        ("set-without-equals", "optim.lr", ["optim.lr"]),
        ("unknown-key", "optim.lrr=0.1", ["optim.lrr"]),
        ("wrong-type", "optim.lr=abc", ["lr", "abc"]),
        ("out-of-range", "optim.lr=-1", ["lr", "-1"]),
        ("nan", "optim.lr=nan", ["lr", "nan"]),
        ("inf", "optim.epochs=inf", ["epochs", "inf"]),
        ("unknown-name", "algorithm=sgd", ["algorithm", "sgd"]),
        ("empty-list", "data.eval_splits=[]", ["eval_splits"]),
        ("zero-batch", "data.batch_size=0", ["batch_size", "0"]),
        ("bool-for-int", "optim.epochs=true", ["epochs", "True"]),
        ("masking-out-of-range", "dps.masking=1.5", ["masking", "1.5"]),
        ("unknown-model-name", "model=ViT-Z-99", ["model", "ViT-Z-99"]),
        ("list-for-number", "optim.lr=[1, 2]", ["lr"]),
        ("too-few-classes", "data.synthetic.classes=1", ["data.synthetic.classes", "1"]),
        ("unknown-split", "data.eval_splits=[id_val, val_ood]", ["eval_splits", "val_ood"]),
        ("unknown-suppression", "dps.suppress=middle", ["dps.suppress", "middle"]),
        ("unknown-quota", "dps.quota=per_row", ["dps.quota", "per_row"]),
        ("empty-exclude-pattern", "dps.exclude=[bias, '']", ["dps.exclude"]),
        ("number-for-exclude", "dps.exclude=3", ["dps.exclude", "3"]),
    ]:
        add(f"train/value/{id}", ["train", "good.yaml", "--set", setting], expect,
            heavy=id == "unknown-model-name")
    # --- train: paths the config names --------------------------------------------
    add("train/pretrained/missing", ["train", "good.yaml", "--set", "pretrained=weights/none.safetensors"],
        ["pretrained", "none.safetensors"], heavy=True)
    add("train/pretrained/corrupt-safetensors", ["train", "good.yaml", "--set", "pretrained=weights/bad.safetensors"],
        ["pretrained", "bad.safetensors"], heavy=True)
    add("train/pretrained/truncated-safetensors",
        ["train", "good.yaml", "--set", "pretrained=weights/cut.safetensors"], ["pretrained", "cut.safetensors"],
        heavy=True)
    add("train/pretrained/truncated-pt", ["train", "good.yaml", "--set", "pretrained=weights/cut.pt"],
        ["pretrained", "cut.pt"], heavy=True)
    add("train/classnames/missing", ["train", "good.yaml", "--set", "data.classnames=names.txt"],
        ["data.classnames", "names.txt"], heavy=True)
    add("train/image-cache/is-a-file", ["train", "iwild.yaml", "--set", "data.image_cache=good.yaml"],
        ["data.image_cache", "good.yaml"], heavy=True)
    add("train/image-cache/corrupt-shard", ["train", "iwild.yaml"], ["data.image_cache", "shard"],
        lambda w: [truncate(str(p.relative_to(w)))(w) for p in sorted((w / "imgcache").glob("*.npy"))[:1]],
        heavy=True)
    add("train/image-cache/corrupt-manifest", ["train", "iwild.yaml"], ["imgcache", "manifest.json"],
        lambda w: truncate(str(next((w / "imgcache").glob("*.json")).relative_to(w)))(w), heavy=True)
    add("train/csv/corrupt", ["train", "good.yaml", "--set", "data.dataset=csv", "--set", "data.train_csv=bad.csv",
                              "--set", "data.eval_splits=[id_val]", "--set", "data.eval_csvs={id_val: bad.csv}",
                              "--set", "data.classnames=names.txt", "--set", "tune.metric=id_val_f1"],
        ["bad.csv"], both(write("bad.csv", b"\x00\x01\x02 not, a\ncsv\"\n"), write("names.txt", "cat\ndog\n")),
        heavy=True)
    # --- train: output and resume -------------------------------------------------
    add("train/out/is-a-file", ["train", "good.yaml", "--out", "good.yaml"], ["--out", "good.yaml"])
    add("train/resume/missing", ["train", "good.yaml", "--resume", "nowhere"], ["--resume", "nowhere"])
    add("train/resume/is-a-file", ["train", "good.yaml", "--resume", "good.yaml"], ["--resume", "good.yaml"])
    add("train/resume/corrupt-state", ["train", "good.yaml", "--resume", "state"], ["--resume", "state"],
        both(mkdir("state"), write("state/train_state.pt", b"PK\x03\x04 cut short")), heavy=True)

    # --- sweep ----------------------------------------------------------------------
    sweep = ["sweep", "bad.yaml", "--storage", "runs", "--name", "new"]
    add("sweep/space/missing", ["sweep", "missing.yaml"], ["missing.yaml"])
    add("sweep/space/is-a-directory", ["sweep", "adir"], ["adir"], mkdir("adir"))
    add("sweep/space/corrupt-yaml", sweep, ["bad.yaml"], write("bad.yaml", "search: {lr: [1,"))
    add("sweep/search/reversed-range", sweep, ["optim.lr", "loguniform"],
        space({"optim.lr": {"loguniform": [1e-3, 1e-5]}}))
    add("sweep/search/empty-choice", sweep, ["optim.wd", "choice"], space({"optim.wd": {"choice": []}}))
    add("sweep/search/unknown-distribution", sweep, ["optim.lr", "gaussian"],
        space({"optim.lr": {"gaussian": [0, 1]}}))
    add("sweep/search/unknown-key", sweep, ["optim.lrr"], space({"optim.lrr": {"choice": [0.1]}}))
    add("sweep/search/nan-bound", sweep, ["optim.wd", "nan"], space({"optim.wd": {"uniform": [".nan", 0.1]}}))
    add("sweep/search/inf-bound", sweep, ["optim.lr", "inf"], space({"optim.lr": {"loguniform": [1e-5, ".inf"]}}))
    add("sweep/search/value-out-of-range", sweep, ["dps.masking", "1.5"],
        space({"dps.masking": {"uniform": [0.1, 1.5]}}, algorithm="dps", **{"dps.reference": "weights/ref.safetensors"}))
    add("sweep/search/unknown-quota", sweep, ["dps.quota", "per_layer"],
        space({"dps.quota": {"choice": ["global", "per_layer"]}}, algorithm="dps",
              **{"dps.reference": "weights/ref.safetensors"}))
    add("sweep/search/not-a-mapping", sweep, ["search"], write("bad.yaml", yaml.safe_dump({**tiny_raw(),
                                                                                         "search": [1, 2]})))
    add("sweep/tune/metric-not-reported", sweep + ["--set", "tune.metric=accuracy"], ["tune.metric", "accuracy"],
        space())
    add("sweep/tune/metric-on-test-split", sweep + ["--set", "tune.metric=ood_test_f1"],
        ["tune.metric", "ood_test_f1"], space())
    add("sweep/tune/unknown-mode", sweep + ["--set", "tune.mode=up"], ["tune.mode", "up"], space())
    add("sweep/tune/metric-mode-lists-differ", sweep, ["tune.mode"],
        space(tune={"metric": ["id_val_f1", "ood_val_f1"], "mode": ["max"]}))
    add("sweep/tune/nan-samples", sweep + ["--set", "tune.num_samples=.nan"], ["num_samples", "nan"], space())
    add("sweep/tune/unknown-key", sweep + ["--set", "tune.gpu=1"], ["tune.gpu"], space())
    add("sweep/tune/zero-concurrency", sweep + ["--set", "tune.max_concurrent_trials=0"],
        ["max_concurrent_trials", "0"], space())
    add("sweep/tune/inf-minutes", sweep + ["--set", "tune.resume_every_minutes=.inf"], ["resume_every_minutes", "inf"],
        space())
    add("sweep/tune/unknown-logger", sweep + ["--set", "tune.loggers=[mlflow, comet]"], ["tune.loggers", "comet"],
        space())
    add("sweep/tune/logger-twice", sweep, ["tune.loggers", "wandb"], space(tune={"loggers": ["wandb", "wandb"]}))
    add("sweep/num-samples/zero", sweep + ["--num-samples", "0"], ["num_samples", "0"], space())
    add("sweep/num-samples/wrong-type", sweep + ["--num-samples", "many"], ["--num-samples", "many"], space())
    add("sweep/post/unknown", sweep + ["--post", "wise,stew"], ["--post", "stew"], space())
    add("sweep/storage/is-a-file", ["sweep", "bad.yaml", "--storage", "good.yaml", "--name", "x"],
        ["--storage", "good.yaml"], space())
    add("sweep/experiment/is-a-file", ["sweep", "bad.yaml", "--storage", "runs", "--name", "taken"],
        ["taken"], both(space(), write("runs/taken", "not a directory\n")), heavy=True)
    add("sweep/experiment/exists", ["sweep", "bad.yaml", "--storage", "runs", "--name", "exp"],
        ["exp", "resume"], space(), heavy=True)
    add("sweep/name/has-a-slash", ["sweep", "bad.yaml", "--storage", "runs", "--name", "a/../../b"],
        ["--name", "a/../../b"], space())
    add("sweep/address/connection-refused", sweep + ["--address", CLOSED], ["--address", CLOSED], space())

    # --- resume ---------------------------------------------------------------------
    add("resume/missing", ["resume", NO_EXP], [NO_EXP])
    add("resume/is-a-file", ["resume", "good.yaml"], ["good.yaml"])
    add("resume/not-an-experiment", ["resume", "adir"], ["adir"], mkdir("adir"))
    add("resume/truncated-sweep-file", ["resume", EXP], [EXP, "dps_tune_sweep.json"],
        truncate(f"{EXP}/dps_tune_sweep.json"))
    add("resume/no-ray-state", ["resume", EXP], [EXP], heavy=True)
    add("resume/address/connection-refused", ["resume", EXP, "--address", CLOSED], ["--address", CLOSED])
    add("resume/ray-address-env/connection-refused", ["resume", EXP], ["RAY_ADDRESS", CLOSED],
        env={"RAY_ADDRESS": CLOSED})
    add("resume/address/malformed", ["resume", EXP, "--address", "head-node"], ["--address", "head-node"])

    # --- results ----------------------------------------------------------------------
    add("results/missing", ["results", NO_EXP], [NO_EXP])
    add("results/is-a-file", ["results", "good.yaml"], ["good.yaml"])
    add("results/not-an-experiment", ["results", "adir"], ["adir"], mkdir("adir"))
    add("results/empty-sweep-file", ["results", EXP], [EXP, "dps_tune_sweep.json"],
        write(f"{EXP}/dps_tune_sweep.json", ""))
    add("results/unknown-metric", ["results", EXP, "--metric", "accuracy"], ["--metric", "accuracy"])
    add("results/unknown-mode", ["results", EXP, "--mode", "sideways"], ["--mode", "sideways"])
    add("results/too-few-resamples", ["results", EXP, "--bootstrap", "--resamples", "5"], ["--resamples", "5"])
    add("results/csv-is-a-directory", ["results", EXP, "--csv", "adir"], ["--csv", "adir"], mkdir("adir"))
    add("results/pareto-and-bootstrap", ["results", EXP, "--pareto", "--bootstrap"], ["--bootstrap"])

    # --- best -----------------------------------------------------------------------
    add("best/missing", ["best", NO_EXP], [NO_EXP])
    add("best/not-an-experiment", ["best", "adir"], ["adir"], mkdir("adir"))
    add("best/no-checkpoint", ["best", EXP], [EXP, "checkpoint"], remove(f"{EXP}/*/checkpoint_*"))
    add("best/metric-on-test-split", ["best", EXP, "--metric", "ood_test_acc"], ["--metric", "ood_test_acc"])
    add("best/unknown-metric", ["best", EXP, "--metric", "accuracy"], ["--metric", "accuracy"])
    add("best/unknown-scope", ["best", EXP, "--scope", "some"], ["--scope", "some"])
    add("best/corrupt-metrics", ["best", EXP], ["metrics.json"],
        lambda w: [truncate(str(p.relative_to(w)))(w) for p in (w / EXP).glob("*/checkpoint_*/metrics.json")])
    add("best/export/is-a-file", ["best", EXP, "--export", "good.yaml"], ["--export", "good.yaml"])
    add("best/export/corrupt-weights", ["best", EXP, "--export", "out"], ["model.safetensors"], corrupt_every_checkpoint,
        heavy=True)

    # --- report ---------------------------------------------------------------------
    add("report/missing", ["report", NO_EXP, "--out", "r.html"], [NO_EXP])
    add("report/not-an-experiment", ["report", "adir", "--out", "r.html"], ["adir"], mkdir("adir"))
    add("report/out/is-a-directory", ["report", EXP, "--out", "adir"], ["--out", "adir"], mkdir("adir"))
    add("report/zero-shot/missing", ["report", EXP, "--out", "r.html", "--zero-shot", "zs.json"],
        ["--zero-shot", "zs.json"])
    add("report/zero-shot/corrupt", ["report", EXP, "--out", "r.html", "--zero-shot", "zs.json"],
        ["zs.json"], write("zs.json", '{"id_test_acc": 0.4,'))
    add("report/y-metric/test-typo", ["report", EXP, "--out", "r.html", "--y-metric", "ood_tset_acc"],
        ["--y-metric", "ood_tset_acc"])
    add("report/out/parent-is-a-file", ["report", EXP, "--out", "good.yaml/r.html"], ["--out", "good.yaml"])
    add("report/x-metric/unknown", ["report", EXP, "--out", "r.html", "--x-metric", "accuracy"],
        ["--x-metric", "accuracy"])

    # --- rank -----------------------------------------------------------------------
    rank = ["rank", "--model", "tiny-vit", "--pretrained", "none", "--reference", "weights/ref.safetensors"]
    add("rank/masking/out-of-range", rank + ["--masking", "1.5", "--out", "r.pt"], ["--masking", "1.5"])
    add("rank/masking/nan", rank + ["--masking", "nan", "--out", "r.pt"], ["--masking", "nan"])
    add("rank/quota/unknown", rank + ["--quota", "per_row", "--out", "r.pt"], ["--quota", "per_row"])
    add("rank/exclude/empty-pattern", rank + ["--exclude", "bias,,ln", "--out", "r.pt"], ["--exclude"])
    add("rank/seed/wrong-type", rank + ["--seed", "one", "--out", "r.pt"], ["--seed", "one"])
    add("rank/out/parent-is-a-file", rank + ["--out", "good.yaml/r.pt"], ["--out", "good.yaml"])
    add("rank/out/is-a-directory", rank + ["--out", "adir"], ["--out", "adir"], mkdir("adir"))
    add("rank/reference/missing", rank[:-1] + ["weights/none.safetensors", "--out", "r.pt"],
        ["--reference", "none.safetensors"], heavy=True)
    add("rank/reference/corrupt", rank[:-1] + ["weights/bad.safetensors", "--out", "r.pt"],
        ["--reference", "bad.safetensors"], heavy=True)
    add("rank/model/unknown", ["rank", "--model", "ViT-Z-99", *rank[3:], "--out", "r.pt"], ["--model", "ViT-Z-99"],
        heavy=True)
    add("rank/pretrained/unknown-tag", [*rank[:3], "--pretrained", "laion9z", *rank[5:], "--out", "r.pt"],
        ["--pretrained", "laion9z"], heavy=True)

    # --- prepare --------------------------------------------------------------------
    add("prepare/no-destination", ["prepare", "good.yaml"], ["data.image_cache"])
    add("prepare/size/zero", ["prepare", "iwild.yaml", "--out", "c2", "--size", "0"], ["--size", "0"])
    add("prepare/workers/negative", ["prepare", "iwild.yaml", "--out", "c2", "--workers", "-1"], ["--workers", "-1"])
    add("prepare/out/is-a-file", ["prepare", "iwild.yaml", "--out", "good.yaml"], ["--out", "good.yaml"])
    add("prepare/config/missing", ["prepare", "missing.yaml", "--out", "c2"], ["missing.yaml"])
    add("prepare/root/missing", ["prepare", "iwild.yaml", "--out", "c2", "--set", "data.root=nowhere"],
        ["data.root", "nowhere"], heavy=True)

    # --- pretrain, demo ---------------------------------------------------------------
    add("pretrain/model/unknown", ["pretrain", "--model", "tiny-zz"], ["--model", "tiny-zz"])
    # The demo validates its stages' search spaces, open_clip included, before its first stage.
    add("demo/set/unknown-key", ["demo", "--set", "optim.lrr=1"], ["optim.lrr"], heavy=True)
    add("demo/set/out-of-range", ["demo", "--set", "tune.num_samples=0"], ["num_samples", "0"], heavy=True)
    add("demo/out/is-a-file", ["demo", "--out", "good.yaml"], ["--out", "good.yaml"])

    # --- wise -----------------------------------------------------------------------
    add("wise/alphas/out-of-range", ["wise", EXP, "--alphas", "0,2"], ["--alphas", "2"])
    add("wise/alphas/reversed", ["wise", EXP, "--alphas", "1:0:0.1"], ["--alphas", "1:0:0.1"])
    add("wise/alphas/empty", ["wise", EXP, "--alphas", ""], ["--alphas"])
    add("wise/alphas/nan", ["wise", EXP, "--alphas", "nan"], ["--alphas", "nan"])
    add("wise/top-k/zero", ["wise", EXP, "--top-k", "0"], ["--top-k", "0"])
    add("wise/select/test-split", ["wise", EXP, "--select", "id_test_acc"], ["--select", "id_test_acc"])
    add("wise/experiment/missing", ["wise", NO_EXP], [NO_EXP])
    add("wise/experiment/not-an-experiment", ["wise", "adir"], ["adir"], mkdir("adir"))
    add("wise/experiment/no-checkpoint", ["wise", EXP], [EXP], remove(f"{EXP}/*/checkpoint_*"))
    add("wise/out/is-a-file", ["wise", EXP, "--out", "good.yaml"], ["--out", "good.yaml"])
    add("wise/address/connection-refused", ["wise", EXP, "--address", CLOSED, "--out", "w"], ["--address", CLOSED])
    add("wise/corrupt-weights", ["wise", EXP, "--in-process", "--no-progress", "--out", "w"], ["model.safetensors"],
        corrupt_every_checkpoint, heavy=True)

    # --- soup -----------------------------------------------------------------------
    add("soup/method/unknown", ["soup", EXP, "--method", "sgd"], ["--method", "sgd"])
    add("soup/select/unknown", ["soup", EXP, "--select", "accuracy"], ["--select", "accuracy"])
    add("soup/experiment/missing", ["soup", NO_EXP], [NO_EXP])
    add("soup/experiment/is-a-file", ["soup", "good.yaml"], ["good.yaml"])
    add("soup/out/is-a-file", ["soup", EXP, "--out", "good.yaml"], ["--out", "good.yaml"])
    add("soup/greedy-and-uniform", ["soup", EXP, "--greedy", "--uniform"], ["--uniform"])
    add("soup/corrupt-weights", ["soup", EXP, "--in-process", "--no-progress", "--out", "s"], ["model.safetensors"],
        corrupt_every_checkpoint, heavy=True)

    # --- confirm --------------------------------------------------------------------
    add("confirm/seeds/one", ["confirm", EXP, "--seeds", "1"], ["--seeds", "1"])
    add("confirm/seeds/wrong-type", ["confirm", EXP, "--seeds", "three"], ["--seeds", "three"])
    add("confirm/select/test-split", ["confirm", EXP, "--select", "ood_test_f1"], ["--select", "ood_test_f1"])
    add("confirm/experiment/missing", ["confirm", NO_EXP], [NO_EXP])
    add("confirm/set/unknown-key", ["confirm", EXP, "--set", "optim.lrr=1"], ["optim.lrr"])
    add("confirm/set/out-of-range", ["confirm", EXP, "--set", "tune.cpus_per_trial=-1"], ["cpus_per_trial", "-1"])
    add("confirm/experiment/exists", ["confirm", EXP, "--storage", "runs", "--name", "exp"], ["exp", "exists"],
        heavy=True)
    add("confirm/address/connection-refused", ["confirm", EXP, "--address", CLOSED, "--storage", "runs",
                                               "--name", "c"], ["--address", CLOSED], heavy=True)

    # --- dashboard ------------------------------------------------------------------
    add("dashboard/port/out-of-range", ["dashboard", EXP, "--port", "70000"], ["--port", "70000"])
    add("dashboard/port/wrong-type", ["dashboard", EXP, "--port", "web"], ["--port", "web"])
    add("dashboard/host/not-an-address", ["dashboard", EXP, "--host", "256.1.1.1", "--port", "0"],
        ["--host", "256.1.1.1"])
    add("dashboard/no-study", ["dashboard", EXP, "--port", "0"], [EXP, "optuna.db"], remove(f"{EXP}/optuna.db"))
    add("dashboard/experiment/missing", ["dashboard", NO_EXP, "--port", "0"], [NO_EXP])
    add("dashboard/experiment/not-an-experiment", ["dashboard", "adir", "--port", "0"], ["adir"], mkdir("adir"))
    add("dashboard/corrupt-optuna-db", ["dashboard", EXP, "--port", "0"], ["optuna.db"],
        write(f"{EXP}/optuna.db", b"SQLite format 3\x00" + b"\x07" * 200))
    return c


CASES = _cases()


# ---------------------------------------------------------------------- the world


def _safetensors_header_only(path: Path) -> None:
    """A real safetensors file cut short: its header promises a tensor the file does not hold."""
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from dps_tune.config import config_from_dict, load_config
    from dps_tune.data import cache_writer
    from dps_tune.data.datasets import load_dataset

    root = tmp_path_factory.mktemp("matrix_world")
    (root / "good.yaml").write_text(yaml.safe_dump(tiny_raw()))
    write_experiment(root / "runs", "exp", [
        ("ce000001", {"algorithm": "ce", "optim.lr": 1e-3}, 4, 0.9),
        ("ce000002", {"algorithm": "ce", "optim.lr": 3e-4}, 2, 0.5),
        ("fl000001", {"algorithm": "flyp", "optim.lr": 1e-3}, 4, 0.8),
    ])
    for path in (root / EXP).glob("*/checkpoint_*/model.safetensors"):  # whole files (not tiny-vit's weights)
        save_file({"w": torch.zeros(2)}, str(path))
    weights = root / "weights"
    weights.mkdir()
    (weights / "bad.safetensors").write_bytes(NOT_SAFETENSORS)
    _safetensors_header_only(weights / "cut.safetensors")
    torch.save({"w": torch.zeros(64, 64)}, weights / "cut.pt")
    data = (weights / "cut.pt").read_bytes()
    (weights / "cut.pt").write_bytes(data[: len(data) // 2])
    save_file({"w": torch.zeros(2)}, str(weights / "ref.safetensors"))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{root / EXP / 'optuna.db'}", study_name="exp")
    make_iwildcam(root / "iwild")
    (root / "iwild.yaml").write_text(yaml.safe_dump(tiny_raw(**{
        "data.dataset": "iwildcam", "data.root": "iwild", "data.image_cache": "imgcache"})))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config("iwild.yaml")
        cache_writer.prepare(load_dataset(cfg.data), root / "imgcache", size=32, workers=0, progress=False)
    finally:
        os.chdir(cwd)
    assert config_from_dict(tiny_raw())  # the world's base config is valid
    return root


class Forkservers:
    """Two servers: a light one (only dps_tune.cli) and one with torch and open_clip already imported."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self._procs = {}
        for heavy, extra in ((False, []), (True, ["--preload", "torch,open_clip,dps_tune.preflight"])):
            self._procs[heavy] = subprocess.Popen([sys.executable, str(FORKSERVER), *extra],
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, heavy: bool) -> subprocess.Popen:
        return self._procs[heavy]

    def close(self) -> None:
        for proc in self._procs.values():
            proc.stdin.close()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forkserver(world):
    servers = Forkservers()
    yield servers
    servers.close()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = ("d" if path.is_dir() else "f", 0 if path.is_dir() else st.st_size,
                                            0 if path.is_dir() else st.st_mtime_ns)
    return out


def run_case(forkserver, world: Path, tmp_path: Path, case: Case) -> dict:
    here = tmp_path / "world"
    shutil.copytree(world, here, symlinks=True)
    if case.setup is not None:
        case.setup(here)
    io_dir = tmp_path / "io"
    io_dir.mkdir()
    env = {"DPS_TUNE_CACHE": str(here / ".cache"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", **case.env}
    before = snapshot(here)
    server = forkserver(case.heavy)
    server.stdin.write(json.dumps({"argv": list(case.argv), "cwd": str(here), "env": env, "out": str(io_dir),
                                   "timeout": case.timeout}) + "\n")
    server.stdin.flush()
    reply = json.loads(server.stdout.readline())
    result = json.loads((io_dir / "result.json").read_text()) if (io_dir / "result.json").exists() else {}
    return {**reply, **result, "stderr": (io_dir / "stderr").read_text(), "before": before, "after": snapshot(here)}


def summary() -> str:
    commands = {c.argv[0] for c in CASES}
    light = sum(not c.heavy for c in CASES)
    return (f"input matrix: {len(CASES)} bad-input cases over {len(commands)} commands, {light} of them refused "
            f"before torch or Ray is imported; {len(TOLERATED)} states of a sweep in progress that must work")


def test_the_matrix_is_large_and_distinct():
    ids = [c.id for c in CASES + TOLERATED]
    assert len(set(ids)) == len(ids), "two cases share an id"
    from dps_tune.cli import COMMANDS

    assert {c.argv[0] for c in CASES} == {cmd.name for cmd in COMMANDS}, "every command is in the matrix"
    assert len(CASES) >= 60
    assert sum(not c.heavy for c in CASES) > len(CASES) / 2


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, world, forkserver, tmp_path):
    r = run_case(forkserver, world, tmp_path, case)
    assert not r["timed_out"], f"{case.id}: still running after {case.timeout} s"
    lines = r["stderr"].strip().splitlines()
    assert r.get("code") == 2, f"{case.id}: exit {r.get('code')}\n{r['stderr'][-3000:]}"
    assert len(lines) == 1, f"{case.id}: {len(lines)} stderr lines:\n{r['stderr'][-3000:]}"
    line = lines[0]
    assert line.startswith("dps-tune") and "error: " in line, line
    for word in case.expect:
        assert word in line, f"{case.id}: {word!r} not named in: {line}"
    assert r["after"] == r["before"], (
        f"{case.id}: left behind {sorted(set(r['after']) - set(r['before']))}, "
        f"changed {sorted(k for k in r['before'] if r['after'].get(k) != r['before'][k])}")
    if not case.heavy:
        assert not r["torch"] and not r["ray"], f"{case.id}: imported torch/ray before refusing: {line}"


# What a sweep in progress legitimately looks like is not bad input: these must work.
TOLERATED = [
    Case("results/a-trial-has-an-empty-result-json", ("results", EXP), (), write(f"{TRIAL}/result.json", "")),
    Case("results/the-last-result-line-is-cut-short", ("results", EXP), (),
         lambda w: (w / TRIAL / "result.json").write_text((w / TRIAL / "result.json").read_text()[:-40])),
    Case("best/one-checkpoint-has-a-damaged-metrics-json", ("best", EXP), (),
         truncate(f"{TRIAL}/checkpoint_000000/metrics.json")),
    Case("report/a-trial-has-no-result-yet", ("report", EXP, "--out", "r.html"), (),
         write(f"{TRIAL}/result.json", "")),
]


@pytest.mark.parametrize("case", TOLERATED, ids=[c.id for c in TOLERATED])
def test_a_sweep_in_progress_is_not_bad_input(case, world, forkserver, tmp_path):
    r = run_case(forkserver, world, tmp_path, case)
    assert r.get("code") == 0, f"{case.id}: exit {r.get('code')}\n{r['stderr'][-3000:]}"
    assert "Traceback" not in r["stderr"], r["stderr"]


def test_a_port_in_use_is_one_line(world, forkserver, tmp_path):
    """``dashboard --port P`` where P is taken: the bind error names the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_case(forkserver, world, tmp_path, Case("dashboard/port/in-use", ("dashboard", EXP, "--port", str(port)),
                                                       ("--port", str(port))))
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2 and len(lines) == 1 and f"--port {port}" in lines[0], r["stderr"]
