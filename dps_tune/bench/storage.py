"""``python -m dps_tune.bench storage``: bytes a sweep writes to and keeps on its storage.

Runs the same small sweep (the demo's CE sweep by default, one trial at a time so that
every scheme runs the same trials and epochs) once per checkpoint scheme, in one run and
on one local Ray:

* **full** (the baseline): weights and train state at every report, what dps_tune 0.1 did;
* **economy, resume_every 1**: train state at every report, but only the newest copy of an
  unfinished trial is kept, and weights only for reports that can enter the top k;
* **economy** (the defaults): the same, with train state every ``tune.resume_every_minutes``.

The storage is a pyarrow filesystem that counts every byte written through it, by the
driver and by every trial's worker process alike (each process appends its counts to a
log beside the storage), so "written" is what reached the storage, deletions aside.
"Kept" is the size of the experiment directory after the sweep. Prints one line per
scheme and ends in ``storage: written X× less, kept Y× less`` for the defaults.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

SCHEMES = {
    "full": ["tune.checkpoint_scheme=full"],
    "economy, resume_every 1": ["tune.checkpoint_scheme=economy", "tune.resume_every=1"],
    "economy": ["tune.checkpoint_scheme=economy"],
}


class _CountingWriter:
    """A binary file that adds the bytes written to it to a per-process log when closed."""

    def __init__(self, raw, log: Path):
        self.raw, self.log, self.count = raw, log, 0

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.count += len(memoryview(data))
        return n

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if self.raw.closed:
            return
        self.raw.close()
        with open(self.log / f"{os.getpid()}.log", "a") as f:
            f.write(f"{self.count}\n")

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def writable(self) -> bool:
        return True


class CountingHandler(pafs.FileSystemHandler):
    """A local directory tree as a pyarrow filesystem (paths inside ``root``) that counts bytes written."""

    def __init__(self, root: str, log: str):
        self.root, self.log = root, log
        self.fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())

    def __reduce__(self):  # Ray ships the filesystem to every trial's worker
        return CountingHandler, (self.root, self.log)

    def __eq__(self, other) -> bool:
        return isinstance(other, CountingHandler) and (self.root, self.log) == (other.root, other.log)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "counting"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as inp, self.open_output_stream(dest, None) as out:
            out.write(inp.read())

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def _open(self, path: str, mode: str):
        full = Path(self.root) / path.lstrip("/")
        full.parent.mkdir(parents=True, exist_ok=True)  # as pyarrow's LocalFileSystem does
        return pa.PythonFile(_CountingWriter(open(full, mode), Path(self.log)), mode="w")

    def open_output_stream(self, path, metadata):
        return self._open(path, "wb")

    def open_append_stream(self, path, metadata):
        return self._open(path, "ab")


@dataclass
class Measured:
    scheme: str
    written: int
    kept: int
    seconds: float
    checkpoints: int
    train_states: int
    reports: int


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _counted(log: Path) -> int:
    return sum(int(line) for f in log.glob("*.log") for line in f.read_text().split())


def measure(space: Path, overrides: list[str], scheme: str, work: Path, *, dashboard: bool = False) -> Measured:
    from dps_tune.sweep import ray_tune, storage
    from dps_tune.sweep.search_space import load_sweep

    slug = scheme.replace(",", "").replace(" ", "_")
    root, log = work / slug / "storage", work / slug / "counts"
    root.mkdir(parents=True)
    log.mkdir(parents=True)
    fs = pafs.PyFileSystem(CountingHandler(str(root), str(log)))
    mount = storage.join(storage.mount(f"bench-{slug}", fs), "runs")
    sweep = load_sweep(space, [*overrides, *SCHEMES[scheme]])
    start = time.perf_counter()
    ray_tune.run_sweep(sweep, storage_path=mount, name="sweep", dashboard=dashboard)
    seconds = time.perf_counter() - start
    exp = root / "runs" / "sweep"
    return Measured(scheme, _counted(log), _tree_bytes(exp), seconds,
                    len(list(exp.glob("*/checkpoint_*/model.safetensors"))),
                    len(list(exp.glob("*/checkpoint_*/train_state.pt"))),
                    sum(len(p.read_text().splitlines()) for p in exp.glob("*/result.json")))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    from dps_tune.bench import setup_logging
    from dps_tune.demo import pretrain
    from dps_tune.demo.study import SPACES
    from dps_tune.sweep import ray_tune

    p = argparse.ArgumentParser(prog="python -m dps_tune.bench storage", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(SPACES / "demo.yaml"), help="search-space file (default: the demo's CE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config or tune override; tune.max_concurrent_trials=1 is set first, so that ASHA and "
                        "Optuna see results in one order and every scheme runs the same trials and epochs")
    p.add_argument("--work", help="keep the sweeps here (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    setup_logging()
    pretrain.ensure_pretrained()  # the demo's tiny CLIP, built once (not timed)
    results = []
    with tempfile.TemporaryDirectory(prefix="dps_tune_bench_storage_") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        try:
            for scheme in SCHEMES:
                m = measure(Path(args.space), ["tune.max_concurrent_trials=1", *args.set], scheme, work)
                results.append(m)
                print(f"storage [{m.scheme}]: {m.reports} reports, written {_mb(m.written)}, kept {_mb(m.kept)} "
                      f"({m.checkpoints} checkpoints, {m.train_states} with train state), "
                      f"wall {m.seconds:.0f} s", flush=True)
        finally:
            ray_tune.shutdown()
    base = results[0]
    if len({m.reports for m in results}) > 1:
        print("storage: the schemes ran different numbers of reports "
              f"({', '.join(str(m.reports) for m in results)}); compare the bytes per report", flush=True)
    for m in results[1:]:
        print(f"storage ({m.scheme} against full): written {base.written / max(m.written, 1):.1f}× less, "
              f"kept {base.kept / max(m.kept, 1):.1f}× less, wall {m.seconds / base.seconds:.2f}× the baseline's")
    last = results[-1]
    print(f"storage: written {base.written / max(last.written, 1):.1f}× less, kept {base.kept / max(last.kept, 1):.1f}× less")
    return 0
