"""MRI corruptions of 4-channel BraTS volumes (4, D, H, W) float32, 5 severities each, deterministic.

Volumes are the pipeline's model input: channel-wise z-scored brain, background 0, RAS order (the last
axis is inferior-superior, the axial slice axis). Acquisition artefacts act on the non-negative
magnitude image, so every intensity corruption works on a per-channel proxy of it: brain voxels
rescaled to [0, 1] (min -> 0, max -> 1) with a dark (0) background; the result is mapped back with the
same affine map and the background is zeroed again (the skull-stripped convention).

Benchmark magnitudes (`BENCHMARK_PARAMS`, one value per severity) and augmentation ranges
(`AUGMENT_PARAMS`) are separate tables; every augmentation range lies strictly below the weakest
benchmark level, so a benchmark never tests what a model was trained on. Definitions follow MONAI
(GibbsNoise, KSpaceSpikeNoise, GaussianSmooth, RandBiasField's Legendre field, RandRicianNoise) and
TorchIO (RandomGhosting, RandomMotion, translations only); random geometry is drawn from the seed
independently of the severity, so a higher severity distorts the same volume more.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from numpy.polynomial import legendre
from scipy import fft

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

SLICE_AXIS = -1  # RAS: the last spatial axis runs inferior-superior (axial slices)
BIAS_DEGREE = 3

#: One magnitude per severity 1..5 (units in each function's docstring).
BENCHMARK_PARAMS: dict[str, list[float]] = {
    "bias_field": [0.1, 0.2, 0.3, 0.45, 0.6],
    "ghosting": [0.4, 0.55, 0.7, 0.85, 1.0],
    "motion": [0.3, 0.4, 0.5, 0.6, 0.7],
    "spike": [0.2, 0.4, 0.7, 1.0, 1.5],
    "gaussian_noise": [0.02, 0.04, 0.06, 0.09, 0.12],
    "rician_noise": [0.02, 0.04, 0.06, 0.09, 0.12],
    "blur": [0.5, 0.75, 1.0, 1.5, 2.0],
    "gibbs": [0.45, 0.55, 0.65, 0.75, 0.85],
    "gamma": [0.15, 0.3, 0.45, 0.6, 0.8],
    "downsample": [2.0, 3.0, 4.0, 5.0, 6.0],
    "missing_modality": [0.2, 0.4, 0.6, 0.8, 1.0],
    "swapped_modalities": [0.2, 0.4, 0.6, 0.8, 1.0],
}

#: (low, high) magnitude ranges for training-time augmentation; benchmark-only corruptions are absent.
AUGMENT_PARAMS: dict[str, tuple[float, float]] = {
    "bias_field": (0.0, 0.08),
    "ghosting": (0.0, 0.3),
    "motion": (0.0, 0.2),
    "spike": (0.0, 0.15),
    "gaussian_noise": (0.0, 0.015),
    "rician_noise": (0.0, 0.015),
    "blur": (0.0, 0.4),
    "gibbs": (0.0, 0.35),
    "gamma": (0.0, 0.1),
    "downsample": (1.0, 1.5),
}

SEVERITIES = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------- intensity proxy


def _proxy(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel [0, 1] magnitude proxy of the brain (background 0), the brain mask, and the map back."""
    mask = np.any(volume != 0, axis=0)
    if not mask.any():
        mask = np.ones(volume.shape[1:], bool)
    brain = volume[:, mask]
    lo, hi = brain.min(axis=1), brain.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    u = (volume - lo[:, None, None, None]) / span[:, None, None, None]
    return np.where(mask, u, 0.0).astype(np.float32), mask, lo, span


def _unproxy(u: np.ndarray, volume: np.ndarray, mask: np.ndarray, lo: np.ndarray, span: np.ndarray):
    out = u * span[:, None, None, None] + lo[:, None, None, None]
    out = np.where(mask, out, 0.0).astype(np.float32)
    flat = np.ptp(volume[:, mask], axis=1) == 0  # constant (e.g. already missing) channels stay as they were
    out[flat] = volume[flat]
    return out


def _on_proxy(fn: Callable[[np.ndarray, float, np.random.Generator], np.ndarray]):
    """Lift a corruption of the [0, 1] magnitude proxy to one of the z-scored volume."""

    def apply(volume: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        u, mask, lo, span = _proxy(volume)
        return _unproxy(fn(u, magnitude, rng), volume, mask, lo, span)

    apply.__doc__ = fn.__doc__
    return apply


def _kspace(u: np.ndarray) -> np.ndarray:
    return fft.fftshift(fft.fftn(u, axes=(1, 2, 3), workers=2), axes=(1, 2, 3))


def _image(k: np.ndarray) -> np.ndarray:
    """Magnitude image of centred k-space (MR reconstructions are magnitudes)."""
    return np.abs(fft.ifftn(fft.ifftshift(k, axes=(1, 2, 3)), axes=(1, 2, 3), workers=2)).astype(np.float32)


# ---------------------------------------------------------------- corruptions of the proxy


def legendre_terms(degree: int = BIAS_DEGREE) -> list[tuple[int, int, int]]:
    """Exponents (i, j, k) with i + j + k <= degree of the 3-D Legendre products (MONAI RandBiasField)."""
    return [t for t in itertools.product(range(degree + 1), repeat=3) if sum(t) <= degree]


def bias_field(shape: tuple[int, int, int], coeffs: np.ndarray, degree: int = BIAS_DEGREE) -> np.ndarray:
    """exp(sum_t c_t P_i(x) P_j(y) P_k(z)) on a grid spanning [-1, 1] along each axis."""
    axes = [legendre.legvander(np.linspace(-1, 1, n), degree) for n in shape]  # (n, degree + 1)
    log_field = np.zeros(shape)
    for c, (i, j, k) in zip(coeffs, legendre_terms(degree), strict=False):
        log_field += c * np.einsum("a,b,c->abc", axes[0][:, i], axes[1][:, j], axes[2][:, k])
    return np.exp(log_field)


def _bias_field(u: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply each channel by its own smooth field exp(poly) of degree 3, max |poly| over the brain = m.

    m is the peak log-gain: m = 0.6 gives a field between 0.55 and 1.8.
    """
    coeffs = rng.uniform(-1.0, 1.0, size=(len(u), len(legendre_terms())))
    brain = np.any(u > 0, axis=0)
    out = np.empty_like(u)
    for c, k in enumerate(coeffs):
        log_field = np.log(bias_field(u.shape[1:], k))
        out[c] = u[c] * np.exp(log_field * (magnitude / np.abs(log_field[brain]).max()))
    return out


def _ghosting(u: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """TorchIO ghosting: every n-th k-space plane along a random axis scaled by (1 - intensity).

    n is drawn in 4..10 (TorchIO's default range); planes within 2 % of the centre are left intact.
    """
    axis = 1 + int(rng.integers(3))
    every = int(rng.integers(4, 11))
    k = _kspace(u)
    size = u.shape[axis]
    lines = np.arange(size)
    hit = (lines % every == 0) & (np.abs(lines - size // 2) > round(0.02 * size))
    shape = [1, 1, 1, 1]
    shape[axis] = size
    k = k * np.where(hit, 1.0 - intensity, 1.0).reshape(shape)
    return _image(k)


def _motion(u: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rigid translations during acquisition (TorchIO RandomMotion, translations only).

    k-space lines along a random phase-encoding axis are acquired in order; the patient holds the
    reference pose for the central lines and a moved pose (3-6 voxels along a random direction, one per
    end) for the outer `fraction` of the lines (Fourier shift theorem: a linear phase ramp). Growing the
    moved fraction adds k-space energy to the mismatch, so the error grows with severity.
    """
    axis = 1 + int(rng.integers(3))
    size = u.shape[axis]
    directions = rng.normal(size=(2, 3))
    directions *= rng.uniform(3.0, 6.0, size=(2, 1)) / np.linalg.norm(directions, axis=1, keepdims=True)
    lines = np.arange(size)
    n_moved = round(fraction * size / 2)
    displacement = np.zeros((size, 3))
    displacement[lines < n_moved] = directions[0]
    displacement[lines >= size - n_moved] = directions[1]
    freqs = [fft.fftshift(fft.fftfreq(n)) for n in u.shape[1:]]
    phase = np.zeros(u.shape[1:])
    line_shape = [1, 1, 1]
    line_shape[axis - 1] = size
    for a, f in enumerate(freqs):
        f_shape = [1, 1, 1]
        f_shape[a] = len(f)
        phase = phase + f.reshape(f_shape) * displacement[:, a].reshape(line_shape)
    return _image(_kspace(u) * np.exp(-2j * np.pi * phase)[None])


def _spike(u: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """MONAI KSpaceSpikeNoise: one k-space point set to `amplitude` x the DC magnitude (herringbone).

    The location is drawn away from the centre (1/8 to 1/3 of the extent on every axis).
    """
    from monai.transforms import KSpaceSpikeNoise

    loc = tuple(
        int(n // 2 + rng.choice([-1, 1]) * rng.integers(max(1, n // 8), max(2, n // 3))) for n in u.shape[1:]
    )
    out = np.empty_like(u)
    for c in range(len(u)):
        dc = max(float(np.abs(u[c].sum(dtype=np.float64))), 1e-6)
        spiked = KSpaceSpikeNoise(loc=loc, k_intensity=float(np.log(amplitude * dc)))(u[c : c + 1])
        out[c] = np.asarray(spiked)[0]
    return out


def _gaussian_noise(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, sigma^2) noise, sigma a fraction of the channel's brain intensity range."""
    return u + sigma * rng.standard_normal(u.shape, dtype=np.float32)


def _rician_noise(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician magnitude noise |u + n_re + i n_im|, n ~ N(0, sigma^2) (MONAI RandRicianNoise, absolute)."""
    real = u + sigma * rng.standard_normal(u.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(u.shape, dtype=np.float32)
    return np.sqrt(real**2 + imag**2)


def _blur(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Isotropic Gaussian blur, sigma in voxels (MONAI GaussianSmooth)."""
    from monai.transforms import GaussianSmooth

    return np.asarray(GaussianSmooth(sigma=sigma)(torch.from_numpy(u)), dtype=np.float32)


def _gibbs(u: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """MONAI GibbsNoise: k-space truncated to a sphere of radius (1 - alpha) * max(shape) / sqrt 2."""
    from monai.transforms import GibbsNoise

    return np.asarray(GibbsNoise(alpha=alpha)(torch.from_numpy(u)), dtype=np.float32)


def _gamma(u: np.ndarray, log_gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast change u^gamma with gamma = exp(±m), the sign drawn per channel."""
    signs = rng.choice([-1.0, 1.0], size=len(u))
    gamma = np.exp(signs * log_gamma).astype(np.float32)
    return np.clip(u, 0.0, None) ** gamma[:, None, None, None]


def _downsample(u: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Thick slices: average-pool the slice axis by `factor`, then linear interpolation back."""
    x = torch.from_numpy(np.moveaxis(u, SLICE_AXIS, -1).copy())  # (C, D, H, S)
    c, d, h, s = x.shape
    low = torch.nn.functional.interpolate(
        x.reshape(1, c * d, h, s), size=(h, max(1, round(s / factor))), mode="area"
    )
    back = torch.nn.functional.interpolate(low, size=(h, s), mode="bilinear", align_corners=False)
    return np.moveaxis(back.reshape(c, d, h, s).numpy(), -1, SLICE_AXIS)


# ---------------------------------------------------------------- modality corruptions (model input as is)


def _slab(n: int, fraction: float, rng: np.random.Generator) -> slice:
    """The first or last ceil(fraction * n) slices (an incomplete series), end chosen by the seed."""
    count = int(np.ceil(fraction * n))
    return slice(0, count) if rng.integers(2) == 0 else slice(n - count, n)


def missing_modality(volume: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Zero one modality (chosen by the seed) over a slab of `fraction` of the axial slices; 1.0 = all."""
    channel = int(rng.integers(volume.shape[0]))
    where = _slab(volume.shape[SLICE_AXIS], fraction, rng)
    out = volume.copy()
    np.moveaxis(out, SLICE_AXIS, -1)[channel, ..., where] = 0.0
    return out


def swapped_modalities(volume: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Swap two modalities (chosen by the seed) over a slab of `fraction` of the slices; 1.0 = whole volumes."""
    a, b = (int(i) for i in rng.choice(volume.shape[0], size=2, replace=False))
    where = _slab(volume.shape[SLICE_AXIS], fraction, rng)
    out = volume.copy()
    src = np.moveaxis(volume, SLICE_AXIS, -1)
    dst = np.moveaxis(out, SLICE_AXIS, -1)
    dst[a, ..., where], dst[b, ..., where] = src[b, ..., where], src[a, ..., where]
    return out


#: name -> fn(volume (4, D, H, W) float32, magnitude, rng) -> corrupted volume.
MAGNITUDE_FUNCTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "bias_field": _on_proxy(_bias_field),
    "ghosting": _on_proxy(_ghosting),
    "motion": _on_proxy(_motion),
    "spike": _on_proxy(_spike),
    "gaussian_noise": _on_proxy(_gaussian_noise),
    "rician_noise": _on_proxy(_rician_noise),
    "blur": _on_proxy(_blur),
    "gibbs": _on_proxy(_gibbs),
    "gamma": _on_proxy(_gamma),
    "downsample": _on_proxy(_downsample),
    "missing_modality": missing_modality,
    "swapped_modalities": swapped_modalities,
}


def _check(volume: np.ndarray, name: str) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 4 or volume.dtype != np.float32:
        raise ValueError(f"{name}: expected a float32 (C, D, H, W) volume, got {volume.dtype} {volume.shape}")
    return volume


def _by_severity(name: str) -> Corruption:
    fn = MAGNITUDE_FUNCTIONS[name]

    def apply(volume: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        volume = _check(volume, name)
        if severity not in (0, *SEVERITIES):
            raise ValueError(f"{name}: severity must be 0..5, got {severity}")
        if severity == 0:
            return volume.copy()
        return fn(volume, BENCHMARK_PARAMS[name][severity - 1], rng).astype(np.float32)

    apply.__name__ = name
    apply.__doc__ = fn.__doc__
    return apply


#: name -> fn(volume float32 (4, D, H, W), severity 0..5, rng) -> float32; severity 0 is the identity.
CORRUPTIONS: dict[str, Corruption] = {name: _by_severity(name) for name in MAGNITUDE_FUNCTIONS}


def corrupt_volume(volume: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Apply one benchmark corruption deterministically for `seed`."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](volume, severity, np.random.default_rng(seed))


def augment(volume: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    """Training-time augmentation: each AUGMENT_PARAMS corruption with probability p, magnitude U(low, high)."""
    volume = _check(volume, "augment")
    for name, (low, high) in AUGMENT_PARAMS.items():
        if rng.random() < p:
            volume = MAGNITUDE_FUNCTIONS[name](volume, float(rng.uniform(low, high)), rng).astype(np.float32)
    return volume
