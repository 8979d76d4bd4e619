"""YAML configuration shared by every command: packaged defaults (`histo/configs/<stage>.yaml`), a user file, flags.

The defaults file is the schema: a user file may only set keys that the defaults have, with values of a
compatible type. Every error is one line naming the file and the key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from histo.errors import ConfigError

# The defaults ship inside the package (the top-level `configs/` is a link to this folder), so a
# wheel installed without the source tree finds them.
CONFIG_DIR = Path(str(resources.files("histo") / "configs"))


def default_config_path(stage: str) -> Path:
    """Path of the defaults file of a stage (`tile`, `train`, `index`, ...)."""
    return CONFIG_DIR / f"{stage}.yaml"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing, unreadable or non-mapping file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def _compatible(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def merge(defaults: Mapping[str, Any], user: Mapping[str, Any], source: str, prefix: str = "") -> dict:
    """Return `defaults` updated by `user`, refusing unknown keys and values of the wrong type."""
    out = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(f"{prefix}{k}" for k in defaults))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {known})")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' must be a mapping, got {value!r}")
            out[key] = merge(default, value, source, prefix=f"{dotted}.")
        elif not _compatible(default, value):
            expected = type(default).__name__
            raise ConfigError(f"{source}: key '{dotted}' must be {expected}, got {value!r}")
        else:
            out[key] = value
    return out


def unflatten(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Turn {"mosaic.k": 9} into {"mosaic": {"k": 9}}, dropping None (a flag that was not given)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(
    stage: str, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Defaults of `stage`, then the user's YAML file, then flag overrides (dotted keys; None = unset)."""
    defaults_path = default_config_path(stage)
    config = read_yaml(defaults_path)
    if path is not None:
        config = merge(config, read_yaml(path), source=str(path))
    if overrides:
        config = merge(config, unflatten(overrides), source="command-line option")
    return config
