"""Slide files written the way their tools write them, for the reader tests: OME-Zarr (NGFF 0.4/0.5) with
zarr, JPEG 2000 with glymur (lane 2), DICOM-WSI with pydicom (lane 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyramid(rgb: np.ndarray, levels: int) -> list[np.ndarray]:
    """`rgb` and its 2x box-mean reductions (rounded), as NGFF writers (ome-zarr-py, bioformats2raw) make."""
    out = [rgb]
    for _ in range(levels - 1):
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        mean = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float64).mean(axis=(1, 3))
        out.append(np.round(mean).astype(np.uint8))
    return out


def ngff_metadata(levels: int, mpp: float, axes: str, unit: str | None, version: str) -> dict:
    """The `multiscales` (and `omero`) of an RGB pyramid at `mpp` µm/px per level-0 pixel, `unit` on y/x."""
    kinds = {"c": "channel", "y": "space", "x": "space", "z": "space", "t": "time"}
    per_um = {"micrometer": 1.0, "nanometer": 1e3, "millimeter": 1e-3, None: 1.0}[unit]
    axes_meta = [{"name": a, "type": kinds[a]} | ({"unit": unit} if unit and a in "yx" else {}) for a in axes]
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": [mpp * per_um * 2**i if a in "yx" else 1.0 for a in axes]}
            ],
        }
        for i in range(levels)
    ]
    ms = {"axes": axes_meta, "datasets": datasets, "name": "slide"} | (
        {"version": version} if version == "0.4" else {}
    )
    channels = [
        {"label": n, "color": c, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
        for n, c in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
    ]
    omero = {"name": "slide", "version": version, "channels": channels, "rdefs": {"model": "color"}}
    return {"multiscales": [ms], "omero": omero}


def write_ngff(
    path: Path,
    rgb: np.ndarray,
    mpp: float,
    levels: int = 3,
    axes: str = "cyx",
    unit: str | None = "micrometer",
    version: str = "0.4",
    omero: bool = True,
) -> list[np.ndarray]:
    """An OME-Zarr RGB pyramid (NGFF 0.4 in zarr v2, or 0.5 in zarr v3) with 256 px chunks; its levels."""
    import zarr

    levels_rgb = pyramid(rgb, levels)
    meta = ngff_metadata(levels, mpp, axes, unit, version)
    if not omero:
        del meta["omero"]
    root = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    for i, a in enumerate(levels_rgb):
        data = np.transpose(a, ["yxc".index(k) for k in axes if k in "yxc"]).reshape(
            [a.shape["yxc".index(k)] if k in "yxc" else 1 for k in axes]
        )
        chunks = [256 if k in "yx" else data.shape[j] for j, k in enumerate(axes)]
        root.create_array(str(i), data=data, chunks=chunks)
    root.attrs.update(meta if version == "0.4" else {"ome": {"version": version, **meta}})
    return levels_rgb


def write_jp2(path: Path, rgb: np.ndarray, mpp: float | None, levels: int = 3) -> None:
    """A lossless (reversible 5/3) tiled JPEG 2000 file with `levels` resolutions, its µm/px in the JP2
    capture resolution box when given (glymur and OpenJPEG, as tiatoolbox's tests write one)."""
    import glymur

    tmp = path.with_suffix(".bare.jp2")
    glymur.Jp2k(tmp, data=rgb, numres=levels, tilesize=(256, 256), irreversible=False)
    jp2 = glymur.Jp2k(tmp)
    if mpp is not None:
        per_m = 1e6 / mpp
        boxes = jp2.box
        header = next(b for b in boxes if b.box_id == "jp2h")
        res = glymur.jp2box.ResolutionBox([glymur.jp2box.CaptureResolutionBox(per_m, per_m)])
        header.box.append(res)
        jp2.wrap(path, boxes=boxes)
        tmp.unlink()
    else:
        tmp.rename(path)
