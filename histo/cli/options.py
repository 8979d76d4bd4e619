"""Options shared by several commands, so every command spells them the same way."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_args

import click

from histo.config import Device, StageConfig, load_config

C = TypeVar("C", bound=StageConfig)


def choices(literal: Any) -> str:
    """The values of a Literal type for a help text, e.g. 'auto | cpu | cuda'."""
    return " | ".join(get_args(literal))


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file overriding the defaults in configs/ (flags override both).",
)
JSON_META = "histo.json"  # ctx.meta key: whether the running command was given --json


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Note --json where the command group sees it (it prints a stopped batch's summary)."""
    ctx.meta[JSON_META] = value
    return value


json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_remember_json, help="Print a JSON object on stdout."
)
# Choices and ranges of every config flag are checked by the stage's config model, so a bad value reads the
# same from a flag, a file or the Python API: `error: --device: run.device: input should be ...`.
device_option = click.option(
    "--device", default=None, help=f"Where to compute: {choices(Device)} (auto: CUDA when present)."
)


def stage_config(schema: type[C], config_path: str | None, keys: Mapping[str, str]) -> C:
    """The validated config of the running command: defaults, then --config, then the flags in `keys`
    (click parameter name -> dotted config key; a flag left out is None and changes nothing)."""
    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}
    overrides = {key: ctx.params[name] for name, key in keys.items()}
    names = {key: "/".join([*params[name].opts, *params[name].secondary_opts]) for name, key in keys.items()}
    return load_config(schema, config_path, overrides, names)


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
