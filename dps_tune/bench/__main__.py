"""``python -m dps_tune.bench {rank,data,step,storage} [options]``: each prints one line per result."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "rank": "DPS ranking: one pass per tensor against the published per-row loop",
    "data": "input pipeline: decoding JPEGs every epoch against the prepared uint8 cache",
    "step": "training step: the default fast path against the paper-code-style step",
    "eval": "evaluation images a sweep spends: test splits at every report against once per kept checkpoint",
    "storage": "checkpoint bytes a sweep writes and keeps: the economy scheme against every report in full",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python -m dps_tune.bench {" + ",".join(BENCHMARKS) + "} [options]", file=sys.stderr)
        for name, text in BENCHMARKS.items():
            print(f"  {name:7s} {text}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"dps_tune.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
