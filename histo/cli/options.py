"""Options shared by several commands, so every command spells them the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file overriding the defaults in configs/ (flags override both).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print a JSON object on stdout.")
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where to compute (auto: CUDA when present).",
)


def parse_shard(value: str | None) -> tuple[int, int]:
    """Parse `I/N` (0-based I, as SLURM_ARRAY_TASK_ID) into (I, N); None means the whole job (0, 1)."""
    if value is None:
        return 0, 1
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/4, got {value!r}") from None
    if count < 1 or not 0 <= index < count:
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return index, count


shard_option = click.option(
    "--shard",
    default=None,
    help="Process the deterministic share I/N of the inputs (0-based, e.g. $SLURM_ARRAY_TASK_ID/N).",
)


def emit_json(obj: Any) -> None:
    """Print a JSON result on stdout (human output goes to stderr when --json is given)."""
    click.echo(json.dumps(obj, indent=2, default=str))


def compose(*decorators: Callable) -> Callable:
    """Apply several click decorators as one."""

    def apply(f: Callable) -> Callable:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply
