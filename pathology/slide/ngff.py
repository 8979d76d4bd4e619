"""OME-Zarr (OME-NGFF 0.4 and 0.5) multiscale metadata: which arrays are the pyramid levels, their axes,
their downsamples and the level-0 µm/px, read from the group's JSON and checked, so that a malformed
image is one line naming the folder (never a reader's traceback, never a guessed scale).

NGFF 0.4 keeps `multiscales` in `.zattrs` (zarr v2); 0.5 keeps it under `ome` in `zarr.json` (zarr v3).
The scale of a level is its dataset's `scale` transform times the multiscale's own (if any), in the axis
`unit`; the first multiscale is the image (as the specification says readers should take it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from histo.errors import InputFileError
from pathology.diagnose import os_reason

VERSIONS = ("0.4", "0.5")
# The length units of the specification (UDUNITS-2 names) a microscope scale may be given in, in µm.
MICRONS_PER_UNIT = {
    "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4,
    "meter": 1e6,
}  # fmt: skip
SPATIAL = ("y", "x")


@dataclass(frozen=True)
class Multiscale:
    """The image pyramid an NGFF group declares (before its arrays are opened)."""

    version: str
    axes: tuple[str, ...]  # axis names in array order, e.g. ("c", "y", "x")
    paths: tuple[str, ...]  # level arrays, level 0 (finest) first
    downsamples: tuple[float, ...]  # per level, from the scale transforms (x and y agree)
    mpp: tuple[float, float] | None  # level-0 µm/px (x, y); None when the axes carry no length unit
    has_omero: bool  # the `omero` rendering metadata (tiatoolbox's reader needs it)


def _group_attributes(path: Path) -> dict | None:
    """The NGFF attributes of the zarr group at `path` (0.4 `.zattrs` or 0.5 `zarr.json` `ome`), or
    None when `path` is no such group; a metadata file that cannot be read or parsed is an InputFileError."""
    for name in (".zattrs", "zarr.json"):
        meta = path / name
        if not meta.is_file():  # OSError when the folder cannot be looked into
            continue
        try:
            attrs = json.loads(meta.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputFileError(path, f"unreadable NGFF metadata {name}: {os_reason(e)}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputFileError(path, f"unreadable NGFF metadata {name}: {e}") from None
        if name == "zarr.json":
            attrs = attrs.get("attributes", {}).get("ome") if isinstance(attrs, dict) else None
        if isinstance(attrs, dict) and "multiscales" in attrs:
            return attrs
    return None


def is_ngff(path: Path) -> bool:
    """Whether `path` is a folder holding an OME-Zarr image (a group with `multiscales` metadata)."""
    try:
        return path.is_dir() and _group_attributes(path) is not None
    except InputFileError:
        return True  # an image whose metadata is damaged: opening it says why
    except OSError:
        return False  # a folder that cannot be looked into: searching it says why


METADATA_NAMES = (".zattrs", ".zgroup", ".zarray", "zarr.json")


def metadata_files(path: Path) -> list[Path]:
    """The group's and its arrays' metadata files, sorted."""
    folders = [path, *sorted(p for p in path.iterdir() if p.is_dir())]  # the group and its level arrays
    return [f / n for f in folders for n in METADATA_NAMES if (f / n).is_file()]


def identity_files(path: Path) -> list[Path]:
    """What identifies an image folder without reading its thousands of chunks: its metadata files and
    the first and last chunk file of level 0 (a re-exported image of the same shape and scale has the
    same metadata; its pixels differ there)."""
    level0 = path / read_multiscale(path).paths[0]
    chunks = sorted(p for p in level0.rglob("*") if p.is_file() and p.name not in METADATA_NAMES)
    return [*metadata_files(path), *chunks[:1], *chunks[1:][-1:]]


def _fail(path: Path, reason: str) -> InputFileError:
    return InputFileError(path, f"malformed NGFF multiscales metadata: {reason}")


def _scale(path: Path, transforms: object, n_axes: int, where: str) -> list[float]:
    """The `scale` of a coordinateTransformations list (a translation may follow; it moves no pixel)."""
    if not isinstance(transforms, list) or not transforms:
        raise _fail(path, f"{where} has no coordinateTransformations")
    first = transforms[0]
    scale = first.get("scale") if isinstance(first, dict) and first.get("type") == "scale" else None
    if not isinstance(scale, list) or len(scale) != n_axes:
        raise _fail(path, f"{where}: the first coordinateTransformation must be a scale of {n_axes} numbers")
    if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in scale):
        raise _fail(path, f"{where}: scale {scale} has a value that is not a positive number")
    return [float(v) for v in scale]


def _axes(path: Path, multiscale: dict) -> tuple[tuple[str, ...], str | None]:
    """Axis names and the common unit of y and x (None when they carry none)."""
    axes = multiscale.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, dict) and "name" in a for a in axes):
        raise _fail(path, "`axes` must be a list of {name, type, unit} objects")
    names = tuple(str(a["name"]).lower() for a in axes)
    if len(set(names)) != len(names) or not set(SPATIAL) <= set(names):
        raise _fail(path, f"axes {list(names)} must name y and x once each")
    units = {str(a.get("unit")) if a.get("unit") else None for a in axes if str(a["name"]).lower() in SPATIAL}
    if len(units) != 1:
        raise _fail(path, f"axes y and x have different units ({', '.join(sorted(map(str, units)))})")
    unit = units.pop()
    if unit is not None and unit not in MICRONS_PER_UNIT:
        raise _fail(path, f"axis unit {unit!r} is not a length unit ({', '.join(MICRONS_PER_UNIT)})")
    return names, unit


def read_multiscale(path: str | Path) -> Multiscale:
    """The first multiscale of the OME-Zarr image at `path`, checked; InputFileError naming the folder."""
    path = Path(path)
    try:
        attrs = _group_attributes(path) if path.is_dir() else None
    except OSError as e:
        raise InputFileError(path, os_reason(e)) from None
    if attrs is None:
        raise InputFileError(path, "not an OME-Zarr (NGFF) image: no multiscales in .zattrs or zarr.json")
    found = attrs["multiscales"]
    if not isinstance(found, list) or not found or not isinstance(found[0], dict):
        raise _fail(path, "`multiscales` must be a non-empty list")
    ms = found[0]
    version = str(ms.get("version") or attrs.get("version") or "")  # 0.4 in the multiscale, 0.5 beside it
    if version not in VERSIONS:
        raise _fail(path, f"version {version or '(none)'} is not one histo reads ({', '.join(VERSIONS)})")
    names, unit = _axes(path, ms)
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _fail(path, "`datasets` must list the pyramid levels")
    outer = ms.get("coordinateTransformations")
    overall = _scale(path, outer, len(names), "the multiscale") if outer else [1.0] * len(names)
    xy = [names.index("x"), names.index("y")]
    scales, paths = [], []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str) or not ds["path"]:
            raise _fail(path, f"datasets[{i}] has no path")
        s = _scale(path, ds.get("coordinateTransformations"), len(names), f"datasets[{i}] ({ds['path']})")
        scales.append([s[k] * overall[k] for k in xy])
        paths.append(ds["path"])
    downsamples = []
    for i, (sx, sy) in enumerate(scales):
        dx, dy = sx / scales[0][0], sy / scales[0][1]
        if abs(dx - dy) > 1e-3 * max(dx, dy):
            raise _fail(path, f"datasets[{i}] is downsampled {dx:g} in x but {dy:g} in y")
        if downsamples and dx < downsamples[-1] * (1 - 1e-6):
            raise _fail(path, f"datasets[{i}] is finer than datasets[{i - 1}] (levels go fine to coarse)")
        downsamples.append(dx)
    to_um = MICRONS_PER_UNIT.get(unit) if unit else None
    mpp = (scales[0][0] * to_um, scales[0][1] * to_um) if to_um else None
    return Multiscale(
        version, names, tuple(paths), tuple(downsamples), mpp, isinstance(attrs.get("omero"), dict)
    )
