"""MRI corruptions of 4-channel BraTS acquisitions (4, D, H, W) float32: a registry of 5-severity corruptions.

Corruptions act on the acquisition, before any preprocessing, as ImageNet-C corrupts images before the
network's preprocessing: the input is the raw intensities of the skull-stripped volumes in RAS order
(`segmentation.data.load_raw`; the last axis is inferior-superior, the axial slice axis), and the model
then sees `segmentation.data.preprocess` of the result, the same channel-wise z-score as in training.

A corruption is one function plus its registration with its severity table row::

    @register("name", severities=(m1, m2, m3, m4, m5), augment=(low, high))
    def _name(u, m, rng):       # u: the magnitude proxy (C, D, H, W); m: the magnitude -> like u
        ...

With `proxy=True` (the default) the function sees the non-negative magnitude image as a per-channel proxy:
raw intensities divided by the channel's brain maximum (so 1 is the brightest brain voxel, 0 no signal,
background 0); its result is scaled back and skull-stripped again with the clean brain mask (background
exactly 0, the BraTS convention). With `proxy=False` it gets the raw volume itself (modality-level faults).

Benchmark magnitudes (`severities`, one per severity) and augmentation ranges (`augment`, training-time
corruption through `augment`) are separate; registration refuses a range reaching the weakest benchmark
level, so a benchmark never tests what a model was trained on. Definitions follow MONAI (GibbsNoise,
KSpaceSpikeNoise, GaussianSmooth, RandBiasField's Legendre field, RandRicianNoise) and TorchIO
(RandomGhosting, RandomMotion, translations only); random geometry is drawn from the seed independently
of the severity, so a higher severity distorts the same volume more.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.polynomial import legendre
from scipy import fft

MagnitudeFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

SEVERITIES = (1, 2, 3, 4, 5)
SLICE_AXIS = -1  # RAS: the last spatial axis runs inferior-superior (axial slices)
BIAS_DEGREE = 3
#: Where the corruptions act (recorded in robustness outputs): on the raw acquisition, before the z-score.
CORRUPTION_SPACE = "acquisition"


def _check(volume: np.ndarray, name: str) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 4 or volume.dtype != np.float32:
        raise ValueError(f"{name}: expected a float32 (C, D, H, W) volume, got {volume.dtype} {volume.shape}")
    return volume


@dataclass(frozen=True)
class Corruption:
    """A registered corruption of raw volumes: fn(volume, magnitude, rng), its magnitude per severity
    1..5 and its training-time magnitude range (None: benchmark only)."""

    name: str
    fn: MagnitudeFn
    severities: tuple[float, ...]
    augment: tuple[float, float] | None = None

    def at(self, volume: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        """Corrupt a raw float32 (C, D, H, W) volume at `magnitude` (units in the function's docstring)."""
        return self.fn(_check(volume, self.name), magnitude, rng).astype(np.float32)

    def __call__(self, volume: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        """Corrupt a raw volume at a benchmark severity; severity 0 is the identity."""
        if severity not in (0, *SEVERITIES):
            raise ValueError(f"{self.name}: severity must be 0..5, got {severity}")
        if severity == 0:
            return _check(volume, self.name).copy()
        return self.at(volume, self.severities[severity - 1], rng)


#: The registry, in registration order (the order `corruptions: all` runs them).
CORRUPTIONS: dict[str, Corruption] = {}


def register(
    name: str,
    severities: tuple[float, ...],
    augment: tuple[float, float] | None = None,
    proxy: bool = True,
) -> Callable[[MagnitudeFn], MagnitudeFn]:
    """Decorator adding fn(u or volume, magnitude, rng) as corruption `name` with its magnitude per
    severity 1..5 and, optionally, a training range (low, high) below the weakest benchmark magnitude."""
    if len(severities) != len(SEVERITIES):
        raise ValueError(f"corruption {name!r}: need one magnitude per severity {SEVERITIES}")
    if augment is not None and not augment[0] < augment[1] < min(severities):
        raise ValueError(f"corruption {name!r}: augment range {augment} must lie below {min(severities)}")

    def add(fn: MagnitudeFn) -> MagnitudeFn:
        if name in CORRUPTIONS:
            raise ValueError(f"corruption {name!r} is already registered")
        lifted = _on_magnitude(fn) if proxy else fn
        CORRUPTIONS[name] = Corruption(name, lifted, tuple(severities), augment)
        return fn

    return add


# ---------------------------------------------------------------- the magnitude proxy


def _on_magnitude(fn: MagnitudeFn) -> MagnitudeFn:
    """Lift a corruption of the per-channel [0, 1] magnitude proxy to one of the raw volume."""

    def apply(volume: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        brain = np.any(volume != 0, axis=0)
        peak = np.array([volume[c][brain].max() if brain.any() else 0.0 for c in range(len(volume))])
        live = peak > 0  # a channel without signal (e.g. a missing series) stays as it is
        scale = np.where(live, peak, 1.0).astype(np.float32)[:, None, None, None]
        u = np.where(brain, volume / scale, 0.0).astype(np.float32)
        out = np.where(brain, fn(u, magnitude, rng) * scale, 0.0).astype(np.float32)
        out[~live] = volume[~live]
        return out

    apply.__doc__ = fn.__doc__
    return apply


def _kspace(u: np.ndarray) -> np.ndarray:
    return fft.fftshift(fft.fftn(u, axes=(1, 2, 3), workers=2), axes=(1, 2, 3))


def _image(k: np.ndarray) -> np.ndarray:
    """Magnitude image of centred k-space (MR reconstructions are magnitudes)."""
    return np.abs(fft.ifftn(fft.ifftshift(k, axes=(1, 2, 3)), axes=(1, 2, 3), workers=2)).astype(np.float32)


# ---------------------------------------------------------------- corruptions of the magnitude proxy


def legendre_terms(degree: int = BIAS_DEGREE) -> list[tuple[int, int, int]]:
    """Exponents (i, j, k) with i + j + k <= degree of the 3-D Legendre products (MONAI RandBiasField)."""
    return [t for t in itertools.product(range(degree + 1), repeat=3) if sum(t) <= degree]


def _log_bias_field(shape: tuple[int, int, int], coeffs: np.ndarray, degree: int) -> np.ndarray:
    """sum_t c_t P_i(x) P_j(y) P_k(z) on a grid spanning [-1, 1] along each axis (separable contraction)."""
    axes = [legendre.legvander(np.linspace(-1, 1, n), degree) for n in shape]  # (n, degree + 1)
    table = np.zeros((degree + 1,) * 3)
    for c, (i, j, k) in zip(coeffs, legendre_terms(degree), strict=True):
        table[i, j, k] = c
    return np.einsum("ai,bj,ck,ijk->abc", *axes, table, optimize=True)


def bias_field(shape: tuple[int, int, int], coeffs: np.ndarray, degree: int = BIAS_DEGREE) -> np.ndarray:
    """exp(sum_t c_t P_i(x) P_j(y) P_k(z)) on a grid spanning [-1, 1] along each axis."""
    return np.exp(_log_bias_field(shape, coeffs, degree))


@register("bias_field", severities=(0.1, 0.2, 0.3, 0.45, 0.6), augment=(0.0, 0.08))
def _bias_field(u: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply each channel by its own smooth field exp(poly) of degree 3, max |poly| over the brain = m.

    m is the peak log-gain: m = 0.6 gives a field between 0.55 and 1.8.
    """
    coeffs = rng.uniform(-1.0, 1.0, size=(len(u), len(legendre_terms())))
    brain = np.any(u > 0, axis=0)
    out = np.empty_like(u)
    for c, k in enumerate(coeffs):
        log_field = _log_bias_field(u.shape[1:], k, BIAS_DEGREE)
        out[c] = u[c] * np.exp(log_field * (magnitude / np.abs(log_field[brain]).max()))
    return out


@register("ghosting", severities=(0.4, 0.55, 0.7, 0.85, 1.0), augment=(0.0, 0.3))
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
    k = k * np.where(hit, 1.0 - intensity, 1.0).astype(np.float32).reshape(shape)
    return _image(k)


@register("motion", severities=(0.3, 0.4, 0.5, 0.6, 0.7), augment=(0.0, 0.2))
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
    return _image(_kspace(u) * np.exp(-2j * np.pi * phase).astype(np.complex64)[None])


@register("spike", severities=(0.2, 0.4, 0.7, 1.0, 1.5), augment=(0.0, 0.15))
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


@register("gaussian_noise", severities=(0.02, 0.04, 0.06, 0.09, 0.12), augment=(0.0, 0.015))
def _gaussian_noise(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive N(0, sigma^2) noise, sigma a fraction of the channel's brain maximum."""
    return u + sigma * rng.standard_normal(u.shape, dtype=np.float32)


@register("rician_noise", severities=(0.02, 0.04, 0.06, 0.09, 0.12), augment=(0.0, 0.015))
def _rician_noise(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician magnitude noise |u + n_re + i n_im|, n ~ N(0, sigma^2) (MONAI RandRicianNoise, absolute)."""
    real = u + sigma * rng.standard_normal(u.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(u.shape, dtype=np.float32)
    return np.sqrt(real**2 + imag**2)


@register("blur", severities=(0.5, 0.75, 1.0, 1.5, 2.0), augment=(0.0, 0.4))
def _blur(u: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Isotropic Gaussian blur, sigma in voxels (MONAI GaussianSmooth)."""
    from monai.transforms import GaussianSmooth

    return np.asarray(GaussianSmooth(sigma=sigma)(torch.from_numpy(u)), dtype=np.float32)


@register("gibbs", severities=(0.45, 0.55, 0.65, 0.75, 0.85), augment=(0.0, 0.35))
def _gibbs(u: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """MONAI GibbsNoise: k-space truncated to a sphere of radius (1 - alpha) * max(shape) / sqrt 2."""
    from monai.transforms import GibbsNoise

    return np.asarray(GibbsNoise(alpha=alpha)(torch.from_numpy(u)), dtype=np.float32)


@register("gamma", severities=(0.15, 0.3, 0.45, 0.6, 0.8), augment=(0.0, 0.1))
def _gamma(u: np.ndarray, log_gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Contrast change u^gamma with gamma = exp(±m), the sign drawn per channel."""
    signs = rng.choice([-1.0, 1.0], size=len(u))
    gamma = np.exp(signs * log_gamma).astype(np.float32)
    return np.clip(u, 0.0, None) ** gamma[:, None, None, None]


@register("downsample", severities=(2.0, 3.0, 4.0, 5.0, 6.0), augment=(1.0, 1.5))
def _downsample(u: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Thick slices: average-pool the slice axis by `factor`, then linear interpolation back."""
    x = torch.from_numpy(np.moveaxis(u, SLICE_AXIS, -1).copy())  # (C, D, H, S)
    c, d, h, s = x.shape
    low = torch.nn.functional.interpolate(
        x.reshape(1, c * d, h, s), size=(h, max(1, round(s / factor))), mode="area"
    )
    back = torch.nn.functional.interpolate(low, size=(h, s), mode="bilinear", align_corners=False)
    return np.moveaxis(back.reshape(c, d, h, s).numpy(), -1, SLICE_AXIS)


# ---------------------------------------------------------------- modality corruptions (the raw volume)


def _slab(n: int, fraction: float, rng: np.random.Generator) -> slice:
    """The first or last ceil(fraction * n) slices (an incomplete series), end chosen by the seed."""
    count = int(np.ceil(fraction * n))
    return slice(0, count) if rng.integers(2) == 0 else slice(n - count, n)


@register("missing_modality", severities=(0.2, 0.4, 0.6, 0.8, 1.0), proxy=False)
def missing_modality(volume: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Zero one modality (chosen by the seed) over a slab of `fraction` of the axial slices; 1.0 = all."""
    channel = int(rng.integers(volume.shape[0]))
    where = _slab(volume.shape[SLICE_AXIS], fraction, rng)
    out = volume.copy()
    np.moveaxis(out, SLICE_AXIS, -1)[channel, ..., where] = 0.0
    return out


@register("swapped_modalities", severities=(0.2, 0.4, 0.6, 0.8, 1.0), proxy=False)
def swapped_modalities(volume: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Swap two modalities (chosen by the seed) over a slab of `fraction` of the slices; 1.0 = all."""
    a, b = (int(i) for i in rng.choice(volume.shape[0], size=2, replace=False))
    where = _slab(volume.shape[SLICE_AXIS], fraction, rng)
    out = volume.copy()
    src = np.moveaxis(volume, SLICE_AXIS, -1)
    dst = np.moveaxis(out, SLICE_AXIS, -1)
    dst[a, ..., where], dst[b, ..., where] = src[b, ..., where], src[a, ..., where]
    return out


# ---------------------------------------------------------------- use


def _known(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def corrupt_volume(volume: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Apply one benchmark corruption to a raw volume, deterministically for `seed`."""
    return _known(name)(volume, severity, np.random.default_rng(seed))


def augment(volume: np.ndarray, rng: np.random.Generator, p: float = 0.25) -> np.ndarray:
    """Training-time corruption of a raw volume: each corruption with an `augment` range, in registry
    order, with probability p at a magnitude drawn uniformly from its range."""
    volume = _check(volume, "augment")
    for c in CORRUPTIONS.values():
        if c.augment is not None and rng.random() < p:
            volume = c.at(volume, float(rng.uniform(*c.augment)), rng)
    return volume


def study_record(names: list[str]) -> dict[str, Any]:
    """What a robustness output records about the corruptions: where they act and the severity table."""
    return {
        "corruption_space": CORRUPTION_SPACE,
        "preprocessing": "segmentation.data.preprocess after the corruption: the z-score of training",
        "severity_table": {n: list(_known(n).severities) for n in names},
    }
