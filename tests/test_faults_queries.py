"""Issue 20, item 8: queries. A patch is checked against the index's tile (refused or warned by the search
config's `query.patch` bands, the rule recorded), a decompression bomb fails its query alone before any
pixel is decoded, and `histo search --mpp` scales query slides without a scale and query patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from faults_support import TILE, image_declaring, write_slides
from PIL import Image

from histo.cli import main

BOMB_SIDE = 50_000


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """3 synthetic slides (0.25 µm/px) tiled into 64 px tiles at 0.5 µm/px (32 µm), their index, a tile."""
    from pathology.kimianet import random_init_checkpoint
    from pathology.store import TileStore

    root = tmp_path_factory.mktemp("queries")
    slides = write_slides(root / "slides", 3)
    store, index = root / "store.zarr", root / "index"
    assert _search_cli(["tile", *slides, "--out", store, *TILE, "--save-pixels"])[0] == 0
    model = random_init_checkpoint(root / "m.pt", input_px=32)
    assert (
        _search_cli(["index", "--tiles", store, "--model", model, "--out", index, "--device", "cpu"])[0] == 0
    )
    tile = TileStore.open(store).read_selected("s1", [0])[0]
    return {"root": root, "slides": slides, "index": index, "tile": tile}


def _search_cli(args: list) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _search(built: dict, *args) -> tuple[int, dict, str]:
    """`histo search --json` on the module's index: exit code, the JSON (queries by name), stderr."""
    code, stdout, stderr = _search_cli(
        ["search", "--index", built["index"], *args, "--device", "cpu", "--json"]
    )
    assert "Traceback" not in stderr
    out = json.loads(stdout) if stdout else {}
    return code, out, stderr


def _queries(out: dict) -> dict:
    return {q["query"].rsplit("/", 1)[-1]: q for q in out["queries"]}


def _png(path, rgb, **kw):
    Image.fromarray(rgb).save(path, **kw)
    return path


def test_a_patch_far_from_the_tile_is_refused_near_it_warned_and_the_rule_recorded(built, tmp_path) -> None:
    t = built["tile"]  # 64 x 64 px: the index's tile
    patches = {
        "same.png": t,
        "small.png": t[:16, :16],  # 0.25 of the tile's side: refused
        "large.png": np.tile(t, (4, 4, 1)),  # 4 times: refused
        "near.png": t[:48, :48],  # 0.75: searched with a warning
        "wide.png": t[:40, :],  # 64 x 40: 1.6:1, searched with a warning
        "strip.png": t[:16, :],  # 64 x 16: 4:1 (and a quarter high), refused
    }
    paths = [_png(tmp_path / name, rgb) for name, rgb in patches.items()]
    code, out, stderr = _search(built, *paths)
    assert code == 1 and out["counts"] == {"done": 3, "skipped": 0, "failed": 3}
    q = _queries(out)
    assert q["same.png"]["search"]["query"] == {
        "kind": "patch", "px": [64, 64], "mpp": 0.5, "mpp_source": "assumed",
        "tile": {"px": 64, "mpp": 0.5, "um": 32.0}, "field_ratio": [1.0, 1.0], "resize": [1.0, 1.0],
        "rule": "as is", "warning": None,
    }  # fmt: skip
    assert q["same.png"]["results"][0]["slide_id"] == "s1"
    small = q["small.png"]["error"]
    assert small.startswith(f"{tmp_path / 'small.png'}: 16 x 16 px at 0.5 µm/px (assumed: the tile's)")
    assert "covers 0.25 x 0.25 of the index's 64 px tile at 0.5 µm/px (32 µm)" in small
    assert "must cover 0.5-2 times the tile's side" in small and "pass --mpp" in small
    assert q["small.png"]["results"] == [] and f"error: {small}" in stderr
    assert "covers 4 x 4 of the index's 64 px tile" in q["large.png"]["error"]
    assert "at most 2:1" in q["strip.png"]["error"]
    near = q["near.png"]["search"]["query"]
    assert (
        near["rule"] == "warned"
        and near["resize"] == [1.3333, 1.3333]
        and near["field_ratio"] == [0.75, 0.75]
    )
    assert "covers 0.75 x 0.75" in near["warning"] and f"warning: {tmp_path / 'near.png'}: " in stderr
    assert q["near.png"]["results"]
    wide = q["wide.png"]["search"]["query"]
    assert (
        wide["rule"] == "warned" and wide["resize"] == [1.0, 1.6] and "resized by 1 x 1.6" in wide["warning"]
    )
    assert stderr.strip().splitlines()[-1] == "3 done, 0 skipped, 3 failed"


def test_the_bands_come_from_the_search_config(built, tmp_path) -> None:
    near = _png(tmp_path / "near.png", built["tile"][:48, :48])
    cfg = tmp_path / "search.yaml"
    cfg.write_text("query:\n  patch:\n    refuse_below: 0.8\n    warn_below: 0.9\n")
    code, out, _ = _search(built, near, "--config", cfg)
    assert code == 1 and "must cover 0.8-2 times" in out["queries"][0]["error"]
    cfg.write_text("query:\n  patch:\n    warn_below: 0.3\n")
    code, _, stderr = _search(built, near, "--config", cfg)
    assert code == 2 and "query.patch.warn_below: need refuse_below <= warn_below <= 1" in stderr


def test_a_patch_takes_its_scale_from_mpp_then_its_metadata(built, tmp_path) -> None:
    t = built["tile"]
    small = _png(tmp_path / "small.png", t[::4, ::4])  # 16 px: at 2 µm/px it is the tile's 32 µm
    hires = _png(tmp_path / "hires.tif", np.kron(t, np.ones((2, 2, 1), np.uint8)), dpi=(101600, 101600))
    screen = _png(tmp_path / "screen.png", t[:16, :16], dpi=(72, 72))  # 352.8 µm/px: not a microscope's
    code, out, _ = _search(built, small, hires, screen, "--mpp", "2")
    q = _queries(out)
    assert q["small.png"]["search"]["query"]["mpp_source"] == "override"
    assert q["small.png"]["search"]["query"]["rule"] == "as is"
    assert q["small.png"]["search"]["query"]["resize"] == [4.0, 4.0]
    hires_error = q["hires.tif"]["error"]  # --mpp is over the metadata: 128 px at 2 µm/px is 8 tiles a side
    assert code == 1 and "128 x 128 px at 2 µm/px (--mpp) covers 8 x 8" in hires_error
    assert "pass --mpp" not in hires_error
    code, out, _ = _search(built, hires, screen)
    q = _queries(out)
    fit = q["hires.tif"]["search"]["query"]  # 128 px at 0.25 µm/px from its TIFF resolution tags
    assert fit["mpp_source"] == "metadata" and fit["mpp"] == pytest.approx(0.25)
    assert fit["rule"] == "as is" and fit["resize"] == [0.5, 0.5] and q["hires.tif"]["results"]
    assert "16 x 16 px at 0.5 µm/px (assumed: the tile's)" in q["screen.png"]["error"]


def test_a_decompression_bomb_fails_its_query_only_before_any_pixel_is_decoded(
    built, tmp_path, monkeypatch
) -> None:
    from PIL import ImageFile

    t, n = built["tile"], BOMB_SIDE
    bombs = [image_declaring(tmp_path / f"bomb.{ext}", t[:8, :8], n, n) for ext in ("png", "jpg", "tif")]
    good = _png(tmp_path / "good.png", t)
    decoded = []
    load = ImageFile.ImageFile.load

    def recorded_load(im):
        decoded.append(im.size)
        return load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded_load)
    gone = tmp_path / "gone.png"
    code, out, stderr = _search(built, bombs[0], good, *bombs[1:], gone)
    assert code == 1 and out["counts"] == {"done": 1, "skipped": 0, "failed": 4}
    q = _queries(out)
    assert q["gone.png"]["error"] == f"{gone}: file not found"
    for bomb in bombs:
        assert q[bomb.name]["error"] == (
            f"{bomb}: declares {n} x {n} px ({n * n:,} pixels), over the 67,108,864 a query image may have "
            "(search config query.max_pixels); refused before decoding it"
        )
        assert f"error: {q[bomb.name]['error']}" in stderr
    assert q["good.png"]["results"][0]["slide_id"] == "s1"
    assert set(decoded) == {(64, 64)}  # only the good patch was decoded
    assert stderr.strip().splitlines()[-1] == "1 done, 0 skipped, 4 failed"


def test_the_pixel_limit_is_the_search_configs(built, tmp_path) -> None:
    good = _png(tmp_path / "good.png", built["tile"])
    cfg = tmp_path / "search.yaml"
    cfg.write_text("query:\n  max_pixels: 4000\n")
    code, out, _ = _search(built, good, "--config", cfg)
    assert code == 1 and "declares 64 x 64 px (4,096 pixels), over the 4,000" in out["queries"][0]["error"]


def test_the_python_api_refuses_a_bomb_with_the_same_line(built, tmp_path) -> None:
    from histo.errors import InputFileError
    from search.slide_index import SlideIndex

    bomb = image_declaring(tmp_path / "bomb.png", built["tile"][:8, :8], BOMB_SIDE, BOMB_SIDE)
    with pytest.raises(
        InputFileError, match=r"bomb.png: declares 50000 x 50000 px .* refused before decoding"
    ):
        SlideIndex.open(built["index"], {"run": {"device": "cpu"}}).search(bomb)


def test_the_python_api_applies_the_field_of_view_rule_of_histo_search(built, tmp_path) -> None:
    """`SlideIndex.search(path)` checks a patch file as `histo search` does (one owner: file_query)."""
    from histo.errors import InputFileError
    from search.slide_index import SlideIndex

    index = SlideIndex.open(built["index"], {"run": {"device": "cpu"}})
    with pytest.raises(InputFileError, match=r"small.png: 16 x 16 px .* covers 0.25 x 0.25 of the index's"):
        index.search(_png(tmp_path / "small.png", built["tile"][:16, :16]))
    near = index.search(_png(tmp_path / "near.png", built["tile"][:48, :48]))
    assert near.info["query"]["rule"] == "warned" and near.info["query"]["resize"] == [1.3333, 1.3333]
    same = index.search(_png(tmp_path / "same.png", built["tile"]))
    assert same.info["query"]["rule"] == "as is" and same.to_dict()["results"][0]["slide_id"] == "s1"


def test_mpp_scales_a_query_slide_without_a_scale(built, tmp_path) -> None:
    from pathology.synthetic import write_synthetic_slide

    bare = write_synthetic_slide(tmp_path / "s0_bare.svs", 1600, 1200, 0, seed=0, scale=False)  # s0's pixels
    code, out, stderr = _search(built, bare, built["slides"][2])
    assert code == 1 and out["counts"]["failed"] == 1
    error = _queries(out)["s0_bare.svs"]["error"]
    assert (
        error == f"{bare}: no usable physical scale: no MPP, objective power or resolution tags; pass --mpp"
    )
    code, out, stderr = _search(built, bare, built["slides"][2], "--mpp", "0.25")
    assert code == 0, stderr
    q = _queries(out)
    assert q["s0_bare.svs"]["search"]["query"] == {"kind": "slide", "mpp": 0.25, "mpp_source": "override"}
    top = q["s0_bare.svs"]["results"][0]
    assert top["slide_id"] == "s0" and top["distance"] == 0  # tiled as s0 was: the same tiles
    assert q["s2.svs"]["search"]["query"] == {"kind": "slide", "mpp": 0.25, "mpp_source": "metadata"}


def test_mpp_scales_a_real_svs_without_a_scale(built, shared_data) -> None:
    tcga = shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    code, out, _ = _search(built, tcga)
    assert code == 1 and out["queries"][0]["error"].endswith("pass --mpp")
    code, out, stderr = _search(built, tcga, "--mpp", "0.5")
    assert code == 0, stderr
    q = out["queries"][0]
    assert q["search"]["query"] == {"kind": "slide", "mpp": 0.5, "mpp_source": "override"} and q["results"]


@pytest.mark.parametrize(
    "value, reason",
    [
        ("0", "input should be greater than 0, got 0.0"),
        ("-1", "input should be greater than 0, got -1.0"),
        ("inf", "input should be a finite number, got inf"),
        ("nan", "input should be a finite number, got nan"),
    ],
)
def test_mpp_must_be_a_positive_finite_number(built, value, reason) -> None:
    code, stdout, stderr = _search_cli(
        ["search", "--index", built["index"], built["slides"][0], f"--mpp={value}"]
    )
    assert code == 2 and stderr.strip() == f"error: --mpp: query.mpp: {reason}" and stdout == ""


def test_search_slide_tiles_a_slide_without_a_scale_at_the_configs_mpp(built, tmp_path) -> None:
    """`SlideIndex.search_slide(path)` tiles as `search` does: `query.mpp` where the file has no scale."""
    from histo.errors import InputFileError
    from pathology.synthetic import write_synthetic_slide
    from search.slide_index import SlideIndex

    bare = write_synthetic_slide(tmp_path / "s0_bare.svs", 1600, 1200, 0, seed=0, scale=False)
    with pytest.raises(InputFileError, match="no usable physical scale"):
        SlideIndex.open(built["index"], {"run": {"device": "cpu"}}).search_slide(bare)
    scaled = SlideIndex.open(built["index"], {"run": {"device": "cpu"}, "query": {"mpp": 0.25}})
    result = scaled.search_slide(bare)
    assert (
        result.query == str(bare) and result.results[0].slide_id == "s0" and result.results[0].distance == 0
    )
