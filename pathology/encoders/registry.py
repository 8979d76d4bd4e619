"""The encoder registry: one `Encoder` entry per name, registered by its family module.

An entry is data: how to build the network (`build(arch)` with a JSON-able `arch`), and everything that
defines its feature (input size and µm/px, resize interpolation and crop, mean/std, colour order,
precision, the pooling / token rule, dimension) plus the weight layouts it reads. Family modules are
imported on first use (`FAMILIES`), so importing the package builds nothing and imports no timm.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from histo.errors import HistoError
from pathology.encoders.weights import Layout

# One module per family; each registers its entries when imported.
FAMILIES = (
    "densenet",
    "cbr",
    "resnet",
    "uni",
    "virchow",
    "hoptimus",
    "phikon",
    "gigapath",
    "ctranspath",
    "conch",
)
EXTRA = "pip install 'histo[encoders]'"  # what installs the optional packages an entry may need
_REGISTRY: dict[str, Encoder] = {}
_loaded = False


@dataclass(frozen=True)
class Encoder:
    """A registered encoder: its network builder, preprocessing, pooling rule and weight layouts."""

    name: str
    family: str
    summary: str  # one line: the model and where its weights come from
    build: Callable[[Mapping[str, Any]], nn.Module]  # arch -> network; forward (N, 3, H, W) -> (N, D)
    arch: Mapping[str, Any]  # JSON-able architecture arguments (recorded in the feature definition)
    input_px: int
    mpp: float  # µm/px the encoder expects (0.5 = 20x)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    pooling: str  # the pooling / token rule, in words
    layouts: tuple[Layout, ...]
    weights: str  # the released file this entry reads
    interpolation: str = "bilinear"  # resize of a tile (crop) to the input, antialiased
    crop_pct: float = 1.0  # < 1: resize to input_px / crop_pct, then the central input_px (timm's rule)
    colour: str = "RGB"  # channel order the network expects (RGB or BGR)
    precision: str = "float32"
    flexible_input: bool = False  # another input size is meaningful (CNNs; ViTs with dynamic image size)
    requires: tuple[str, ...] = ()  # Python modules the builder imports (lane-2 extra)
    refused: str | None = None  # why this entry cannot be used, if it cannot
    histo_arch: str | None = None  # the histo arch whose BatchNorm checkpoints this entry also reads

    def with_arch(self, **changes: Any) -> Encoder:
        """The same entry with architecture arguments changed (e.g. a reduced depth in tests)."""
        return dataclasses.replace(self, arch={**self.arch, **changes})

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def check_usable(self) -> None:
        """HistoError (one line) when the entry is refused or its packages are missing."""
        if self.refused:
            raise HistoError(f"encoder {self.name!r} is not available: {self.refused}")
        missing = self.missing()
        if missing:
            raise HistoError(f"encoder {self.name!r} needs {', '.join(missing)}: {EXTRA}")

    def network(self) -> nn.Module:
        """The randomly initialised network (weights come from `weights.load_weights`)."""
        self.check_usable()
        return self.build(self.arch)


def register(encoder: Encoder) -> Encoder:
    """Add an entry; a name is registered once."""
    if encoder.name in _REGISTRY:
        raise ValueError(f"encoder {encoder.name!r} registered twice")
    _REGISTRY[encoder.name] = encoder
    return encoder


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for family in FAMILIES:
            importlib.import_module(f"pathology.encoders.{family}")
        _loaded = True


def names() -> list[str]:
    """Registered encoder names, in registration order (CNN baselines first)."""
    _load_families()
    return list(_REGISTRY)


def check_encoder(name: str) -> str:
    """`name` if registered, else ValueError listing the registered ones (for the typed configs)."""
    if name not in names():
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(names())} (see `histo encoders`)")
    return name


def get_encoder(name: str | Encoder) -> Encoder:
    """The entry `name` (an Encoder passes through); HistoError naming the known ones otherwise."""
    if isinstance(name, Encoder):
        return name
    _load_families()
    if name not in _REGISTRY:
        raise HistoError(
            f"unknown encoder {name!r}; registered: {', '.join(_REGISTRY)} (see `histo encoders`)"
        )
    return _REGISTRY[name]
