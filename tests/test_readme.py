"""The README describes the code as it is: its layout block names every module, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dps_tune"


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```\ndps_tune/\n(.*?)```", text, re.S)
    assert match, "README has no layout block"
    return match.group(1)


def test_layout_block_names_every_module_and_no_other():
    block = _layout_block()
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block))
    actual = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
              and "bench" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"}
    assert named == actual, (f"in the README but not the package: {sorted(named - actual)}; "
                             f"in the package but not the README: {sorted(actual - named)}")


def test_no_file_cites_notes_a_user_does_not_have():
    """Facts are stated where they are used; no reference to internal design notes."""
    sources = [ROOT / "README.md", *PACKAGE.rglob("*.py"), *(ROOT / "search_spaces").glob("*.yaml"),
               *(ROOT / "scripts").glob("*")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if p.is_file() and "ALGORITHMS.md" in p.read_text()]
    assert not offenders


def test_reference_lists_every_option_and_key_as_the_code_has_them():
    """REFERENCE.md is generated from the parsers and dataclasses; regenerate with `make reference`."""
    from dps_tune import reference_doc

    committed = (ROOT / "REFERENCE.md").read_text()
    assert committed == reference_doc.render(), "REFERENCE.md is stale: run `make reference`"
    for needle in ("`--no-progress`", "`--x-metric`", "### dps-tune pretrain", "`--seed` `SEED` | `0`",
                   "`optim.grad_clip`", "`optim.beta1`", "`data.templates`", "`data.synthetic.image_size`",
                   "`dps.ranking_cache`", "`tune.keep_checkpoints` | `int` | `2`"):
        assert needle in committed, needle
