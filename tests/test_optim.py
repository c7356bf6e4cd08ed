"""The learning-rate schedule: linear warmup, then a cosine down to 0, stepped every iteration."""

from __future__ import annotations

import math

import pytest

from dps_tune.optim import lr_at


def test_warmup_then_cosine():
    base, warmup, total = 1e-3, 10, 110
    # warmup: base/warmup at step 0, rising linearly, base at the last warmup step
    assert [lr_at(s, base, warmup, total) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    # cosine from base at the end of warmup to 0 at total, half way at the midpoint
    assert lr_at(10, base, warmup, total) == pytest.approx(base)
    assert lr_at(60, base, warmup, total) == pytest.approx(base / 2)
    assert lr_at(35, base, warmup, total) == pytest.approx(base * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, base, warmup, total) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(500, base, warmup, total) == pytest.approx(0.0, abs=1e-15)  # never negative past the end
    # no warmup: the cosine starts at step 0
    assert lr_at(0, base, 0, 100) == pytest.approx(base)
    lrs = [lr_at(s, base, warmup, total) for s in range(total)]
    assert lrs[warmup:] == sorted(lrs[warmup:], reverse=True)
