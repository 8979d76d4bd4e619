"""H&E tile corruptions: identity, monotone severity, range/dtype, determinism, the formulas, the physical
scale of the spatial ones, and the registry (a throwaway corruption run through `histo robustness`)."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
from skimage import color

from pathology import corruptions as he
from pathology.corruptions import (
    CORRUPTIONS,
    REFERENCE_MPP,
    corrupt_tiles,
    disk_kernel,
    hsv_to_rgb,
    motion_kernel,
    register,
    rgb_to_hsv,
    spatial_scale,
)

RANDOM = ("motion_blur", "gaussian_noise", "stain", "pen_marking", "bubble", "out_of_focus_patch")


def he_tile(size: int = 96, seed: int = 0) -> np.ndarray:
    """A synthetic H&E-like tile: pink stroma with purple nuclei and fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.zeros((size, size, 3)) + np.array([232, 168, 200])
    img += rng.normal(0, 6, size=(size, size, 1))
    for _ in range(25):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 6)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        img[inside] = np.array([85, 55, 150]) + rng.normal(0, 5, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return he_tile()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_identity_dtype_and_monotone(name: str, tile: np.ndarray) -> None:
    fn = CORRUPTIONS[name]
    assert np.array_equal(fn(tile, 0, np.random.default_rng(0)), tile)
    values = []
    for severity in range(1, 6):
        out = fn(tile, severity, np.random.default_rng(7))
        assert out.dtype == np.uint8 and out.shape == tile.shape
        values.append(psnr(tile, out))
    assert all(np.isfinite(values)), values
    assert all(a > b for a, b in itertools.pairwise(values)), f"{name}: PSNR not falling {values}"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_batch_shape_and_determinism(name: str, tile: np.ndarray) -> None:
    batch = np.stack([tile, he_tile(seed=1)])
    a = corrupt_tiles(batch, name, 3, seed=5, chunk=1)
    b = corrupt_tiles(batch, name, 3, seed=5, chunk=1)
    assert a.shape == batch.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(a, corrupt_tiles(batch, name, 3, seed=5, chunk=1, workers=2))
    if name in RANDOM:
        assert not np.array_equal(a, corrupt_tiles(batch, name, 3, seed=6, chunk=1))


def test_bad_input_is_refused(tile: np.ndarray) -> None:
    with pytest.raises(ValueError):
        CORRUPTIONS["jpeg"](tile.astype(np.float32), 1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        CORRUPTIONS["jpeg"](tile, 6, np.random.default_rng(0))
    with pytest.raises(ValueError):
        corrupt_tiles(tile[None], "snow", 1, seed=0)


def test_gaussian_noise_std_matches_sigma() -> None:
    grey = np.full((128, 128, 3), 128, np.uint8)
    out = CORRUPTIONS["gaussian_noise"](grey, 1, np.random.default_rng(0)).astype(np.float64)
    sigma = CORRUPTIONS["gaussian_noise"].severities[0] * 255
    assert abs((out - 128).mean()) < 0.5
    assert abs((out - 128).std() / sigma - 1) < 0.02


def test_contrast_matches_float64_definition(tile: np.ndarray) -> None:
    c = CORRUPTIONS["contrast"].severities[2]
    x = tile / 255.0
    mean = x.mean(axis=(0, 1))
    expected = np.clip(np.rint(((x - mean) * c + mean) * 255), 0, 255)
    out = CORRUPTIONS["contrast"](tile, 3, np.random.default_rng(0))
    assert np.abs(out - expected).max() <= 1


@pytest.mark.parametrize(("name", "channel"), [("brightness", 2), ("saturation", 1), ("hue", 0)])
def test_hsv_shifts_match_colorsys(name: str, channel: int, tile: np.ndarray) -> None:
    shift = CORRUPTIONS[name].severities[1]
    out = CORRUPTIONS[name](tile, 2, np.random.default_rng(0))
    for y, x in [(3, 5), (40, 41), (77, 12), (90, 90)]:
        hsv = list(colorsys.rgb_to_hsv(*(tile[y, x] / 255.0)))
        hsv[channel] = (hsv[channel] + shift) % 1.0 if channel == 0 else min(1.0, hsv[channel] + shift)
        expected = np.array(colorsys.hsv_to_rgb(*hsv)) * 255
        assert np.abs(out[y, x] - expected).max() <= 1.0, (y, x, out[y, x], expected)


def test_hsv_conversion_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 40, 3)).astype(np.float32)
    x[:4] = 0.5  # grey: hue 0 by skimage's convention
    x[4:8] = 0.0
    x[8:12, :, 1] = x[8:12, :, 0]  # ties between maxima
    hsv = rgb_to_hsv(x)
    assert np.allclose(hsv, color.rgb2hsv(x.astype(np.float64)), atol=1e-6)
    assert np.allclose(hsv_to_rgb(hsv), color.hsv2rgb(hsv.astype(np.float64)), atol=1e-6)
    assert np.allclose(hsv_to_rgb(hsv), x, atol=1e-6)


def test_pixelate_makes_constant_blocks() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    out = CORRUPTIONS["pixelate"](img, 2, rng).astype(int)  # factor 0.5: exact 2x2 box means
    blocks = img.reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
    assert np.abs(out[::2, ::2] - blocks).max() <= 1
    assert np.array_equal(out[::2, ::2], out[1::2, 1::2])


def test_disk_kernel_definition() -> None:
    k = disk_kernel(6, 0.5)
    assert k.shape == (17, 17) and np.isclose(k.sum(), 1)
    assert np.allclose(k, k.T) and np.allclose(k, k[::-1])
    assert k[8, 8] > 0 and k[8, 0] < 1e-6  # inside the radius vs. 8 px away


def test_motion_kernel_is_one_sided_half_gaussian() -> None:
    radius, sigma = 10, 3
    k = motion_kernel(radius, sigma, 0.0)
    half = k.shape[0] // 2
    taps = np.arange(2 * radius + 1)
    expected = np.exp(-(taps**2) / (2 * sigma**2))
    expected /= expected.sum()
    # out(x) = sum_i w_i in(x + i): convolution kernel taps sit at -i along x.
    assert np.allclose(k[half, half - taps], expected)
    assert np.isclose(k.sum(), 1) and np.isclose(k[half].sum(), 1)
    k45 = motion_kernel(radius, sigma, 45.0)
    ys, xs = np.nonzero(k45)
    assert np.array_equal(ys, xs)  # along the diagonal


def test_stain_is_affine_in_h_and_e(tile: np.ndarray) -> None:
    sigma = CORRUPTIONS["stain"].severities[1]
    out = CORRUPTIONS["stain"](tile, 2, np.random.default_rng(3))

    def concentrations(rgb: np.ndarray) -> np.ndarray:
        od = -np.log(np.maximum(rgb / 255.0, 1 / 255.0))
        return (od @ color.hed_from_rgb).reshape(-1, 3)

    before, after = concentrations(tile), concentrations(out)
    for c in (0, 1):
        slope = np.polyfit(before[:, c], after[:, c], 1)[0]
        assert min(abs(slope - (1 - sigma)), abs(slope - (1 + sigma))) < 0.03, (c, slope)


# ---------------------------------------------------------------- physical scale (µm/px)


def _rise_um(out: np.ndarray, mpp: float) -> float:
    """10-90 % rise distance (µm) of a blurred vertical step edge, along the middle row."""
    row = out[out.shape[0] // 2, :, 1].astype(np.float64)
    lo, hi = row[:8].mean(), row[-8:].mean()
    frac = (row - lo) / (hi - lo)
    x = np.arange(len(row), dtype=np.float64)
    rising = np.maximum.accumulate(frac)  # monotone envelope for interpolation
    return float(np.interp(0.9, rising, x) - np.interp(0.1, rising, x)) * mpp


def test_spatial_scale_is_reference_mpp_over_tile_mpp() -> None:
    assert REFERENCE_MPP == 0.5
    assert spatial_scale(0.5) == 1.0 and spatial_scale(0.25) == 2.0 and spatial_scale(1.0) == 0.5
    for bad in (0, -0.5, float("nan"), None, "x"):
        with pytest.raises(ValueError, match="µm/px"):
            spatial_scale(bad)


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur"])
def test_blur_is_the_same_in_um_for_1000_and_224_px_tiles(name: str) -> None:
    big = he_tile(1000, seed=3)
    lo = (1000 - 224) // 2
    small = big[lo : lo + 224, lo : lo + 224].copy()
    out_big = CORRUPTIONS[name](big, 5, np.random.default_rng(1), mpp=0.5)[lo : lo + 224, lo : lo + 224]
    out_small = CORRUPTIONS[name](small, 5, np.random.default_rng(1), mpp=0.5)
    m = 48  # beyond the kernel (20 reference px at severity 5), the border handling cannot reach
    inner = (slice(m, -m), slice(m, -m))
    assert np.abs(out_big[inner].astype(int) - out_small[inner]).max() <= 1
    assert not np.array_equal(out_small, small)


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur"])
def test_half_the_mpp_gives_twice_the_blur_in_px(name: str) -> None:
    edge = np.full((224, 224, 3), 40, np.uint8)
    edge[:, 112:] = 220
    rise = {}
    for mpp in (0.5, 0.25):
        out = CORRUPTIONS[name](edge, 4, np.random.default_rng(2), mpp=mpp)
        rise[mpp] = _rise_um(out, mpp)
    # the same rise in µm is twice as many pixels at 0.25 µm/px
    assert rise[0.5] > 2.0
    assert rise[0.25] == pytest.approx(rise[0.5], rel=0.1)


def test_pixelate_has_a_fixed_pitch_in_um() -> None:
    img = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    out = CORRUPTIONS["pixelate"](img, 2, np.random.default_rng(0), mpp=0.25).astype(int)
    blocks = img.reshape(56, 4, 56, 4, 3).mean(axis=(1, 3))  # 1 µm pitch = 4 px at 0.25 µm/px
    assert np.abs(out[::4, ::4] - blocks).max() <= 1
    assert np.array_equal(out[::4, ::4], out[3::4, 3::4])
    coarse = CORRUPTIONS["pixelate"](img, 2, np.random.default_rng(0), mpp=1.0)
    assert np.array_equal(coarse, img)  # already coarser than the 1 µm pitch


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_exactly_the_spatial_corruptions_depend_on_mpp(name: str, tile: np.ndarray) -> None:
    at = {mpp: CORRUPTIONS[name](tile, 3, np.random.default_rng(4), mpp=mpp) for mpp in (0.5, 0.25)}
    assert np.array_equal(at[0.5], at[0.25]) != CORRUPTIONS[name].spatial
    assert np.array_equal(at[0.5], CORRUPTIONS[name](tile, 3, np.random.default_rng(4)))  # default: reference
    assert np.array_equal(at[0.25], corrupt_tiles(tile, name, 3, seed=4, mpp=0.25))
    batch = np.stack([tile, tile])
    seed = int(np.random.default_rng(5).integers(2**63))  # what `seeded` draws from its generator
    assert np.array_equal(
        he.seeded(name, chunk=1, mpp=0.25)(batch, 3, np.random.default_rng(5)),
        corrupt_tiles(batch, name, 3, seed=seed, chunk=1, mpp=0.25),
    )


# ---------------------------------------------------------------- the registry


def test_register_checks_the_table_and_the_name(monkeypatch) -> None:
    monkeypatch.setattr(he, "CORRUPTIONS", dict(CORRUPTIONS))
    with pytest.raises(ValueError, match="one parameter per severity"):
        register("short", severities=(1, 2, 3))
    with pytest.raises(ValueError, match="already registered"):
        register("jpeg", severities=(1, 2, 3, 4, 5))(lambda x, p, rng: x)
    assert he.CORRUPTIONS["jpeg"].fn is CORRUPTIONS["jpeg"].fn


def test_a_registered_corruption_runs_through_histo_robustness(tile_store, tmp_path, monkeypatch) -> None:
    """One function plus its registration: `corruptions: all` lists it, the run uses its severity row at
    the store's µm/px, and the outputs record its table and scaling."""
    import json

    from click.testing import CliRunner

    from histo.cli import main
    from histo.config import load_config
    from histo.robustness.grid import select_corruptions
    from histo.robustness.results import read_rows
    from histo.robustness_config import RobustnessConfig
    from pathology.kimianet import random_init_checkpoint

    monkeypatch.setattr(he, "CORRUPTIONS", dict(CORRUPTIONS))  # registrations vanish after the test
    seen = []

    @register("throwaway", severities=(10, 20, 30, 40, 50), spatial=True)
    def throwaway(x: np.ndarray, level: int, rng: np.random.Generator, scale: float) -> np.ndarray:
        seen.append((level, scale, x.shape))
        return np.full_like(x, level)

    assert load_config(RobustnessConfig).corruptions == "all"
    assert select_corruptions("all", he.CORRUPTIONS) == [*CORRUPTIONS, "throwaway"]
    model = random_init_checkpoint(tmp_path / "m.pt", norm="batch", input_px=32, seed=1)
    out = tmp_path / "out"
    args = ["robustness", "pathology", "--model", str(model), "--tiles", str(tile_store), "--out", str(out)]
    args += ["--corruptions", "throwaway", "--severities", "2,5", "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["failed"] == 0 and result.exit_code == 0
    assert {(level, scale) for level, scale, _ in seen} == {(20, 2.0), (50, 2.0)}  # store at 0.25 µm/px
    assert sum(shape[0] for level, _, shape in seen if level == 20) == 12  # every tile of the cohort
    rows = read_rows(out / "results.csv")
    assert {(r["corruption"], r["severity"]) for r in rows} == {
        ("clean", 0),
        ("throwaway", 2),
        ("throwaway", 5),
    }
    settings = json.loads((out / "settings.json").read_text())
    for record in (summary, settings):
        assert record["severity_table"] == {"throwaway": [10, 20, 30, 40, 50]}
        scaling = record["spatial_scaling"]
        assert scaling["reference_mpp"] == 0.5 and scaling["tile_mpp"] == 0.25 and scaling["scale"] == 2.0
        assert scaling["scaled"] == ["throwaway"]
