"""How every batch command ends: its human lines and the summary line (on stderr under --json), the
JSON object on stdout, and the exit code (0 all done or skipped, 1 some failed; 2, a user mistake found
before any work, comes from HistoError in the command group; 3, a run stopped by its environment, from
`histo.batch.BatchStopped` there, after `report_stopped` has printed what finished)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click

from histo.batch import BatchStopped, BatchSummary
from histo.cli.options import emit_json


def failure_lines(batch: BatchSummary) -> list[str]:
    """`failed: ID: reason` for each failed item."""
    return [f"failed: {o.id}: {o.reason}" for o in batch.failed()]


def update_lines(batch: BatchSummary) -> list[str]:
    """`updated: ID: label A -> B, site - -> X` for each item whose stored metadata this run changed."""
    lines = []
    for o in batch.outcomes:
        changes = o.detail.get("updated") or {}
        if changes:
            shown = ", ".join(f"{k} {old or '-'} -> {new or '-'}" for k, (old, new) in changes.items())
            lines.append(f"updated: {o.id}: {shown}")
    return lines


def finish(batch: BatchSummary, as_json: bool, lines: Iterable[str] = ()) -> None:
    """Print `lines` and the summary line, the JSON under --json, and exit 1 when an item failed."""
    for line in [*lines, batch.summary_line()]:
        click.echo(line, err=as_json)
    if as_json:
        emit_json(batch.to_dict())
    if batch.exit_code():
        sys.exit(batch.exit_code())


def report_stopped(stopped: BatchStopped, as_json: bool) -> None:
    """The failures and summary line of what finished before the environment stopped the run (and its
    JSON under --json); the command group then prints the reason and exits 3."""
    batch = stopped.summary
    for line in [
        *failure_lines(batch),
        f"{batch.summary_line()}; stopped before {batch.extra['not_processed']} more",
    ]:
        click.echo(line, err=as_json)
    if as_json:
        emit_json(batch.to_dict())
