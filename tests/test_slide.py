"""Slide reading: physical scale resolution, level choice by downsample, bounded scaled reads, bad files."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from conftest import SHARED_DATA

from histo.errors import InputFileError
from pathology.slide import base as slide_mod
from pathology.slide import open_slide, openslide_backend, resolve_scale, slide_id_of
from pathology.synthetic import write_synthetic_slide

DATA = SHARED_DATA
WSI, FIXTURES = DATA / "wsi", DATA / "wsi_synthetic"
CMU, TCGA, NDPI = (
    WSI / "CMU-1-Small-Region.svs",
    WSI / "tcga-cr-7395-01a-01-ts1.svs",
    WSI / "test3-DAPI-2-387.ndpi",
)


def test_shared_data_present():
    # CI has the shared data: a missing folder must fail loudly, not skip.
    for f in (CMU, TCGA, NDPI, FIXTURES / "boxes.tiff", FIXTURES / "small.svs", FIXTURES / "boxes_0.dcm"):
        assert f.is_file(), f"missing shared test file {f}"


def test_scale_from_metadata_and_override_only_as_fallback():
    s = open_slide(CMU)
    assert (s.mpp, s.mpp_source, s.objective_power, s.vendor) == (0.499, "metadata", 20.0, "aperio")
    assert open_slide(CMU, mpp_override=0.25).mpp == 0.499  # metadata wins over the fallback override
    with pytest.raises(InputFileError, match=r"tcga-cr-7395.*no usable physical scale"):
        open_slide(TCGA)
    t = open_slide(TCGA, mpp_override=0.5)
    assert (t.mpp, t.mpp_source) == (0.5, "override")
    d = open_slide(FIXTURES / "boxes_0.dcm")
    assert (d.vendor, d.mpp_source, d.slide_id) == ("dicom", "metadata", "wsi_synthetic")


def test_scale_order_objective_power_then_tiff_resolution():
    assert resolve_scale({"openslide.objective-power": "20"}, "aperio", None, "x") == slide_mod.Scale(
        0.5, "objective-power"
    )
    tiff = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "tiff.ResolutionUnit": "centimeter"}
    assert resolve_scale(tiff, "generic-tiff", 0.3, "x") == slide_mod.Scale(0.25, "tiff-resolution")
    both = {**tiff, "openslide.objective-power": "40"}
    assert resolve_scale(both, "generic-tiff", None, "x").source == "objective-power"


def test_implausible_tiff_resolution_is_rejected_with_reason():
    # boxes.tiff carries 72 dpi-like resolution tags (352.8 µm/px): not a microscope scale.
    with pytest.raises(InputFileError, match=r"tiff-resolution gives 352.8"):
        open_slide(FIXTURES / "boxes.tiff")
    assert open_slide(FIXTURES / "boxes.tiff", mpp_override=0.5).mpp_source == "override"


def test_synthetic_formats_open_with_their_scale(tmp_path):
    svs = open_slide(write_synthetic_slide(tmp_path / "a.svs", 1200, 900, 0, 0, fmt="svs"))
    assert (svs.vendor, svs.mpp, svs.mpp_source, svs.objective_power) == ("aperio", 0.25, "metadata", 40.0)
    tif = open_slide(write_synthetic_slide(tmp_path / "b.tiff", 1200, 900, 1, 0, fmt="tiff", mpp=0.5))
    assert (
        tif.vendor == "generic-tiff" and tif.mpp == pytest.approx(0.5) and tif.mpp_source == "tiff-resolution"
    )


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.svs", b"", "empty file"),
        ("text.svs", b"this is not a slide\n" * 50, "not a slide format"),
        ("missing.svs", None, "file not found"),
    ],
)
def test_bad_files_raise_one_line_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputFileError, match=reason) as e:
        open_slide(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_slide_fails_on_open_or_read(tmp_path):
    path = tmp_path / "cut.svs"
    path.write_bytes(CMU.read_bytes()[: CMU.stat().st_size // 2])
    with pytest.raises(InputFileError, match=r"cut\.svs"):
        s = open_slide(path)
        s.read_at_mpp(0.5)  # the header may survive; the tile data does not


def test_best_level_by_downsample_not_index():
    s = open_slide(NDPI)  # downsamples 1, 2, 4, ..., 64 (an NDPI-like pyramid)
    assert s.best_level(5.3) == 2 and s.best_level(4.0) == 2 and s.best_level(0.5) == 0
    assert open_slide(CMU).best_level(16.0) == 0  # single level: level 0, never a missing level 1


def test_read_tile_matches_direct_level_read():
    s = open_slide(NDPI)
    got = s.read_tile(1000, 1200, 1000.0, 250)  # exactly level 2 (downsample 4)
    raw = np.asarray(openslide.OpenSlide(str(NDPI)).read_region((1000, 1200), 2, (250, 250)))[..., :3]
    np.testing.assert_array_equal(got, raw)


def test_read_scaled_is_box_mean_of_level0(monkeypatch):
    s = open_slide(CMU)
    x0, y0, side, out = 300, 500, 400, 50  # factor 8 from the only level
    got = s.read_tile(x0, y0, side, out).astype(np.float64)
    level0 = np.asarray(openslide.OpenSlide(str(CMU)).read_region((x0, y0), 0, (side, side)))[..., :3]
    ref = np.zeros((out, out, 3))
    for i in range(out):  # float64 loop reference: mean of each 8 x 8 block
        for j in range(out):
            ref[i, j] = level0[i * 8 : i * 8 + 8, j * 8 : j * 8 + 8].reshape(-1, 3).mean(0)
    assert np.abs(got - ref).max() <= 1.0


def test_scaled_reads_are_bounded_in_memory(monkeypatch):
    s = open_slide(CMU)
    sizes = []
    original = slide_mod.Slide.read_region

    def spy(self, level, x0, y0, w, h):
        sizes.append(w * h)
        return original(self, level, x0, y0, w, h)

    monkeypatch.setattr(slide_mod, "BLOCK_OUT_PX", 128)
    monkeypatch.setattr(slide_mod.Slide, "read_region", spy)
    img = s.read_at_mpp(1.0)  # whole slide at half resolution from the single level
    assert img.shape == (round(2967 * 0.499), round(2220 * 0.499), 3)
    assert len(sizes) > 40 and max(sizes) <= (128 * 2 + 2) ** 2
    # A large downsample with no pyramid level for it: reads stay bounded by MAX_READ_PX, not the output.
    sizes.clear()
    monkeypatch.setattr(slide_mod, "MAX_READ_PX", 256)
    thumb = s.read_at_mpp(8.0)  # factor 16 from level 0
    assert thumb.shape == (185, 138, 3) and max(sizes) <= (256 + 16) ** 2


def test_read_outside_slide_is_white_and_read_errors_name_the_file(monkeypatch):
    s = open_slide(CMU)
    assert (s.read_tile(s.width + 10, 0, 100, 10) == 255).all()

    def broken(self, *a, **k):
        raise openslide.OpenSlideError("TIFFRGBAImageGet failed")

    monkeypatch.setattr(openslide.OpenSlide, "read_region", broken)
    with pytest.raises(InputFileError, match=r"CMU-1-Small-Region.svs: read error .*TIFFRGBAImageGet"):
        s.read_tile(0, 0, 100, 10)


def test_slide_id():
    assert slide_id_of("/a/b/TCGA-XX-0001-01Z-00-DX1.svs") == "TCGA-XX-0001-01Z-00-DX1"
    assert slide_id_of("/a/series/img_0.dcm") == "series"
    assert slide_id_of("/a/...svs") == ".."


def test_partly_transparent_pixels_are_composited_over_white():
    """openslide-python returns straight (not premultiplied) RGBA: out = rgb * a + 255 * (1 - a)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    rgba[0, 0] = (100, 150, 200, 128)
    rgba[0, 1] = (0, 0, 0, 0)  # outside the slide
    got = openslide_backend.composite_white(Image.fromarray(rgba, "RGBA"))
    a = rgba[..., 3:].astype(np.float64) / 255.0
    expected = np.floor(rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5)
    np.testing.assert_array_equal(got, expected.astype(np.uint8))
    assert tuple(got[0, 0]) == (177, 202, 227) and tuple(got[0, 1]) == (255, 255, 255)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(
        openslide_backend.composite_white(Image.fromarray(opaque, "RGBA")), rgba[..., :3]
    )
