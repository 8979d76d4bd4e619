"""H&E tile corruptions: identity, monotone severity, range/dtype, determinism, and the formulas."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
from skimage import color

from pathology.corruptions import (
    CORRUPTIONS,
    PARAMS,
    corrupt_tiles,
    disk_kernel,
    hsv_to_rgb,
    motion_kernel,
    rgb_to_hsv,
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
    sigma = PARAMS["gaussian_noise"][0] * 255
    assert abs((out - 128).mean()) < 0.5
    assert abs((out - 128).std() / sigma - 1) < 0.02


def test_contrast_matches_float64_definition(tile: np.ndarray) -> None:
    c = PARAMS["contrast"][2]
    x = tile / 255.0
    mean = x.mean(axis=(0, 1))
    expected = np.clip(np.rint(((x - mean) * c + mean) * 255), 0, 255)
    out = CORRUPTIONS["contrast"](tile, 3, np.random.default_rng(0))
    assert np.abs(out - expected).max() <= 1


@pytest.mark.parametrize(("name", "channel"), [("brightness", 2), ("saturation", 1), ("hue", 0)])
def test_hsv_shifts_match_colorsys(name: str, channel: int, tile: np.ndarray) -> None:
    shift = PARAMS[name][1]
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
    sigma = PARAMS["stain"][1]
    out = CORRUPTIONS["stain"](tile, 2, np.random.default_rng(3))

    def concentrations(rgb: np.ndarray) -> np.ndarray:
        od = -np.log(np.maximum(rgb / 255.0, 1 / 255.0))
        return (od @ color.hed_from_rgb).reshape(-1, 3)

    before, after = concentrations(tile), concentrations(out)
    for c in (0, 1):
        slope = np.polyfit(before[:, c], after[:, c], 1)[0]
        assert min(abs(slope - (1 - sigma)), abs(slope - (1 + sigma))) < 0.03, (c, slope)
