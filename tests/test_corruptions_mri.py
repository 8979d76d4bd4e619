"""MRI corruptions: identity, monotone severity, dtype/background, determinism, and noise/field statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage, special, stats

from segmentation.corruptions import (
    AUGMENT_PARAMS,
    BENCHMARK_PARAMS,
    CORRUPTIONS,
    MAGNITUDE_FUNCTIONS,
    augment,
    bias_field,
    corrupt_volume,
    legendre_terms,
)

SEED_FREE = ("blur", "gibbs", "downsample")


def brain_volume(shape=(32, 32, 24), seed: int = 0) -> np.ndarray:
    """(4, *shape) z-scored 'brain' inside an ellipsoid with a zero background, as load_case returns."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g**2 for g in grids) < 0.8
    vol = np.zeros((4, *shape), np.float32)
    for c in range(4):
        x = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) + 0.3 * grids[c % 3]
        brain = x[mask]
        vol[c][mask] = (brain - brain.mean()) / brain.std()
    return vol


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return brain_volume()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_identity_range_and_monotone(name: str, volume: np.ndarray) -> None:
    fn = CORRUPTIONS[name]
    assert np.array_equal(fn(volume, 0, np.random.default_rng(0)), volume)
    background = ~np.any(volume != 0, axis=0)
    errors = []
    for severity in range(1, 6):
        out = fn(volume, severity, np.random.default_rng(11))
        assert out.dtype == np.float32 and out.shape == volume.shape
        assert np.isfinite(out).all()
        assert not out[:, background].any(), "background must stay zero"
        errors.append(float(np.mean((out - volume) ** 2)))
    assert all(a < b for a, b in itertools.pairwise(errors)), f"{name}: error not rising {errors}"


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_determinism(name: str, volume: np.ndarray) -> None:
    a = corrupt_volume(volume, name, 3, seed=4)
    assert np.array_equal(a, corrupt_volume(volume, name, 3, seed=4))
    others = [corrupt_volume(volume, name, 3, seed=s) for s in range(5, 9)]
    assert any(not np.array_equal(a, b) for b in others) == (name not in SEED_FREE)


@pytest.mark.parametrize("name", ["bias_field", "ghosting", "motion", "gamma"])
def test_zero_magnitude_round_trips(name: str, volume: np.ndarray) -> None:
    out = MAGNITUDE_FUNCTIONS[name](volume, 0.0, np.random.default_rng(0))
    assert np.allclose(out, volume, atol=1e-4)


def test_bias_field_matches_legendre_loop() -> None:
    shape = (5, 4, 6)
    coeffs = np.random.default_rng(0).uniform(-0.3, 0.3, len(legendre_terms()))
    expected = np.zeros(shape)
    for idx in np.ndindex(*shape):
        xyz = [-1 + 2 * i / (n - 1) for i, n in zip(idx, shape, strict=False)]
        total = 0.0
        for c, (i, j, k) in zip(coeffs, legendre_terms(), strict=False):
            total += (
                c
                * special.eval_legendre(i, xyz[0])
                * special.eval_legendre(j, xyz[1])
                * special.eval_legendre(k, xyz[2])
            )
        expected[idx] = np.exp(total)
    assert len(legendre_terms()) == 20  # i + j + k <= 3
    assert np.allclose(bias_field(shape, coeffs), expected)


def test_bias_field_corruption_is_a_smooth_multiplicative_field(volume: np.ndarray) -> None:
    magnitude = BENCHMARK_PARAMS["bias_field"][4]
    out = CORRUPTIONS["bias_field"](volume, 5, np.random.default_rng(2))
    mask = np.any(volume != 0, axis=0)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in volume.shape[1:]], indexing="ij")
    basis = np.stack(
        [
            special.eval_legendre(i, grids[0])
            * special.eval_legendre(j, grids[1])
            * special.eval_legendre(k, grids[2])
            for i, j, k in legendre_terms()
        ],
        axis=-1,
    )
    for c in range(4):
        lo = volume[c][mask].min()
        keep = mask & (volume[c] - lo > 0.05)
        log_ratio = np.log((out[c][keep] - lo) / (volume[c][keep] - lo))
        fit, *_ = np.linalg.lstsq(basis[keep], log_ratio, rcond=None)
        assert np.abs(basis[keep] @ fit - log_ratio).max() < 1e-3  # a degree-3 Legendre polynomial
        assert np.abs(log_ratio).max() <= magnitude + 1e-4
        assert np.abs(log_ratio).max() > 0.9 * magnitude  # the peak log-gain over the brain


def test_gaussian_noise_std(volume: np.ndarray) -> None:
    mask = np.any(volume != 0, axis=0)
    out = CORRUPTIONS["gaussian_noise"](volume, 4, np.random.default_rng(0))
    sigma = BENCHMARK_PARAMS["gaussian_noise"][3]
    for c in range(4):
        span = np.ptp(volume[c][mask])
        diff = (out[c] - volume[c])[mask] / span
        assert abs(diff.mean()) < 4 * sigma / np.sqrt(diff.size)
        assert abs(diff.std() / sigma - 1) < 0.05


def test_rician_noise_matches_rice_distribution() -> None:
    shape = (40, 40, 40)
    vol = np.zeros((4, *shape), np.float32)
    vol[:, :20] = -1.0  # proxy 0: Rayleigh
    vol[:, 20:] = 2.0  # proxy 1: Rice(1 / sigma)
    sigma = BENCHMARK_PARAMS["rician_noise"][4]
    out = CORRUPTIONS["rician_noise"](vol, 5, np.random.default_rng(0))
    u = (out + 1.0) / 3.0  # back to the proxy scale
    for region, signal in ((u[:, :20], 0.0), (u[:, 20:], 1.0)):
        ref = stats.rice(b=signal / sigma, scale=sigma)
        values = region.ravel().astype(np.float64)
        assert abs(values.mean() - ref.mean()) < 4 * ref.std() / np.sqrt(values.size)
        assert abs(values.var() / ref.var() - 1) < 0.03


def test_missing_and_swapped_at_full_severity(volume: np.ndarray) -> None:
    out = CORRUPTIONS["missing_modality"](volume, 5, np.random.default_rng(0))
    zeroed = [c for c in range(4) if not out[c].any()]
    assert len(zeroed) == 1
    assert all(np.array_equal(out[c], volume[c]) for c in range(4) if c not in zeroed)
    out = CORRUPTIONS["swapped_modalities"](volume, 5, np.random.default_rng(0))
    moved = [c for c in range(4) if not np.array_equal(out[c], volume[c])]
    assert len(moved) == 2
    a, b = moved
    assert np.array_equal(out[a], volume[b]) and np.array_equal(out[b], volume[a])


def test_downsample_acts_along_the_slice_axis_only() -> None:
    vol = brain_volume()
    flat = np.repeat(vol[..., 12:13], vol.shape[-1], axis=-1)  # constant along the slice axis
    assert np.allclose(CORRUPTIONS["downsample"](flat, 5, np.random.default_rng(0)), flat, atol=1e-5)
    assert not np.allclose(CORRUPTIONS["downsample"](vol, 5, np.random.default_rng(0)), vol, atol=1e-2)


def test_augmentation_never_reaches_benchmark_levels(volume: np.ndarray) -> None:
    assert set(AUGMENT_PARAMS) < set(BENCHMARK_PARAMS)
    for name, (low, high) in AUGMENT_PARAMS.items():
        assert low < high < min(BENCHMARK_PARAMS[name]), name
    assert list(BENCHMARK_PARAMS) == list(CORRUPTIONS)
    assert all(len(v) == 5 and v == sorted(v) for v in BENCHMARK_PARAMS.values())
    a = augment(volume, np.random.default_rng(1), p=1.0)
    assert a.dtype == np.float32 and np.isfinite(a).all() and not np.array_equal(a, volume)
    assert np.array_equal(a, augment(volume, np.random.default_rng(1), p=1.0))
