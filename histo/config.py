"""Stage configs: packaged YAML defaults, a user file and flags, merged and validated as one typed object.

Each domain package declares its stage's model (`pathology/config.py`, `search/config.py`,
`segmentation/config.py`, `histo/robustness_config.py`) with types and constraints only: every default
value lives in `histo/configs/<stage>.yaml`, the readable copy with comments (a test checks that model
fields and YAML keys match). `load_config` validates the whole merged config before any work and reports
the first problem as `SOURCE: key.path: reason`, SOURCE being the file or the flag that set the key.

Models are pydantic v2: frozen, unknown keys refused, strict types (an int is accepted for a float, nothing
else is converted), NaN and infinity refused. Every stage has a `run:` section of options that do not change
its outputs (device, workers, resume, caches); everything else is recorded with the output.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from typing_extensions import Self

from histo.errors import ConfigError

# The defaults ship inside the package (the top-level `configs/` is a link to this folder), so a
# wheel installed without the source tree finds them.
CONFIG_DIR = Path(str(resources.files("histo") / "configs"))

# ---- YAML ---------------------------------------------------------------------------------------


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-9` as a float (YAML 1.1 wants a dot: `1.0e-9`), as YAML 1.2 and people do."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing, unreadable or non-mapping file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=ConfigLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}: {e.problem})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


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


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn {"mosaic": {"k": 9}} into {"mosaic.k": 9}: the dotted keys of every leaf (unflatten's inverse)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- field types shared by the stage models -----------------------------------------------------


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _path_to_str(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _known_norm(name: str) -> str:
    from histo.norms import names

    if name not in names():
        raise ValueError(f"unknown norm {name!r} (known: {', '.join(names())})")
    return name


AsTuple = BeforeValidator(_list_to_tuple)  # YAML lists -> the frozen tuples of the models
Device = Literal["auto", "cpu", "cuda"]
Seed = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]  # e.g. a probability threshold
Overlap = Annotated[float, Field(ge=0, lt=1)]
PathStr = Annotated[str, BeforeValidator(_path_to_str), Field(min_length=1)]
NormName = Annotated[str, AfterValidator(_known_norm)]  # any name of the histo.norms registry
Roi = Annotated[tuple[PositiveInt, PositiveInt, PositiveInt], AsTuple]


class KeyedError(ValueError):
    """A model check that names the key at fault (relative to the model that raised it)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key, self.reason = key, reason


class Section(BaseModel):
    """A frozen group of config keys: unknown keys refused, strict types, finite floats."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class RunOptions(Section):
    """The `run:` section of a stage: how to run it (device, workers, caches), never what it produces."""


C = TypeVar("C", bound="StageConfig")


class StageConfig(Section):
    """A stage's whole config: its defaults file is `histo/configs/<stage>.yaml`; its `run` field holds the
    stage's RunOptions."""

    stage: ClassVar[str]

    @classmethod
    def defaults_path(cls) -> Path:
        return CONFIG_DIR / f"{cls.stage}.yaml"

    @classmethod
    def coerce(cls, value: Self | Mapping[str, Any] | None = None, source: str = "config") -> Self:
        """The typed config of an API argument: the object itself, the defaults (None), or a mapping of
        keys over the defaults, validated as a user file (`source` names it in errors)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return load_config(cls)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: expected a {cls.__name__} or a mapping, got {type(value).__name__}")
        return validate(cls, [_defaults_layer(cls), Layer(source, value)])

    @classmethod
    def section(cls, name: str, value: Any = None, source: str = "config") -> Any:
        """One section of the config, from a section object, None (the defaults) or a mapping over them."""
        field = cls.model_fields[name].annotation
        if isinstance(field, type) and isinstance(value, field):
            return value
        return getattr(cls.coerce({name: dict(value or {})}, source), name)

    def updated(self, overrides: Mapping[str, Any], source: str = "override") -> Self:
        """A copy with dotted-key overrides (None = unchanged), validated like every other layer."""
        return validate(type(self), [Layer("config", self.model_dump()), Layer(source, unflatten(overrides))])

    def recorded(self) -> dict[str, Any]:
        """The parameters that define this stage's output (all but `run`), as JSON-able values."""
        return self.model_dump(mode="json", exclude={"run"})


# ---- loading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """Config values and where they came from (a file, a flag, an API argument)."""

    source: str
    values: Mapping[str, Any]


def _defaults_layer(schema: type[StageConfig]) -> Layer:
    path = schema.defaults_path()
    return Layer(str(path), read_yaml(path))


def load_config(
    schema: type[C],
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
) -> C:
    """Defaults of the stage `schema`, then the user's YAML file, then overrides (dotted keys; None = not
    given), validated as a whole. `names` maps an override's key to the flag that set it, for errors."""
    if not (isinstance(schema, type) and issubclass(schema, StageConfig)):
        raise TypeError(
            f"load_config takes a stage's config class (e.g. pathology.config.TileConfig), got {schema!r}"
        )
    layers = [_defaults_layer(schema)]
    if path is not None:
        layers.append(Layer(str(path), read_yaml(path)))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            source = (names or {}).get(dotted, "command-line option")
            layers.append(Layer(source, unflatten({dotted: value})))
    return validate(schema, layers)


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `top`, mapping by mapping (a non-mapping value replaces)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(schema: type[Section], layers: Sequence[Layer]) -> Any:
    """Merge the layers and validate them as `schema`; the first problem is a ConfigError naming the
    layer that set the key, the dotted key and the reason."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer.values)
    try:
        return schema.model_validate(merged)
    except ValidationError as e:
        errors = e.errors()
        keys, reason = describe(schema, errors[0])
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ConfigError(f"{_source_of(layers, keys)}: {_dotted(keys)}: {reason}{more}") from None


def _dotted(keys: Sequence[Any]) -> str:
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else f"{'.' if text else ''}{key}"
    return text or "(top level)"


def _source_of(layers: Sequence[Layer], keys: Sequence[Any]) -> str:
    """The last layer that sets the key (or a key under it); the defaults file when none does."""
    names = [k for k in keys if isinstance(k, str)]
    for layer in reversed(layers):
        node: Any = layer.values
        for name in names:
            if not isinstance(node, Mapping) or name not in node:
                break
            node = node[name]
        else:
            if names or node:
                return layer.source
    return layers[0].source


def _fields_at(schema: type[BaseModel], keys: Sequence[Any]) -> list[str]:
    """The keys a model accepts at the section `keys` (empty when that is not a section)."""
    model: Any = schema
    for key in keys:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(model.model_fields)


def describe(schema: type[BaseModel], error: Mapping[str, Any]) -> tuple[list[Any], str]:
    """(key path, reason) of one pydantic error, worded for a config file."""
    keys = list(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    kind, got = error["type"], error.get("input")
    if isinstance(cause, KeyedError):
        return [*keys, *cause.key.split(".")], cause.reason
    if isinstance(cause, Exception):
        return keys, str(cause)
    if kind == "extra_forbidden":
        known = ", ".join(_fields_at(schema, keys[:-1]))
        return keys, f"unknown key (known here: {known})"
    if kind == "missing" and keys and isinstance(keys[-1], int):  # a fixed-length list that is too short
        return keys[:-1], f"too few values, got {list(got)}"
    if kind == "missing":
        return keys, "missing (every key needs a value; the defaults file gives them all)"
    if kind == "tuple_type":
        return keys, f"must be a list, got {got!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return keys, f"must be a mapping of keys to values, got {got!r}"
    message = error["msg"]
    return keys, f"{message[0].lower()}{message[1:]}, got {got!r}"
