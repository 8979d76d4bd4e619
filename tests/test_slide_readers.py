"""Slide readers behind one interface: the backend is chosen explicitly and recorded; a virtual slide
(array) reads like its pixels; tiatoolbox (lane 2) reads OME-TIFF, plain images, generic TIFF and DICOM
regions equal to what was written or to OpenSlide's read."""

from __future__ import annotations

import sys

import numpy as np
import openslide
import pytest

from histo.config import load_config
from histo.errors import ConfigError, HistoError, InputFileError
from pathology.config import TileConfig
from pathology.slide import open_array, open_slide
from pathology.slide.openslide_backend import composite_white
from pathology.store import TileStore
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import tile_slides


def test_array_slide_reads_its_pixels_and_white_outside():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    s = open_array(rgb, mpp=0.5, slide_id="patch")
    assert (s.width, s.height, s.mpp, s.mpp_source, s.reader.split()[0]) == (
        400,
        300,
        0.5,
        "metadata",
        "array",
    )
    np.testing.assert_array_equal(s.read_tile(50, 60, 100, 100), rgb[60:160, 50:150])
    assert (s.read_tile(390, 0, 20, 20)[:, 10:] == 255).all()
    down = s.read_tile(0, 0, 200, 100).astype(np.float64)  # box mean of 2 x 2 blocks
    ref = rgb[:200, :200].reshape(100, 2, 100, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - ref).max() <= 1.0


def test_reader_is_explicit_and_recorded(tmp_path, monkeypatch, shared_data):
    slide = write_synthetic_slide(tmp_path / "s" / "a.svs", 3000, 2000, 0, seed=0)
    assert open_slide(slide, reader="openslide").reader == f"openslide {openslide.__library_version__}"
    with pytest.raises(HistoError, match="unknown reader 'bioformats'"):
        open_slide(slide, reader="bioformats")
    png = shared_data / "histology_patches" / "kather1.tif"
    with pytest.raises(InputFileError, match="not a slide format OpenSlide can read"):
        open_slide(shared_data / "histology_patches" / "stardist_histo.jpg", reader="openslide")
    monkeypatch.setitem(sys.modules, "tiatoolbox", None)  # as in lane 1: the extra is absent
    with pytest.raises(InputFileError, match=r"install the extra histo\[tiatoolbox\]"):
        open_slide(shared_data / "histology_patches" / "stardist_histo.jpg")
    with pytest.raises(HistoError, match=r"needs the extra: pip install 'histo\[tiatoolbox\]'"):
        open_slide(png, reader="tiatoolbox", mpp_override=0.5)
    with pytest.raises(
        ConfigError, match=r"run\.reader: input should be 'auto', 'openslide', 'tiatoolbox' or 'ngff'"
    ):
        load_config(TileConfig, overrides={"run.reader": "bioformats"})
    cfg = load_config(TileConfig, overrides={"tile.px": 224, "run.reader": "openslide"})
    tile_slides([tmp_path / "s"], tmp_path / "st.zarr", cfg, progress=False)
    assert TileStore.open(tmp_path / "st.zarr").record("a").reader.startswith("openslide ")


def test_composite_white_is_shared_by_the_openslide_backend():
    from PIL import Image

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (100, 150, 200, 128)
    assert tuple(composite_white(Image.fromarray(rgba, "RGBA"))[0, 0]) == (177, 202, 227)


# ---- lane 2: tiatoolbox ------------------------------------------------------------------------------


def _ome_tiff(path, rgb: np.ndarray, mpp: float) -> None:
    """A pyramidal OME-TIFF (sub-IFDs, 2 levels) written with tifffile, physical size in the OME-XML."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tif:
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"}
        tif.write(rgb, subifds=1, tile=(256, 256), photometric="rgb", metadata=meta)
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(256, 256), photometric="rgb")


@pytest.mark.full
def test_tiatoolbox_reads_ome_tiff_like_the_array(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    _ome_tiff(tmp_path / "a.ome.tif", rgb, 0.5)
    s = open_slide(tmp_path / "a.ome.tif", reader="tiatoolbox")
    assert s.reader.startswith("tiatoolbox ") and "TIFFWSIReader" in s.reader
    assert (s.width, s.height) == (1536, 1024) and s.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(s.read_region(0, 300, 200, 128, 96), rgb[200:296, 300:428])
    auto = open_slide(tmp_path / "a.ome.tif")  # OpenSlide does not read OME-TIFF: auto takes tiatoolbox
    assert auto.reader.startswith("tiatoolbox ")


@pytest.mark.full
def test_tiatoolbox_matches_openslide_on_generic_tiff_and_dicom(shared_data, tmp_path):
    import tifffile

    rgb = np.random.default_rng(2).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", rgb, tile=(256, 256), photometric="rgb")  # one tiled page
    for path in (tmp_path / "tiled.tif", shared_data / "wsi_synthetic" / "boxes_0.dcm"):
        a = open_slide(path, reader="openslide", mpp_override=0.5)
        b = open_slide(path, reader="tiatoolbox", mpp_override=0.5)
        assert a.level_dimensions[0] == b.level_dimensions[0]
        w, h = a.width, a.height
        np.testing.assert_array_equal(a.read_region(0, 0, 0, w, h), b.read_region(0, 0, 0, w, h))
    a = open_slide(tmp_path / "tiled.tif", reader="tiatoolbox", mpp_override=0.5)
    np.testing.assert_array_equal(a.read_region(0, 100, 50, 300, 200), rgb[50:250, 100:400])
    # a multi-page generic TIFF pyramid is OpenSlide's alone (tiatoolbox 2.1 reads one tiled page)
    with pytest.raises(InputFileError, match="unreadable by tiatoolbox TIFFWSIReader: Unsupported TIFF"):
        open_slide(shared_data / "wsi_synthetic" / "boxes.tiff", reader="tiatoolbox", mpp_override=0.5)
    assert open_slide(shared_data / "wsi_synthetic" / "boxes.tiff", mpp_override=0.5).reader.startswith(
        "openslide"
    )


@pytest.mark.full
def test_tiatoolbox_reads_a_plain_image(shared_data):
    from PIL import Image

    path = shared_data / "histology_patches" / "stardist_histo.jpg"
    s = open_slide(path, mpp_override=0.5)
    assert s.reader.startswith("tiatoolbox ") and "VirtualWSIReader" in s.reader
    rgb = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(s.read_region(0, 10, 20, 64, 32), rgb[20:52, 10:74])


@pytest.mark.full
def test_tiatoolbox_reads_ngff_level_0_with_histos_scale(tmp_path):
    from slide_support import write_ngff

    rgb = np.random.default_rng(3).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    levels = write_ngff(tmp_path / "a.ome.zarr", rgb, 0.5, unit="nanometer")  # scale 500 nm
    s = open_slide(tmp_path / "a.ome.zarr", reader="tiatoolbox")
    assert "NGFFWSIReader" in s.reader and (s.width, s.height) == (1536, 1024)
    assert (s.mpp, s.mpp_source, s.objective_power) == (pytest.approx(0.5), "metadata", None)
    np.testing.assert_array_equal(s.read_region(0, 300, 200, 128, 96), rgb[200:296, 300:428])
    # tiatoolbox 2.1 gives NGFF pyramids one downsample: lower scales are resampled from level 0
    assert s.level_downsamples == (1.0,)
    half = s.read_tile(300, 200, 256, 128).astype(int)
    assert np.abs(half - levels[1][100:228, 150:278]).max() <= 1
    assert open_slide(tmp_path / "a.ome.zarr").reader.startswith("ngff ")  # auto: the pyramid reader
    write_ngff(tmp_path / "b.ome.zarr", rgb[:256, :256], 0.5, levels=1, version="0.5", axes="yxc")
    write_ngff(tmp_path / "c.ome.zarr", rgb[:256, :256], 0.5, levels=1, omero=False)
    for name, problem in (("b", r"NGFF 0\.5 \(it reads 0\.4\)"), ("c", r"no omero metadata \(it needs it\)")):
        with pytest.raises(
            InputFileError, match=rf"NGFFWSIReader cannot read this image: {problem}; use --reader ngff"
        ):
            open_slide(tmp_path / f"{name}.ome.zarr", reader="tiatoolbox")
        assert open_slide(tmp_path / f"{name}.ome.zarr", reader="ngff").width == 256


@pytest.mark.full
def test_tiatoolbox_reads_lossless_jpeg2000_with_its_resolution_box(tmp_path, shared_data):
    from PIL import Image
    from slide_support import write_jp2

    tissue = shared_data / "histology_patches" / "TCGA-HE-7130-01Z-00-DX1.png"
    rgb = np.asarray(Image.open(tissue).convert("RGB"))[:768, :1000]
    write_jp2(tmp_path / "a.jp2", rgb, mpp=0.25, levels=3)
    s = open_slide(tmp_path / "a.jp2")  # auto: OpenSlide does not read JP2, tiatoolbox does
    assert s.reader.startswith("tiatoolbox ") and "JP2WSIReader" in s.reader
    assert (s.mpp, s.mpp_source, s.objective_power) == (pytest.approx(0.25), "metadata", None)
    assert s.level_downsamples[:2] == (1.0, 2.0) and s.level_dimensions[:2] == ((1000, 768), (500, 384))
    np.testing.assert_array_equal(s.read_region(0, 300, 200, 128, 96), rgb[200:296, 300:428])
    # level 1 is the 5/3 wavelet's half-resolution image, as OpenJPEG decodes it through Pillow
    with Image.open(tmp_path / "a.jp2") as im:
        im.reduce = 1
        half = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(s.read_tile(200, 100, 600, 300), half[50:350, 100:400])
    write_jp2(tmp_path / "b.jp2", rgb, mpp=None)
    with pytest.raises(InputFileError, match=r"b\.jp2: no usable physical scale.*pass --mpp"):
        open_slide(tmp_path / "b.jp2")
    s = open_slide(tmp_path / "b.jp2", mpp_override=0.5)
    assert (s.mpp, s.mpp_source, s.objective_power) == (0.5, "override", None)


@pytest.mark.full
def test_openslide_and_tiatoolbox_read_a_written_dicom_wsi_series(tmp_path):
    from slide_support import write_dicom_wsi

    rgb = np.random.default_rng(4).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    levels = write_dicom_wsi(tmp_path / "case7", rgb, mpp=0.25, levels=2)
    for reader in ("auto", "openslide", "tiatoolbox"):  # any one file opens the series (both levels)
        s = open_slide(tmp_path / "case7" / "level_1.dcm", reader=reader)
        assert s.reader.split()[0] == ("openslide" if reader == "auto" else reader) and s.slide_id == "case7"
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.25), "metadata")
        assert s.level_downsamples == (1.0, 2.0) and s.level_dimensions == ((900, 700), (450, 350))
        np.testing.assert_array_equal(s.read_tile(300, 200, 128, 128), rgb[200:328, 300:428])
        np.testing.assert_array_equal(s.read_tile(300, 200, 256, 128), levels[1][100:228, 150:278])
        corner = s.read_region(0, 800, 600, 128, 128)  # past the edges (the padded last tiles): white
        np.testing.assert_array_equal(corner[:100, :100], rgb[600:, 800:])
        assert (corner[100:] == 255).all() and (corner[:, 100:] == 255).all()


def _root_unchanged_by(step: str, pythonpath: str | None = None) -> str:
    """Run `step` in a fresh interpreter; "True" when the root logger's handlers and level and the warnings
    hook are what they were before it (tiatoolbox's first import adds root handlers, captures warnings)."""
    import os
    import subprocess

    script = (
        "import logging, sys, warnings\n"
        "root = logging.getLogger()\n"
        "before = (list(root.handlers), root.level, warnings.showwarning)\n"
        f"{step}\n"
        "assert 'tiatoolbox' in sys.modules\n"
        "print((list(root.handlers), root.level, warnings.showwarning) == before)\n"
    )
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_importing_tiatoolbox_leaves_the_root_logger_as_it_was(tmp_path):
    """A stand-in tiatoolbox whose import does what tiatoolbox 2.1's does to the root logger."""
    fake = tmp_path / "tiatoolbox"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import logging, sys\n"
        "logging.captureWarnings(True)\n"
        "logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))\n"
        "logging.getLogger().setLevel(logging.INFO)\n"
    )
    helper = "from pathology.slide.tiatoolbox_backend import import_tiatoolbox; assert import_tiatoolbox()"
    assert _root_unchanged_by(helper, str(tmp_path)) == "True"
    assert _root_unchanged_by("import tiatoolbox", str(tmp_path)) == "False"  # the check can fail


@pytest.mark.full
def test_opening_an_ome_tiff_with_tiatoolbox_leaves_the_root_logger_as_it_was(tmp_path):
    _ome_tiff(tmp_path / "a.ome.tif", np.zeros((512, 512, 3), np.uint8), 0.5)
    step = f"from pathology.slide import open_slide; open_slide({str(tmp_path / 'a.ome.tif')!r})"
    assert _root_unchanged_by(step) == "True"
    assert _root_unchanged_by("import tiatoolbox") == "False"
