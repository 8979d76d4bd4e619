"""QuPath GeoJSON, both ways: a slide's tissue outline and tiles out, regions of interest in.

QuPath (0.4+) reads and writes a FeatureCollection of Features in level-0 pixel coordinates whose
`properties` hold `objectType` ("annotation", "detection", "tile", "cell"), an optional `classification`
({"name": ..., "color": [r, g, b]}, or "names" for a derived class, or a plain string) and `measurements`
({name: number}; QuPath 0.2 wrote a list of {"name", "value"}). histo writes:
    the tissue outline       one annotation, class "Tissue", a (Multi)Polygon with holes
    each mosaic tile         a detection, class "Mosaic tile" or "High-cellularity tile" (the selected),
                             measurements cluster, cellularity and tile (its index in the store)
and reads annotations (detections and cells are analysis results, not regions: they are counted and left
out) as regions with their class names. Geometry goes through shapely; an invalid polygon, a geometry
without area or one that leaves the slide is a one-line error naming the file and the feature.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import InputFileError
from histo.io import atomic_write_text

TISSUE = ("Tissue", [0, 160, 0])
MOSAIC = ("Mosaic tile", [80, 80, 200])
SELECTED = ("High-cellularity tile", [220, 40, 40])
BOUNDS_TOLERANCE = 1.0  # level-0 px a region may overshoot the slide edge (QuPath's float rounding)


def feature(
    geometry: dict,
    object_type: str,
    cls: tuple[str, list[int]],
    measurements: dict | None = None,
    name: str | None = None,
) -> dict:
    """A QuPath object: its type, class (name, colour), numeric measurements and an optional name."""
    props: dict[str, Any] = {"objectType": object_type, "classification": {"name": cls[0], "color": cls[1]}}
    if name is not None:
        props["name"] = name
    if measurements:
        props["measurements"] = measurements
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def square(x: float, y: float, size: float) -> dict:
    """A GeoJSON Polygon: the square tile with level-0 corner (x, y) and side `size`."""
    x1, y1 = x + size, y + size
    return {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]}


def mask_outline(mask: np.ndarray, width: int, height: int) -> Any:
    """The tissue of a boolean mask spanning the slide as a shapely (Multi)Polygon with holes, level-0 px.

    Rings are the 0.5 iso-contours of the padded mask (closed); with high values on their left, outer
    boundaries have negative and holes positive shoelace area in (column, row). Each hole goes to the
    smallest outer ring containing it, so islands inside holes stay polygons of their own."""
    import shapely
    from skimage.measure import find_contours

    sx, sy = width / mask.shape[1], height / mask.shape[0]
    outers, holes = [], []
    for c in find_contours(np.pad(mask.astype(np.float32), 1), 0.5, positive_orientation="high"):
        xy = np.stack([(c[:, 1] - 0.5) * sx, (c[:, 0] - 0.5) * sy], axis=1)  # pad offset, pixel centres
        x, y = c[:, 1], c[:, 0]
        area = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if len(xy) >= 4:
            (outers if area < 0 else holes).append(shapely.Polygon(xy))
    outers.sort(key=lambda p: p.area)
    rings: list[list] = [[] for _ in outers]
    for hole in holes:
        point = hole.representative_point()
        for i, outer in enumerate(outers):
            if outer.area > hole.area and outer.contains(point):
                rings[i].append(hole.exterior.coords)
                break
    polygons = [shapely.Polygon(o.exterior.coords, r) for o, r in zip(outers, rings, strict=True)]
    return shapely.make_valid(shapely.MultiPolygon(polygons)) if polygons else shapely.MultiPolygon()


def tile_features(coords: np.ndarray, size: float, cluster: np.ndarray, cellularity: np.ndarray,
                  selected: np.ndarray) -> list[dict]:  # fmt: skip
    """Every mosaic tile as a QuPath detection with its cluster, cellularity and index."""
    return [
        feature(
            square(int(x), int(y), size),
            "detection",
            SELECTED if sel else MOSAIC,
            {"cluster": int(c), "cellularity": float(v), "tile": i},
        )
        for i, ((x, y), c, v, sel) in enumerate(zip(coords, cluster, cellularity, selected, strict=True))
    ]


def store_slide_features(store: Any, slide_id: str, slide: Any) -> list[dict]:
    """A store slide as QuPath features: tissue outline (recomputed from the slide with the store's tissue
    settings, and the regions it was tiled with, if any) and every mosaic tile."""
    import shapely

    from pathology.tiler import slide_tissue, tiling_config

    rec = store.record(slide_id)
    cfg = tiling_config(store.params, str(store.path))
    _, mask, _ = slide_tissue(slide, cfg, None if rec.roi is None else Path(rec.roi))
    outline = mask_outline(mask, slide.width, slide.height)
    features = []
    if not outline.is_empty:
        features.append(feature(json.loads(shapely.to_geojson(outline)), "annotation", TISSUE))
    features += tile_features(
        store.coords(slide_id), rec.tile_size_level0, store.cluster(slide_id),
        store.cellularity(slide_id), store.selected(slide_id),
    )  # fmt: skip
    return features


def write_geojson(path: str | os.PathLike, features: Iterable[dict]) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects, or drag and drop), written atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": list(features)}))
    return path


# ---- reading regions of interest -------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One annotation read from a GeoJSON file: its class name (None when unclassified) and geometry."""

    name: str | None
    geometry: Any  # shapely Polygon or MultiPolygon, level-0 px


def _class_name(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            return c["name"]
        if isinstance(c.get("names"), list):
            return ": ".join(map(str, c["names"]))  # QuPath's derived-class separator
    return None


def _features_of(doc: Any, path: Path) -> list[dict]:
    """The Features of a FeatureCollection, a Feature, a list of Features (QuPath 0.2) or a bare geometry."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
            return doc["features"]
        if doc.get("type") == "Feature":
            return [doc]
        if "coordinates" in doc or doc.get("type") == "GeometryCollection":
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise InputFileError(path, "not GeoJSON (no FeatureCollection, Feature or geometry)")


def read_regions(path: str | os.PathLike, width: int, height: int) -> tuple[list[Region], int]:
    """The annotations of a QuPath GeoJSON file as regions checked against a width x height slide, and
    the number of other objects (detections, cells, tiles) left out."""
    import shapely
    from shapely.validation import explain_validity

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(path, f"cannot read: {e}") from None
    except ValueError as e:
        raise InputFileError(path, f"not valid JSON ({e})") from None
    regions, others = [], 0
    for i, feat in enumerate(_features_of(doc, path)):
        where = f"feature {i}"
        props = feat.get("properties") or {} if isinstance(feat, dict) else None
        if not isinstance(props, dict) or not isinstance(feat.get("geometry"), dict):
            raise InputFileError(path, f"{where}: not a Feature with a geometry and properties")
        kind = props.get("objectType", props.get("object_type", props.get("type", "annotation")))
        if kind not in ("annotation", "PathAnnotationObject"):
            others += 1
            continue
        try:
            geom = shapely.from_geojson(json.dumps(feat["geometry"]))
        except (shapely.errors.GEOSException, ValueError) as e:
            raise InputFileError(path, f"{where}: malformed geometry ({str(e).splitlines()[0]})") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise InputFileError(path, f"{where}: a {geom.geom_type} has no area (regions are polygons)")
        if not geom.is_valid:
            raise InputFileError(path, f"{where}: invalid polygon ({explain_validity(geom)})")
        if geom.area <= 0:
            raise InputFileError(path, f"{where}: a polygon without area")
        x0, y0, x1, y1 = geom.bounds
        t = BOUNDS_TOLERANCE
        if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
            raise InputFileError(
                path,
                f"{where}: outside the {width}x{height} slide (bounds {x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})",
            )
        regions.append(Region(_class_name(props), geom))
    return regions, others


def rasterize(regions: Iterable[Region], shape: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Boolean mask (shape) of the pixels whose centres lie inside any region (holes excluded)."""
    from skimage.draw import polygon as fill

    out = np.zeros(shape, bool)
    sx, sy = width / shape[1], height / shape[0]
    for region in regions:
        for poly in getattr(region.geometry, "geoms", [region.geometry]):
            inside = np.zeros(shape, bool)
            ext = np.asarray(poly.exterior.coords)
            inside[fill(ext[:, 1] / sy - 0.5, ext[:, 0] / sx - 0.5, shape)] = True
            for ring in poly.interiors:
                r = np.asarray(ring.coords)
                inside[fill(r[:, 1] / sy - 0.5, r[:, 0] / sx - 0.5, shape)] = False
            out |= inside
    return out
