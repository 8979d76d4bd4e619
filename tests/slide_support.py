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


def write_dicom_wsi(
    folder: Path, rgb: np.ndarray, mpp: float, levels: int = 2, tile: int = 256
) -> list[np.ndarray]:
    """A DICOM-WSI series (VL Whole Slide Microscopy, TILED_FULL, uncompressed RGB frames): one file per
    pyramid level, the µm/px in the Pixel Spacing of the shared functional groups; its levels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference, pyramid_uid = (generate_uid() for _ in range(4))
    levels_rgb = pyramid(rgb, levels)
    for i, a in enumerate(levels_rgb):
        h, w = a.shape[:2]
        ny, nx = -(-h // tile), -(-w // tile)
        padded = np.zeros((ny * tile, nx * tile, 3), np.uint8)
        padded[:h, :w] = a
        frames = padded.reshape(ny, tile, nx, tile, 3).transpose(0, 2, 1, 3, 4)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.ImageType = [
            "ORIGINAL" if i == 0 else "DERIVED",
            "PRIMARY",
            "VOLUME",
            "NONE" if i == 0 else "RESAMPLED",
        ]
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PyramidUID = frame_of_reference, pyramid_uid
        ds.Modality, ds.Manufacturer, ds.InstanceNumber = "SM", "histo tests", i + 1
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime, ds.ContainerIdentifier = (
            "",
            "",
            "",
            "",
            "SLIDE_1",
        )
        ds.SpecimenDescriptionSequence = Sequence([Dataset()])
        ds.SpecimenDescriptionSequence[0].SpecimenIdentifier = "SPECIMEN_1"
        ds.SpecimenDescriptionSequence[0].SpecimenUID = generate_uid()
        ds.VolumetricProperties, ds.DimensionOrganizationType = "VOLUME", "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows = ds.Columns = tile
        ds.NumberOfFrames = ny * nx
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        spacing_mm = mpp * 1e-3 * 2**i
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = (
            w * spacing_mm,
            h * spacing_mm,
            0.0,
        )
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0, 0
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        path_ = Dataset()
        path_.OpticalPathIdentifier = "0"
        illumination = Dataset()
        illumination.CodeValue, illumination.CodingSchemeDesignator = "111744", "DCM"
        illumination.CodeMeaning = "Brightfield illumination"
        path_.IlluminationTypeCodeSequence = Sequence([illumination])
        ds.OpticalPathSequence = Sequence([path_])
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = 0
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        ds.save_as(folder / f"level_{i}.dcm", enforce_file_format=True)
    return levels_rgb
