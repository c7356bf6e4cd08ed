"""Where the tests' ``dps-tune`` commands ran: in a fork of the CLI server, or in a new interpreter and why
(:mod:`support.cli_server`). Kept apart from the server so that pytest's controller process can print the
line without importing Ray."""

from __future__ import annotations

import collections

# Per test process: "fork", or why the command ran in a new interpreter.
TALLY: collections.Counter[str] = collections.Counter()


def summary(tallies: list[dict[str, int]]) -> str | None:
    """One line from test processes' tallies: how many commands ran in forks, how many in new interpreters
    and why; None when no command ran."""
    total: collections.Counter[str] = collections.Counter()
    for tally in tallies:
        total.update(tally)
    if not total:
        return None
    forks = total.pop("fork", 0)
    why = "; ".join(f"{n} because {reason}" for reason, n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))
    line = f"dps-tune commands of run_cli and run_killed: {forks} in forks of the CLI server, "
    return line + f"{total.total()} in new interpreters" + (f" ({why})" if why else "")
