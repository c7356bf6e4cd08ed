"""``findings.md``: the demo's conclusions, each sentence chosen by the measured figures.

Every sentence comes from one comparison (two methods, one metric, a difference with its
interval) and says only what the interval supports:

* an interval above 0: "A beats B on M by +d [lo, hi]";
* below 0: "A is below B on M by d [lo, hi]";
* an interval that includes 0: "the data cannot tell A from B on M".

Two metrics that agree (both above or both below) become one sentence. Nothing here is
written by hand: the README's "What it found" is this file as a fresh clone wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

METRIC_WORDS = {"id_test_acc": "ID test accuracy", "ood_test_acc": "OOD test accuracy",
                "id_test_f1": "ID test macro-F1", "ood_test_f1": "OOD test macro-F1"}


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    metric: str
    mean: float  # a - b
    low: float
    high: float
    note: str = ""  # what the interval counts (seeds, images, adjustment)
    differs: bool | None = None  # the test's own verdict (Holm-adjusted), where there is one

    @property
    def verdict(self) -> int:
        """+1 when a is above b, -1 when below, 0 when the data cannot tell (the interval includes 0)."""
        if self.differs is False or not (self.low > 0 or self.high < 0):
            return 0
        return 1 if self.mean > 0 else -1


def _figure(c: Comparison) -> str:
    return f"{c.mean:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"


def sentence(group: Sequence[Comparison]) -> str:
    """One sentence for the comparisons of one pair of methods (one or two metrics)."""
    a, b = group[0].a, group[0].b
    note = f" ({group[0].note})" if group[0].note else ""
    verdicts = {c.verdict for c in group}
    words = " and ".join(METRIC_WORDS.get(c.metric, c.metric) for c in group)
    figures = ", ".join(f"{METRIC_WORDS.get(c.metric, c.metric).split(' ')[0]} {_figure(c)}" if len(group) > 1
                        else _figure(c) for c in group)
    if verdicts == {1}:
        return f"{a} beats {b} on {words}: {figures}{note}."
    if verdicts == {-1}:
        return f"{a} is below {b} on {words}: {figures}{note}."
    if verdicts == {0}:
        return f"The data cannot tell {a} from {b} on {words}: {figures}{note}."
    return " ".join(sentence([c]) for c in group)


def sentences(comparisons: Iterable[Comparison]) -> list[str]:
    """One sentence per pair of methods, in the order the pairs first appear."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.a, c.b), []).append(c)
    return [sentence(g) for g in groups.values()]


def frontier_sentence(method: str, gap, id_acc: float, seeds: int) -> str:
    """Where ``method`` lies against CE's WiSE-FT curve (``gap``: a :class:`dps_tune.stats.FrontierGap`)."""
    if gap.gap is None:
        return (f"{method}'s ID test accuracy ({id_acc:.3f}) lies outside CE's WiSE-FT curve, so the data cannot "
                "place it against the curve.")
    if gap.interval is None:
        return f"{method} lies {gap.gap:+.3f} from CE's WiSE-FT curve on OOD test accuracy at its ID accuracy (no interval)."
    curve = ("CE's curve recomputed on the same images" if gap.curve_resampled
             else "CE's curve held fixed: its wise output has no per-image predictions")
    c = Comparison(method, "CE's WiSE-FT curve", "ood_test_acc", gap.gap, gap.interval.low, gap.interval.high,
                   note=f"at its ID test accuracy {id_acc:.3f}, {seeds} seeds and the test images resampled, {curve}")
    if c.verdict > 0:
        return f"{method} lies above CE's WiSE-FT curve on OOD test accuracy: {_figure(c)} ({c.note})."
    if c.verdict < 0:
        return f"{method} lies below CE's WiSE-FT curve on OOD test accuracy: {_figure(c)} ({c.note})."
    return (f"The data cannot tell {method} from CE's WiSE-FT curve on OOD test accuracy: {_figure(c)} "
            f"({c.note}).")


def render(title: str, header: Sequence[str], sections: Sequence[tuple[str, Sequence[str]]]) -> str:
    """The markdown page: a title, the lines that say what the figures rest on, then sections of sentences."""
    lines = [f"# {title}", "", *header, ""]
    for heading, items in sections:
        if not items:
            continue
        lines += [f"## {heading}", "", *(f"- {s}" for s in items), ""]
    return "\n".join(lines).rstrip() + "\n"
