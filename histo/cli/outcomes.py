"""How every batch command ends: its human lines and the summary line (on stderr under --json), the
JSON object on stdout, and the exit code (0 all done or skipped, 1 some failed; 2, a user mistake found
before any work, comes from HistoError in the command group)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click

from histo.batch import BatchSummary
from histo.cli.options import emit_json


def failure_lines(batch: BatchSummary) -> list[str]:
    """`failed: ID: reason` for each failed item."""
    return [f"failed: {o.id}: {o.reason}" for o in batch.failed()]


def finish(batch: BatchSummary, as_json: bool, lines: Iterable[str] = ()) -> None:
    """Print `lines` and the summary line, the JSON under --json, and exit 1 when an item failed."""
    for line in [*lines, batch.summary_line()]:
        click.echo(line, err=as_json)
    if as_json:
        emit_json(batch.to_dict())
    if batch.exit_code():
        sys.exit(batch.exit_code())
