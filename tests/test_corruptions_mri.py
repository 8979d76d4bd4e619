"""MRI corruptions: identity, monotone severity, dtype/background, determinism, noise/field statistics, the
acquisition space (raw intensities corrupted, then the training z-score), and the registry (a throwaway
corruption run through `histo robustness`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage, special, stats

from segmentation import corruptions as mri
from segmentation.corruptions import (
    CORRUPTIONS,
    augment,
    bias_field,
    corrupt_volume,
    legendre_terms,
    register,
)
from segmentation.data import preprocess

SEED_FREE = ("blur", "gibbs", "downsample")


def brain_volume(shape=(32, 32, 24), seed: int = 0) -> np.ndarray:
    """(4, *shape) raw magnitudes (positive, textured) inside an ellipsoid, zero background, as load_raw returns."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g**2 for g in grids) < 0.8
    vol = np.zeros((4, *shape), np.float32)
    for c in range(4):
        x = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
        x = 400.0 * (c + 1) * (1.0 + 0.3 * grids[c % 3] + 2.0 * x)
        vol[c][mask] = np.clip(x[mask], 20.0, None)
    return vol


def _brain_stats(image: np.ndarray) -> list[tuple[float, float]]:
    """(mean, std) over each non-empty channel's non-zero voxels (where `preprocess` z-scores)."""
    return [
        (float(ch[ch != 0].mean()), float(ch[ch != 0].std())) for ch in image.astype(np.float64) if ch.any()
    ]


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
    out = CORRUPTIONS[name].at(volume, 0.0, np.random.default_rng(0))
    assert np.allclose(out, volume, rtol=1e-5, atol=1e-2)


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


def test_bias_field_multiplies_the_acquisition_by_a_smooth_field(volume: np.ndarray) -> None:
    magnitude = CORRUPTIONS["bias_field"].severities[4]
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
        log_ratio = np.log(out[c][mask] / volume[c][mask])  # raw intensities: a pure gain, no offset
        fit, *_ = np.linalg.lstsq(basis[mask], log_ratio, rcond=None)
        assert np.abs(basis[mask] @ fit - log_ratio).max() < 1e-3  # a degree-3 Legendre polynomial
        assert np.abs(log_ratio).max() <= magnitude + 1e-4
        assert np.abs(log_ratio).max() > 0.9 * magnitude  # the peak log-gain over the brain


def test_gaussian_noise_std_is_a_fraction_of_the_brain_maximum(volume: np.ndarray) -> None:
    mask = np.any(volume != 0, axis=0)
    out = CORRUPTIONS["gaussian_noise"](volume, 4, np.random.default_rng(0))
    sigma = CORRUPTIONS["gaussian_noise"].severities[3]
    for c in range(4):
        diff = (out[c] - volume[c])[mask] / volume[c][mask].max()
        assert abs(diff.mean()) < 4 * sigma / np.sqrt(diff.size)
        assert abs(diff.std() / sigma - 1) < 0.05


def test_rician_noise_matches_rice_distribution() -> None:
    shape = (40, 40, 40)
    vol = np.zeros((4, *shape), np.float32)
    vol[:, :20] = 500.0  # proxy 0.5
    vol[:, 20:] = 1000.0  # proxy 1 (the brain maximum)
    sigma = CORRUPTIONS["rician_noise"].severities[4]
    out = CORRUPTIONS["rician_noise"](vol, 5, np.random.default_rng(0))
    u = out / 1000.0  # back to the proxy scale
    for region, signal in ((u[:, :20], 0.5), (u[:, 20:], 1.0)):
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
    assert np.allclose(CORRUPTIONS["downsample"](flat, 5, np.random.default_rng(0)), flat, rtol=1e-5)
    assert not np.allclose(CORRUPTIONS["downsample"](vol, 5, np.random.default_rng(0)), vol, rtol=1e-2)


def test_augmentation_never_reaches_benchmark_levels(volume: np.ndarray) -> None:
    trained = {n for n, c in CORRUPTIONS.items() if c.augment is not None}
    assert set(CORRUPTIONS) - trained == {"missing_modality", "swapped_modalities"}  # benchmark only
    for name in trained:
        low, high = CORRUPTIONS[name].augment
        assert low < high < min(CORRUPTIONS[name].severities), name
    assert all(
        len(c.severities) == 5 and list(c.severities) == sorted(c.severities) for c in CORRUPTIONS.values()
    )
    a = augment(volume, np.random.default_rng(1), p=1.0)
    assert a.dtype == np.float32 and np.isfinite(a).all() and not np.array_equal(a, volume)
    assert not a[:, ~np.any(volume != 0, axis=0)].any()
    assert np.array_equal(a, augment(volume, np.random.default_rng(1), p=1.0))
    assert np.array_equal(augment(volume, np.random.default_rng(1), p=0.0), volume)


# ---------------------------------------------------------------- acquisition space


def test_corruption_acts_on_raw_intensities_before_the_z_score() -> None:
    """Gamma at severity 5 on a small raw volume against a float64 computation by hand."""
    rng = np.random.default_rng(0)
    raw = np.zeros((4, 6, 6, 5), np.float32)
    raw[:, 1:5, 1:5, 1:4] = rng.uniform(50.0, 900.0, size=(4, 4, 4, 3))
    log_gamma = CORRUPTIONS["gamma"].severities[4]
    model_input, brain = preprocess(corrupt_volume(raw, "gamma", 5, seed=6))
    signs = np.random.default_rng(6).choice([-1.0, 1.0], size=4)  # the per-channel sign gamma draws
    assert set(signs) == {-1.0, 1.0}  # both directions of the contrast change are exercised
    x = raw.astype(np.float64)
    inside = np.any(x != 0, axis=0)
    assert np.array_equal(brain, inside)
    for c in range(4):
        peak = x[c][inside].max()
        corrupted = (x[c][inside] / peak) ** np.exp(signs[c] * log_gamma) * peak
        expected = (corrupted - corrupted.mean()) / corrupted.std()
        np.testing.assert_allclose(model_input[c][inside], expected, atol=2e-5)
        assert not model_input[c][~inside].any()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_model_input_is_z_scored_after_any_corruption(name: str, volume: np.ndarray) -> None:
    """What the pipeline always produces: per-channel brain mean 0 and std 1 (old code: up to +2.3 SD)."""
    model_input, _ = preprocess(corrupt_volume(volume, name, 5, seed=3))
    found = _brain_stats(model_input)
    assert len(found) == (3 if name == "missing_modality" else 4)  # a missing series stays all zero
    for mean, std in found:
        assert abs(mean) < 1e-4 and abs(std - 1) < 1e-4, (name, mean, std)


def test_preprocess_leaves_the_raw_volume_alone(volume: np.ndarray) -> None:
    before = volume.copy()
    image, brain = preprocess(volume)
    assert np.array_equal(volume, before) and image is not volume
    assert np.array_equal(brain, np.any(volume != 0, axis=0))


# ---------------------------------------------------------------- the registry


def test_register_checks_the_table_the_range_and_the_name(monkeypatch) -> None:
    monkeypatch.setattr(mri, "CORRUPTIONS", dict(CORRUPTIONS))
    with pytest.raises(ValueError, match="one magnitude per severity"):
        register("short", severities=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"must lie below 0\.2"):
        register("overlap", severities=(0.2, 0.4, 0.6, 0.8, 1.0), augment=(0.0, 0.3))
    with pytest.raises(ValueError, match="already registered"):
        register("blur", severities=(1.0, 2.0, 3.0, 4.0, 5.0))(lambda u, m, rng: u)
    assert mri.CORRUPTIONS["blur"] is CORRUPTIONS["blur"]


def test_a_registered_corruption_runs_through_histo_robustness(
    tiny_segment_study, tmp_path, monkeypatch
) -> None:
    """One function plus its registration: `corruptions: all` lists it, it receives the raw acquisition,
    the model input of every cell is z-scored, and the outputs record the space and the severity table."""
    import json

    from click.testing import CliRunner

    import segmentation.infer
    from histo.cli import main
    from histo.robustness.grid import select_corruptions
    from histo.robustness.results import read_rows
    from segmentation.data import find_cases, load_raw

    monkeypatch.setattr(mri, "CORRUPTIONS", dict(CORRUPTIONS))  # registrations vanish after the test
    received = []

    # a global gain of the acquisition (powers of two: exact in float32); the z-score undoes it
    @register("throwaway_gain", severities=(2.0, 4.0, 8.0, 16.0, 32.0), proxy=False)
    def throwaway_gain(volume: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
        received.append((gain, volume.copy()))
        return volume * np.float32(gain)

    inputs = []
    predict = segmentation.infer.predict_volume
    monkeypatch.setattr(
        segmentation.infer,
        "predict_volume",
        lambda model, image, **kw: inputs.append(image) or predict(model, image, **kw),
    )
    assert select_corruptions("all", mri.CORRUPTIONS) == [*CORRUPTIONS, "throwaway_gain"]
    out = tmp_path / "out"
    study = {k: str(v) for k, v in tiny_segment_study.items()}
    args = ["robustness", "segment", "--model", study["model"], "--data", study["data"]]
    args += ["--out", str(out), "--corruptions", "throwaway_gain,gamma", "--severities", "5"]
    args += ["--config", study["config"], "--device", "cpu", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["failed"] == 0
    raw = load_raw(find_cases(tiny_segment_study["data"])[0])[0]
    assert [g for g, _ in received] == [32.0] and np.array_equal(received[0][1], raw)  # the acquisition
    assert len(inputs) == 3  # clean, throwaway_gain s5, gamma s5
    for image in inputs:  # what the pipeline always produces
        assert len(_brain_stats(image)) == 4
        for mean, std in _brain_stats(image):
            assert abs(mean) < 1e-4 and abs(std - 1) < 1e-4
    clean, gained, gamma = inputs
    assert np.array_equal(gained, clean) and not np.allclose(gamma, clean, atol=1e-2)
    rows = {(r["corruption"], r["metric"]): r["value"] for r in read_rows(out / "results.csv")}
    assert rows[("throwaway_gain", "dice_mean")] == rows[("clean", "dice_mean")]
    settings = json.loads((out / "settings.json").read_text())
    for record in (summary, settings):
        assert record["corruption_space"] == "acquisition"
        assert record["severity_table"] == {
            "throwaway_gain": [2.0, 4.0, 8.0, 16.0, 32.0],
            "gamma": list(CORRUPTIONS["gamma"].severities),
        }
