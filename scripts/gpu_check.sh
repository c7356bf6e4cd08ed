#!/usr/bin/env bash
# The GPU check, in one go: CUDA tests and benchmarks on one CUDA device, about 8 minutes
# on an H100/H200 (every part has its own time limit, 480 s in all).
#
#   scripts/gpu_check.sh          # output also goes to $OUT/gpu_check.log when $OUT is set
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# Order: the issue's done-criteria first (CE and FLYP step speedups at ViT-B/16 batch 256),
# then the CUDA tests, the DPS step (suppression overhead vs CE), the ranking and the data
# pipeline. Exit status: 0 when every part passed, 1 when any failed or ran out of time,
# 2 when no CUDA device is visible.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

failed=0
part() {  # part LIMIT_S NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

check() {
    echo "gpu_check: $(date -u +%FT%TZ) on $(hostname)"
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE"); print("torch", torch.__version__, "CUDA", torch.version.cuda)'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device visible; nothing to check"
        return 2
    fi

    part 120 "step ce" "$PY" -m dps_tune.bench step --model ViT-B-16 --algorithm ce --batch 256 --baseline
    part 100 "step flyp" "$PY" -m dps_tune.bench step --model ViT-B-16 --algorithm flyp --batch 256 --baseline
    part 100 "cuda tests" "$PY" -m pytest tests/test_cuda.py -q -m cuda -p no:cacheprovider
    part 90 "step dps" "$PY" -m dps_tune.bench step --model ViT-B-16 --algorithm dps --batch 256 --baseline
    part 45 "rank" "$PY" -m dps_tune.bench rank --model ViT-B-16
    if [ -f dps_tune/bench/data.py ]; then
        part 25 "data" "$PY" -m dps_tune.bench data
    fi
    echo "gpu_check: $failed part(s) failed"
    [ "$failed" -eq 0 ]
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    check 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
check
