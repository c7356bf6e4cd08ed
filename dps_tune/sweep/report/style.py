"""How the report names and draws methods, metrics and trial states: the same in every figure and table."""

from __future__ import annotations

from typing import Iterable

from dps_tune.sweep.results import in_method_order

ARM_TITLES = {"top": "most-moved rows suppressed", "bottom": "least-moved rows suppressed (matched)",
              "random": "random rows suppressed (matched control)",
              "random_global": "random rows over all tensors (unmatched)"}
# Fixed colours and markers, so a method looks the same in every plot and every report.
METHOD_STYLE = {
    "ce": ("#1f77b4", "o"),
    "flyp": ("#ff7f0e", "s"),
    "dps (top)": ("#2ca02c", "^"),
    "dps (bottom)": ("#9467bd", "v"),
    "dps (random)": ("#d62728", "D"),
    "dps (random_global)": ("#bcbd22", "p"),
    "dps (masking 1.0)": ("#17becf", "h"),
}
SPARE_STYLES = [("#8c564b", "P"), ("#e377c2", "X"), ("#7f7f7f", "*")]
STATUS_STYLE = {  # line style and end marker of a learning curve
    "completed": ("-", "o"),
    "early-stopped": ("--", "x"),
    "running": (":", ">"),
    "interrupted": (":", ">"),
    "error": (":", "X"),
}
SPLIT_NAMES = {"id_val": "ID val", "id_test": "ID test", "ood_val": "OOD val", "ood_test": "OOD test"}
KIND_NAMES = {"acc": "accuracy", "f1": "macro-F1"}


def _styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    styles, spare = {}, iter(SPARE_STYLES)
    for m in in_method_order(methods):
        styles[m] = METHOD_STYLE.get(m) or next(spare, ("#000000", "o"))
    return styles


def metric_label(name: str) -> str:
    """``ood_test_f1`` -> ``OOD test macro-F1``; unknown names are returned as they are."""
    split, _, kind = name.rpartition("_")
    if split in SPLIT_NAMES and kind in KIND_NAMES:
        return f"{SPLIT_NAMES[split]} {KIND_NAMES[kind]}"
    return name
