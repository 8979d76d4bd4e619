"""OME-Zarr (NGFF 0.4 and 0.5) through histo's own zarr backend: a pyramid written with zarr reads back at
physical scale exactly as written (level 0 and the lower levels), its µm/px comes from the
coordinateTransformations in their unit, and malformed metadata is one line naming the folder."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import openslide
import pytest
from slide_support import write_ngff

from histo.errors import InputFileError
from pathology.config import TileConfig
from pathology.slide import open_slide
from pathology.slide.blosc_check import blosc_problem
from pathology.store import TileStore
from pathology.tiler import find_slides, tile_slides

RGB = np.random.default_rng(5).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)


@pytest.fixture
def no_tiatoolbox(monkeypatch):
    """As in lane 1: the tiatoolbox extra is absent."""
    monkeypatch.setitem(sys.modules, "tiatoolbox", None)


@pytest.mark.parametrize(
    ("version", "axes", "unit", "per_unit"),
    [
        ("0.4", "cyx", "micrometer", 1.0),
        ("0.5", "yxc", "nanometer", 1e3),
        ("0.4", "tczyx", "millimeter", 1e-3),
    ],
)
def test_pyramid_reads_back_at_physical_scale(tmp_path, no_tiatoolbox, version, axes, unit, per_unit):
    path = tmp_path / "a.ome.zarr"
    levels = write_ngff(path, RGB, 0.5, axes=axes, unit=unit, version=version)
    meta = path / (".zattrs" if version == "0.4" else "zarr.json")
    assert json.loads(meta.read_text())  # the scale written is 0.5 µm in the axis unit
    s = open_slide(path)  # auto: histo's backend, with or without the extra
    assert s.reader.startswith("ngff ") and f"NGFF {version}" in s.reader
    assert (s.mpp, s.mpp_source) == (pytest.approx(0.5), "metadata")
    assert s.level_downsamples == (1.0, 2.0, 4.0)
    assert s.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
    # 64 µm tiles at 0.5, 1 and 2 µm/px come from levels 0, 1 and 2 unresampled
    np.testing.assert_array_equal(s.read_tile(300, 200, 128, 128), RGB[200:328, 300:428])
    np.testing.assert_array_equal(s.read_tile(300, 200, 256, 128), levels[1][100:228, 150:278])
    np.testing.assert_array_equal(s.read_tile(400, 200, 512, 128), levels[2][50:178, 100:228])
    np.testing.assert_array_equal(s.read_at_mpp(2.0), levels[2])
    edge = s.read_tile(1500, 1000, 64, 64)  # past the right and bottom edges: white, as on glass
    np.testing.assert_array_equal(edge[:24, :36], RGB[1000:, 1500:])
    assert (edge[24:] == 255).all() and (edge[:, 36:] == 255).all()


def test_scale_without_a_unit_needs_mpp(tmp_path, no_tiatoolbox):
    path = tmp_path / "a.ome.zarr"
    write_ngff(path, RGB, 0.5, unit=None)
    with pytest.raises(InputFileError, match=r"a\.ome\.zarr: no usable physical scale.*pass --mpp"):
        open_slide(path)
    s = open_slide(path, mpp_override=0.25)
    assert (s.mpp, s.mpp_source, s.level_downsamples) == (0.25, "override", (1.0, 2.0, 4.0))


def _edit(multiscale: dict, edit: str) -> None:
    """One way a writer can get the multiscale metadata wrong."""
    ds = multiscale["datasets"]
    if edit == "no-transform":
        del ds[1]["coordinateTransformations"]
    elif edit == "short-scale":
        ds[0]["coordinateTransformations"][0]["scale"] = [0.5, 0.5]
    elif edit == "zero-scale":
        ds[2]["coordinateTransformations"][0]["scale"][1] = 0
    elif edit == "unit":
        for axis in multiscale["axes"][1:]:
            axis["unit"] = "furlong"
    elif edit == "mixed-units":
        multiscale["axes"][1]["unit"] = "nanometer"
    elif edit == "version":
        multiscale["version"] = "0.3"
    elif edit == "order":
        ds.reverse()
    elif edit == "anisotropic":
        ds[1]["coordinateTransformations"][0]["scale"][1] *= 2
    elif edit == "wrong-downsample":  # level 1 declared 3x coarser than level 0 (it is 2x)
        ds[1]["coordinateTransformations"][0]["scale"] = [1.0, 1.5, 1.5]
    elif edit == "missing-level":
        ds[2]["path"] = "7"
    elif edit == "no-x":
        multiscale["axes"][2]["name"] = "q"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ("no-transform", r"datasets\[1\] \(1\) has no coordinateTransformations"),
        (
            "short-scale",
            r"datasets\[0\] \(0\): the first coordinateTransformation must be a scale of 3 numbers",
        ),
        ("zero-scale", r"datasets\[2\] \(2\): scale .* not a positive number"),
        ("unit", r"axis unit 'furlong' is not a length unit"),
        ("mixed-units", r"axes y and x have different units \(micrometer, nanometer\)"),
        ("version", r"version 0\.3 is not one histo reads \(0\.4, 0\.5\)"),
        ("order", r"datasets\[1\] is finer than datasets\[0\]"),
        ("anisotropic", r"datasets\[1\] is downsampled 2 in x but 4 in y"),
        ("wrong-downsample", r"level 1 \(1\) is 384 px in x, but its scale says 256 px \(768 px / 3\)"),
        ("missing-level", r"unreadable NGFF level array"),
        ("no-x", r"axes \['c', 'y', 'q'\] must name y and x once each"),
    ],
)
def test_malformed_metadata_is_one_line_naming_the_folder(tmp_path, edit, reason):
    path = tmp_path / "bad.ome.zarr"
    write_ngff(path, RGB[:512, :768], 0.5)
    attrs = json.loads((path / ".zattrs").read_text())
    _edit(attrs["multiscales"][0], edit)
    (path / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(InputFileError, match=reason) as e:
        open_slide(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_damaged_or_unusable_images_are_one_line(tmp_path):
    path = tmp_path / "bad.ome.zarr"
    write_ngff(path, RGB[:512, :768], 0.5)
    (path / ".zattrs").write_text('{"multiscales": [')  # cut short
    with pytest.raises(InputFileError, match=r"bad\.ome\.zarr: unreadable NGFF metadata \.zattrs"):
        open_slide(path)
    with pytest.raises(InputFileError, match=r"not an OME-Zarr \(NGFF\) image: no multiscales"):
        open_slide(tmp_path, reader="ngff")
    gray = np.zeros((512, 768, 3), np.uint8)
    write_ngff(tmp_path / "z.ome.zarr", gray, 0.5, axes="czyx")
    import zarr

    zarr.open_group(tmp_path / "z.ome.zarr", mode="a", zarr_format=2).create_array(
        "0", data=np.zeros((3, 4, 512, 768), np.uint8), overwrite=True
    )
    with pytest.raises(
        InputFileError, match=r"level 0 \(0\) has \{'z': 4\} planes: histo reads one 2-D plane"
    ):
        open_slide(tmp_path / "z.ome.zarr")
    fluo = tmp_path / "f.ome.zarr"
    write_ngff(fluo, gray, 0.5)
    zarr.open_group(fluo, mode="a", zarr_format=2).create_array(
        "0", data=np.zeros((5, 512, 768), np.uint16), overwrite=True
    )
    with pytest.raises(
        InputFileError, match=r"level 0 \(0\) is uint16 with 5 channels: histo reads RGB uint8"
    ):
        open_slide(fluo)


def test_blosc_problem_reads_the_frames_own_length():
    """Against numcodecs' own frames: whole is fine; cut short, padded or shorter than a header is not."""
    import numcodecs

    frame = bytes(numcodecs.Blosc().encode(RGB[:64, :64].tobytes()))
    assert blosc_problem(frame) is None
    assert blosc_problem(frame[:-1]) == f"{len(frame) - 1} bytes where its Blosc header says {len(frame)}"
    assert blosc_problem(frame + b"\0") == f"{len(frame) + 1} bytes where its Blosc header says {len(frame)}"
    assert blosc_problem(frame[:10]) == "10 bytes, shorter than a Blosc header"


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_truncated_blosc_chunk_is_a_read_error_not_wrong_pixels(tmp_path, no_tiatoolbox, zarr_format):
    """numcodecs decodes a Blosc chunk cut short into wrong pixels without an error (it reads past the end of
    the buffer, so the test does not show it); the NGFF backend refuses it naming the slide and the chunk."""
    import numcodecs
    import zarr

    path = tmp_path / "cut.ome.zarr"
    write_ngff(path, RGB[:512, :768], 0.5, version="0.4" if zarr_format == 2 else "0.5")
    blosc = numcodecs.Blosc() if zarr_format == 2 else zarr.codecs.BloscCodec()
    level0 = np.ascontiguousarray(RGB[:512, :768].transpose(2, 0, 1))
    group = zarr.open_group(path, mode="a", zarr_format=zarr_format)
    group.create_array("0", data=level0, chunks=(3, 256, 256), compressors=blosc, overwrite=True)
    np.testing.assert_array_equal(open_slide(path).read_region(0, 0, 0, 768, 512), RGB[:512, :768])
    chunk = path / "0" / ("0.0.0" if zarr_format == 2 else "c/0/0/0")
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[: len(whole) // 2])
    key = "0.0.0" if zarr_format == 2 else "c/0/0/0"
    with pytest.raises(
        InputFileError, match=rf"damaged chunk {key}: {len(whole) // 2} bytes where its Blosc"
    ) as e:
        open_slide(path).read_region(0, 0, 0, 768, 512)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    np.testing.assert_array_equal(  # chunks not cut still read
        open_slide(path).read_region(0, 512, 256, 256, 256), RGB[256:512, 512:768]
    )


def test_tiling_finds_the_image_folder_and_records_its_reader(tmp_path, shared_data, no_tiatoolbox):
    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    with openslide.OpenSlide(svs) as osr:
        rgb = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
        mpp = float(osr.properties["openslide.mpp-x"])
    slides = tmp_path / "slides"
    write_ngff(slides / "cmu.ome.zarr", rgb, mpp, levels=1)  # one level, as the .svs it copies
    shutil.copy(svs, slides / "cmu_svs.svs")
    assert find_slides([slides]) == [slides / "cmu.ome.zarr", slides / "cmu_svs.svs"]
    assert find_slides([slides / "cmu.ome.zarr"]) == [slides / "cmu.ome.zarr"]
    cfg = TileConfig.coerce(None).updated({"tile.px": 224})
    tile_slides([slides], tmp_path / "st.zarr", cfg, progress=False)
    store = TileStore.open(tmp_path / "st.zarr")
    ngff, svs_rec = store.record("cmu.ome"), store.record("cmu_svs")
    assert ngff.status == "done" and ngff.reader.startswith("ngff ") and ngff.mpp_source == "metadata"
    assert ngff.mpp == pytest.approx(svs_rec.mpp) and ngff.n_selected > 0
    identity = ngff.identity()
    assert identity.known() and identity.path == str((slides / "cmu.ome.zarr").resolve())
    # The same pixels at the same scale: the same tiles, scored the same, as the slide it was copied from.
    np.testing.assert_array_equal(store.coords("cmu.ome"), store.coords("cmu_svs"))
    np.testing.assert_array_equal(store.cellularity("cmu.ome"), store.cellularity("cmu_svs"))


def test_histo_tile_reads_a_folder_of_images_and_fails_a_malformed_one(tmp_path, shared_data):
    from click.testing import CliRunner
    from PIL import Image

    from histo.cli import main

    tissue = shared_data / "histology_patches" / "TCGA-HE-7130-01Z-00-DX1.png"
    rgb = np.asarray(Image.open(tissue).convert("RGB"))
    write_ngff(tmp_path / "in" / "good.ome.zarr", rgb, 0.5, levels=2)
    write_ngff(tmp_path / "in" / "nested" / "bad.ome.zarr", rgb[:256, :256], 0.5, levels=2)
    attrs = json.loads((tmp_path / "in" / "nested" / "bad.ome.zarr" / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"].reverse()
    (tmp_path / "in" / "nested" / "bad.ome.zarr" / ".zattrs").write_text(json.dumps(attrs))
    args = ["tile", str(tmp_path / "in"), "--out", str(tmp_path / "st.zarr"), "--tile-px", "64", "--json"]
    result = CliRunner().invoke(main, [*args, "--reader", "ngff"])
    assert result.exit_code == 1, result.output
    rows = {r["id"]: r for r in json.loads(result.stdout)["outcomes"]}
    assert rows["good.ome"]["status"] == "done" and rows["good.ome"]["detail"]["mpp_source"] == "metadata"
    assert rows["bad.ome"]["status"] == "failed"
    reason = rows["bad.ome"]["reason"]
    assert reason.startswith("malformed NGFF multiscales metadata: datasets[1] is finer"), reason
    assert TileStore.open(tmp_path / "st.zarr").record("good.ome").reader.startswith("ngff ")
    # Re-exported with other pixels of the same shape and scale: byte-identical metadata, other chunks.
    write_ngff(tmp_path / "in" / "good.ome.zarr", np.ascontiguousarray(rgb[::-1]), 0.5, levels=2)
    again = CliRunner().invoke(
        main, ["tile", str(tmp_path / "in" / "good.ome.zarr"), *args[2:], "--reader", "ngff"]
    )
    assert again.exit_code == 1, again.output
    (row,) = json.loads(again.stdout)["outcomes"]
    assert row["status"] == "failed" and "good.ome.zarr changed since" in row["reason"], row


def test_an_image_whose_metadata_cannot_be_read_says_why(tmp_path):
    from faults_support import run_unprivileged

    path = tmp_path / "cohort" / "a.ome.zarr"
    write_ngff(path, RGB[:256, :256], 0.5, levels=1)
    (path / ".zattrs").chmod(0o000)
    args = ["tile", str(tmp_path / "cohort"), "--out", str(tmp_path / "s.zarr"), "--tile-px", "64", "--json"]
    result = run_unprivileged(args)
    assert result.returncode == 1, result.stderr
    (row,) = json.loads(result.stdout)["outcomes"]
    assert (row["id"], row["status"]) == ("a.ome", "failed")
    assert row["reason"].startswith("unreadable NGFF metadata .zattrs: permission denied"), row
