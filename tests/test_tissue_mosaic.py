"""Tissue mask and Yottixel mosaic against float64 loop references; determinism; pyramid independence."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from histo.config import load_config
from pathology import slide as slide_mod
from pathology import tissue as tissue_mod
from pathology.config import TileConfig
from pathology.mosaic import (
    Grid,
    box_means,
    colour_features,
    select_mosaic,
    spatial_pick,
    tile_grid,
    tissue_fractions,
)
from pathology.slide import open_slide
from pathology.synthetic import write_synthetic_slide
from pathology.tiler import EmptyMosaicError, tile_slide
from pathology.tissue import brightfield_problem, hsd_density, hsd_mask, tissue_mask

DATA = SHARED_DATA
CMU = DATA / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "s.svs", 4000, 3000, 2, seed=5)


@pytest.fixture(scope="module")
def cfg() -> TileConfig:
    return load_config(TileConfig, overrides={"tile.px": 224})  # 112 µm tiles: 448 level-0 px at 0.25 µm/px


def test_hsd_density_matches_definition():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ref = np.zeros((5, 7))
    for i in range(5):
        for j in range(7):
            ods = [-math.log(max(v / 255.0, np.finfo(float).eps)) for v in rgb[i, j]]
            ref[i, j] = sum(ods) / 3
    np.testing.assert_allclose(hsd_density(rgb), ref, rtol=1e-12)


def test_hsd_mask_matches_loop_reference():
    rng = np.random.default_rng(1)
    rgb = np.full((12, 10, 3), 250, np.uint8)
    rgb[3:9, 2:7] = rng.integers(60, 200, (6, 5, 3))
    rgb[0, 9] = (200, 200, 201)  # grey: std < 5, becomes white
    got = hsd_mask(rgb, 5.0, 0.05, 3)
    h, w = 12, 10
    std = rgb.astype(float).std(axis=2)
    clean = rgb.copy()
    clean[std < 5] = 255
    dens = hsd_density(clean)

    def mirror(k, n):  # scipy "mirror" / OpenCV BORDER_REFLECT_101
        return -k if k < 0 else (2 * (n - 1) - k if k >= n else k)

    ref = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            m = np.mean([dens[mirror(i + a, h), mirror(j + b, w)] for a in (-1, 0, 1) for b in (-1, 0, 1)])
            ref[i, j] = std[i, j] >= 5 and m >= 0.05
    np.testing.assert_array_equal(got, ref)


def test_hsd_mask_row_blocks_and_bounded_memory(monkeypatch):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (1024, 300, 3), dtype=np.uint8)
    rgb[100:400] = 250  # background rows straddling block edges
    whole = hsd_mask(rgb, 5.0, 0.05, 7)
    plane3 = rgb.size * 8  # bytes of one float64 copy of the image
    tracemalloc.start()
    try:
        brightfield_problem(rgb, 100.0)
        lum_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        blocked = tissue_mod.hsd_mask(rgb, 5.0, 0.05, 7)
        mask_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask_peak < 1.2 * plane3 and lum_peak < 0.8 * plane3  # were 2.8x and 1.3x
    np.testing.assert_array_equal(blocked, whole)
    monkeypatch.setattr(tissue_mod, "ROW_BLOCK", 7)  # many blocks with a ragged last one
    np.testing.assert_array_equal(hsd_mask(rgb, 5.0, 0.05, 7), whole)
    assert whole.any() and not whole.all()


def test_tissue_fractions_match_supersampled_loop():
    rng = np.random.default_rng(2)
    mask = rng.random((13, 17)) > 0.5
    width, height, size = 1000, 780, 230.0  # mask pixel = 58.8 x 60 level-0 px; tiles straddle pixels
    grid = Grid.of(width, height, size)
    got = tissue_fractions(mask, grid, width, height).reshape(grid.n_rows, grid.n_cols)
    sx, sy = width / 17, height / 13
    for r in range(grid.n_rows):
        for c in range(grid.n_cols):
            n = 400  # midpoint rule on a 400 x 400 lattice inside the tile
            ys = r * size + (np.arange(n) + 0.5) * size / n
            xs = c * size + (np.arange(n) + 0.5) * size / n
            sub = mask[np.floor(ys / sy).astype(int)][:, np.floor(xs / sx).astype(int)]
            assert got[r, c] == pytest.approx(sub.mean(), abs=0.01)


def test_colour_box_means_per_channel_in_one_plane_of_memory():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (600, 400, 3), dtype=np.uint8)
    grid = Grid.of(40000, 60000, 1900.0)
    tracemalloc.start()
    try:
        got = box_means(image, grid, 40000, 60000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * image.size * 8  # was a float64 copy of all three channels
    per_channel = [box_means(np.ascontiguousarray(image[..., c]), grid, 40000, 60000) for c in range(3)]
    np.testing.assert_allclose(got, np.stack(per_channel, axis=1), rtol=1e-12)


def test_grid_origins_are_whole_tiles_inside():
    grid = Grid.of(2220, 2967, 1002.004)
    o = grid.origins()
    assert (grid.n_cols, grid.n_rows) == (2, 2)
    assert o.tolist() == [[0, 0], [1002, 0], [0, 1002], [1002, 1002]]


def _supersampled(mask: np.ndarray, grid: Grid, width: int, height: int, n: int = 300) -> np.ndarray:
    """Per tile (tissue fraction of its part inside the slide, mean with white outside), midpoint rule."""
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    fractions, means = [], []
    for x0, y0 in grid.origins().tolist():
        xs = x0 + (np.arange(n) + 0.5) * grid.size / n
        ys = y0 + (np.arange(n) + 0.5) * grid.size / n
        inside = (ys < height)[:, None] & (xs < width)[None, :]
        cols = np.minimum(np.floor(xs / sx).astype(int), mask.shape[1] - 1)
        rows = np.minimum(np.floor(ys / sy).astype(int), mask.shape[0] - 1)
        values = mask[rows][:, cols].astype(float)
        fractions.append(values[inside].mean())
        means.append(np.where(inside, values, 255.0).mean())
    return np.array(fractions), np.array(means)


def _mosaic(**keys):
    """The mosaic section of the default tile config with `keys` changed (validated)."""
    return TileConfig.coerce({"mosaic": keys}).mosaic


def test_grid_options_partial_edges_and_tissue_anchor_against_a_loop():
    rng = np.random.default_rng(8)
    width, height, size = 1000, 780, 230.0
    mask = np.zeros((13, 17), bool)
    mask[3:11, 4:15] = rng.random((8, 11)) > 0.3  # tissue box: level-0 x 235..882, y 180..660
    opts = {"edge_tiles": "whole", "grid_anchor": "slide"}
    assert tile_grid(width, height, size, mask, _mosaic(**opts)) == Grid.of(width, height, size)
    partial = tile_grid(width, height, size, mask, _mosaic(**{**opts, "edge_tiles": "partial"}))
    assert (partial.x0, partial.y0, partial.n_cols, partial.n_rows) == (0, 0, 5, 4)  # ceil(1000 / 230) ...
    anchored = tile_grid(width, height, size, mask, _mosaic(edge_tiles="partial", grid_anchor="tissue"))
    x0, y0 = math.floor(4 * width / 17), math.floor(3 * height / 13)
    assert (anchored.x0, anchored.y0) == (x0, y0) and anchored.origins()[0].tolist() == [x0, y0]
    assert (anchored.n_cols, anchored.n_rows) == (
        math.ceil((math.ceil(15 * width / 17) - x0) / size),
        math.ceil((math.ceil(11 * height / 13) - y0) / size),
    )
    whole_anchored = tile_grid(width, height, size, mask, _mosaic(edge_tiles="whole", grid_anchor="tissue"))
    assert (whole_anchored.n_cols, whole_anchored.n_rows) == ((width - x0) // 230, (height - y0) // 230)
    for grid in (partial, anchored):
        fractions, means = _supersampled(mask, grid, width, height)
        np.testing.assert_allclose(tissue_fractions(mask, grid, width, height), fractions, atol=0.01)
        np.testing.assert_allclose(box_means(mask.astype(float), grid, width, height), means, atol=2.0)
    assert (
        tile_grid(
            width, height, size, np.zeros_like(mask), _mosaic(**{**opts, "grid_anchor": "tissue"})
        ).n_cols
        == 0
    )


def test_unknown_grid_option_is_a_config_error():
    from histo.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"mosaic\.edge_tiles: input should be 'whole' or 'partial', got 'pad'"
    ):
        _mosaic(edge_tiles="pad")
    with pytest.raises(ConfigError, match=r"mosaic\.grid_anchor: input should be 'slide' or 'tissue'"):
        _mosaic(grid_anchor="mask")


def test_small_real_specimen_fails_naming_the_options_and_tiles_with_partial_edges(tmp_path):
    """CMU-1-Small-Region (2220 x 2967 px at 0.499 µm/px): no whole 1000 px tile at 20x is 70 % tissue."""
    from pathology.store import TileStore
    from pathology.tiler import tile_slides

    base = load_config(TileConfig)
    with pytest.raises(EmptyMosaicError) as e:
        tile_slide(CMU, base)
    message = str(e.value)
    assert "none of 4 grid tiles is >= 70% tissue" in message and "\n" not in message
    assert "mosaic.edge_tiles: partial" in message and "mosaic.grid_anchor: tissue" in message
    partial = load_config(TileConfig, overrides={"mosaic.edge_tiles": "partial"})
    summary = tile_slides([CMU], tmp_path / "t.zarr", partial, save_pixels=True, progress=False)
    assert [o.status for o in summary.outcomes] == ["done"]
    store = TileStore.open(tmp_path / "t.zarr")
    assert (
        store.params["mosaic"]["edge_tiles"] == "partial" and store.params["mosaic"]["grid_anchor"] == "slide"
    )
    slide_id = store.slide_ids()[0]
    assert store.coords(slide_id).tolist() == [[1002, 2004]]  # the bottom edge tile: 963 of its 1002 px rows
    tile = store.read_selected(slide_id)[0]
    inside_rows = round((2967 - 2004) / 1002.004 * 1000)
    assert (tile[inside_rows + 2 :] == 255).all()  # read padded with background (white)
    assert tile[: inside_rows - 2].mean() < 240  # the part on the slide is tissue
    assert store.cellularity(slide_id)[0] > 0


def test_selection_rule_counts_and_determinism():
    rng = np.random.default_rng(3)
    feats = np.concatenate([rng.normal(c * 40, 3, (n, 3)) for c, n in enumerate([40, 25, 7, 1])])
    pos = rng.integers(0, 100, (len(feats), 2)).astype(float)
    idx, cl = select_mosaic(feats, pos, n_clusters=4, percent=15, seed=0)
    sizes = sorted(max(1, int(n * 15 / 100)) for n in (40, 25, 7, 1))
    assert sorted(np.bincount(cl).tolist()) == sizes
    assert len(set(idx.tolist())) == len(idx) and (np.diff(idx) > 0).all()
    idx2, cl2 = select_mosaic(feats, pos, n_clusters=4, percent=15, seed=0)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(cl, cl2)
    few, _ = select_mosaic(feats[:3], pos[:3], n_clusters=9, percent=15, seed=0)  # k = min(9, n)
    assert len(few) == 3


def test_spatial_pick_takes_nearest_real_tiles():
    pos = np.array([[0, 0], [0, 1], [10, 10], [10, 11], [50, 50]], float)
    picked = spatial_pick(pos, 3, seed=0)
    assert sorted(picked.tolist()) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])


def test_colour_features_match_per_tile_reads_and_level0(synthetic):
    s = open_slide(synthetic)
    grid = Grid.of(s.width, s.height, 448.0)
    which = [5, 6, 7, 20, 22, 40]
    origins = grid.origins()[which]  # a run of 3 adjacent tiles and singles
    got = colour_features(s, origins, grid, mpp=2.0)
    from_thumbnail = box_means(s.read_at_mpp(8.0), grid, s.width, s.height)[which]  # the default path
    np.testing.assert_allclose(from_thumbnail, got, atol=2.0)
    for (x, y), f in zip(origins, got, strict=True):
        one = s.read_tile(x, y, 448.0, 56).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(f, one, atol=0.5)
        level0 = s.read_region(0, x, y, 448, 448).reshape(-1, 3).astype(np.float64).mean(0)
        np.testing.assert_allclose(f, level0, atol=3.0)  # pyramid level vs level 0: JPEG differences


def test_mask_does_not_depend_on_pyramid(synthetic, cfg, monkeypatch):
    s = open_slide(synthetic)
    with_pyramid = tissue_mask(s.read_at_mpp(8.0), cfg.tissue, 8.0)
    monkeypatch.setattr(slide_mod.Slide, "best_level", lambda self, ds: 0)  # as if level 0 were all there is
    level0_only = tissue_mask(s.read_at_mpp(8.0), cfg.tissue, 8.0)
    assert with_pyramid.shape == level0_only.shape
    assert (with_pyramid != level0_only).mean() < 0.01


def test_tile_slide_is_deterministic_inside_and_on_tissue(synthetic, cfg):
    a, b = tile_slide(synthetic, cfg), tile_slide(synthetic, cfg)
    for name in ("coords", "cluster", "cellularity", "selected"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    rec = a.record
    assert rec.n_mosaic == len(a.coords) > 0 and rec.n_selected == a.selected.sum() >= 1
    size = rec.tile_size_level0
    assert size == pytest.approx(448.0)
    assert (a.coords >= 0).all() and (a.coords[:, 0] + size <= rec.width).all()
    assert (a.coords[:, 1] + size <= rec.height).all()
    grid = Grid.of(rec.width, rec.height, size)
    fractions = tissue_fractions(a.mask, grid, rec.width, rec.height)
    index = {tuple(o): k for k, o in enumerate(grid.origins().tolist())}
    assert all(fractions[index[tuple(c)]] >= 0.7 for c in a.coords.tolist())
    # The selected tiles are the most cellular ones (top 20 %).
    assert a.cellularity[a.selected].min() >= a.cellularity[~a.selected].max()
    tiles = a.read_tiles("selected")
    assert tiles.shape == (a.selected.sum(), 224, 224, 3) and tiles.dtype == np.uint8


def test_min_score_rule_keeping_nothing_is_a_failure_with_reason(synthetic, cfg):
    strict = cfg.updated({"cellularity.rule": "min_score", "cellularity.min_score": 1.0})  # all nuclei
    with pytest.raises(EmptyMosaicError, match=r"s\.svs: no high-cellularity tile.*min_score 1\.0") as e:
        tile_slide(synthetic, strict)
    ts = e.value.tileset
    assert ts.record.status == "failed" and ts.record.n_mosaic == len(ts.coords) > 0  # mosaic kept for QC
    assert not ts.selected.any()


def test_nuclei_density_option_scores_the_mosaic_in_nuclei_per_mm2(synthetic, cfg):
    dense = cfg.updated({"cellularity.score": "nuclei_density"})
    a, b = tile_slide(synthetic, cfg), tile_slide(synthetic, dense)
    np.testing.assert_array_equal(a.coords, b.coords)  # the mosaic does not depend on the score
    assert a.cellularity.max() <= 1.0 < b.cellularity.max()  # a fraction vs nuclei per mm²
    assert b.cellularity[b.selected].min() >= b.cellularity[~b.selected].max()


def test_otsu_option_and_real_slide(cfg):
    ts = tile_slide(CMU, cfg)
    assert ts.record.n_mosaic > 0 and ts.record.mpp_source == "metadata"
    otsu = cfg.updated({"tissue.method": "otsu"})
    ts2 = tile_slide(CMU, otsu)
    assert ts2.record.n_mosaic > 0
    overlap = (ts.mask & ts2.mask).sum() / max(1, (ts.mask | ts2.mask).sum())
    assert overlap > 0.5  # two different rules that still agree on where the tissue is


def test_kmeans_matches_scikit_learn():
    from sklearn.cluster import KMeans

    from pathology.mosaic import kmeans

    rng = np.random.default_rng(7)
    centres = rng.uniform(0, 255, (6, 3))
    points = np.concatenate([rng.normal(c, 4.0, (rng.integers(5, 60), 3)) for c in centres])
    labels, _ = kmeans(points, 6, seed=0)
    ref = KMeans(n_clusters=6, n_init=10, random_state=0).fit(points)
    # Same partition up to the naming of clusters, and the same inertia.
    pairs = set(zip(labels.tolist(), ref.labels_.tolist(), strict=True))
    assert len(pairs) == 6
    inertia = sum(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum() for j in range(6))
    assert inertia == pytest.approx(ref.inertia_, rel=1e-9)
    dup = np.repeat(points[:2], 5, axis=0)  # fewer distinct points than k
    labels, _ = kmeans(dup, 4, seed=0)
    assert len(np.unique(labels)) <= 2 + 2 and labels.shape == (10,)
