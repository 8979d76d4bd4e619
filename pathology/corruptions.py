"""H&E tile corruptions (ImageNet-C / Pathology-C style): a registry of 5-severity corruptions.

A corruption is one batch function plus its registration with its severity table row::

    @register("name", severities=(p1, p2, p3, p4, p5), spatial=False)
    def name(x, p, rng):            # spatial=True: name(x, p, rng, scale)
        ...                         # x uint8 (N, H, W, 3), p the parameter of the severity -> uint8 like x

`CORRUPTIONS[name](rgb, severity, rng, mpp=...)` validates the input, takes one (H, W, 3) tile or a batch
(N, H, W, 3), treats severity 0 as the identity and returns uint8 of the same shape. Random quantities
(motion angle, stroke and bubble geometry, noise, signs) are drawn independently of the severity, so for
one seed a higher severity distorts the same tile strictly more.

Physical scale. Spatial parameters (blur radii, alias σ, edge softness, pixelate's pixel pitch) are
ImageNet-C's, defined for 224 px images; histo reads them as lengths at the reference resolution
REFERENCE_MPP = 0.5 µm/px (a 224 px tile at 20x, 112 µm across) and converts them to the tile's pixels
with scale = REFERENCE_MPP / tile µm/px. A 1000 px and a 224 px tile at 20x therefore get the same blur
in µm, and a tile at 40x (0.25 µm/px) twice the blur in pixels. Coverage parameters (pen stroke width,
bubble size, out-of-focus area) are fractions of the tile, since their severity is the share of the tile
hit; JPEG and Gaussian noise act on the stored pixels (8x8 codec blocks, per-pixel noise).

Parameter sources (written here from the published tables; no code copied):
- ImageNet-C, Hendrycks & Dietterich, ICLR 2019, github.com/hendrycks/robustness
  `ImageNet-C/imagenet_c/imagenet_c/corruptions.py`: gaussian_noise, contrast, defocus_blur, motion_blur,
  pixelate, jpeg_compression (the last four also used unchanged by Pathology-C).
- Pathology-C, Zhang et al., MICCAI 2022 (arXiv 2206.14973), github.com/superjamessyx/robustness_benchmark
  `utils.py`: brightness, saturation and hue shifts in HSV (+0.05 .. +0.25), bubble blend ratios
  (0.1 .. 0.9), pen marking.
- Stain variation after Tellez et al., IEEE TMI 2018 / MedIA 2019 (HED scale and shift), on the
  Ruifrok & Johnston deconvolution matrices of `skimage.color`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage, signal
from skimage import color

SEVERITIES = (1, 2, 3, 4, 5)
#: µm/px at which the spatial parameters (ImageNet-C's, for 224 px images) are lengths: 224 px at 20x.
REFERENCE_MPP = 0.5

# Ink transmittance (RGB) of common slide-marker colours: green, blue, black, red.
INKS = np.array([[0.15, 0.55, 0.3], [0.15, 0.25, 0.7], [0.15, 0.15, 0.15], [0.8, 0.15, 0.2]], np.float32)
MAX_STROKES = 3


def spatial_scale(mpp: float) -> float:
    """Tile pixels per reference pixel (REFERENCE_MPP / mpp): converts the spatial parameters to the tile."""
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tile resolution must be a positive µm/px, got {mpp!r}")
    return REFERENCE_MPP / value


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its batch function, its parameter per severity 1..5, and whether the
    parameters are lengths (then the function also gets the tile's `spatial_scale`)."""

    name: str
    fn: Callable[..., np.ndarray]
    severities: tuple[Any, ...]
    spatial: bool = False

    def __call__(
        self, rgb: np.ndarray, severity: int, rng: np.random.Generator, mpp: float = REFERENCE_MPP
    ) -> np.ndarray:
        """Corrupt uint8 (H, W, 3) or (N, H, W, 3) tiles at `mpp` µm/px; severity 0 is the identity."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: expected uint8 (H, W, 3) or (N, H, W, 3), got {rgb.dtype} {rgb.shape}"
            )
        if severity not in (0, *SEVERITIES):
            raise ValueError(f"{self.name}: severity must be 0..5, got {severity}")
        scale = spatial_scale(mpp)
        if severity == 0:
            return rgb.copy()
        batch = rgb[None] if rgb.ndim == 3 else rgb
        p = self.severities[severity - 1]
        out = self.fn(batch, p, rng, scale) if self.spatial else self.fn(batch, p, rng)
        return out[0] if rgb.ndim == 3 else out


#: The registry, in registration order (the order `corruptions: all` runs them).
CORRUPTIONS: dict[str, Corruption] = {}


def register(name: str, severities: tuple[Any, ...], spatial: bool = False) -> Callable:
    """Decorator adding fn(x (N, H, W, 3) uint8, p, rng[, scale]) -> uint8 as corruption `name`, with
    `severities` its parameter at severity 1..5 (lengths in reference pixels when `spatial`)."""
    if len(severities) != len(SEVERITIES):
        raise ValueError(f"corruption {name!r}: need one parameter per severity {SEVERITIES}")

    def add(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in CORRUPTIONS:
            raise ValueError(f"corruption {name!r} is already registered")
        CORRUPTIONS[name] = Corruption(name, fn, tuple(severities), spatial)
        return fn

    return add


def _float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _convolve(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """Convolve every (H, W) plane of (N, H, W, 3) with a 2-D kernel (FFT), padding the border."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode=pad_mode)
    out = signal.fftconvolve(padded, kernel[None, :, :, None].astype(np.float32), mode="valid", axes=(1, 2))
    return out.astype(np.float32)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """ImageNet-C's anti-aliased disk: a binary disk (grid at least 17x17) smoothed by a small Gaussian."""
    half = max(8, int(np.ceil(radius)))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    kernel /= kernel.sum()
    # cv2.GaussianBlur with ksize 3 (radius <= 8) or 5: a truncated Gaussian of that support.
    support = 1 if radius <= 8 else 2
    kernel = ndimage.gaussian_filter(kernel, alias_blur, mode="mirror", truncate=support / alias_blur)
    return kernel / kernel.sum()


def motion_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's MotionBlurImage kernel (used by ImageNet-C through Wand) as a 2-D convolution kernel.

    Taps i = 0 .. 2*ceil(radius) with weight exp(-i^2 / 2 sigma^2), sampled at the rounded offset
    i * (cos a, sin a): a one-sided blur trailing along the motion direction.
    """
    width = 2 * int(np.ceil(radius)) + 1
    taps = np.arange(width, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    angle = np.deg2rad(angle_deg)
    dx = np.ceil(taps * np.cos(angle) - 0.5).astype(int)
    dy = np.ceil(taps * np.sin(angle) - 0.5).astype(int)
    half = width - 1
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    # out(y, x) = sum_i w_i in(y + dy_i, x + dx_i): a correlation, so the convolution kernel is mirrored.
    np.add.at(kernel, (half - dy, half - dx), weights)
    return kernel


# ImageNet-C / Pathology-C: BOX resize factor at the reference resolution, i.e. a pixel pitch of
# REFERENCE_MPP / c µm (0.83 .. 2 µm); a tile already coarser than that pitch is left as it is.
@register("pixelate", severities=(0.6, 0.5, 0.4, 0.3, 0.25), spatial=True)
def pixelate(x: np.ndarray, c: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Down- then up-sample with PIL's BOX filter (area average), as ImageNet-C, to a fixed pitch in µm."""
    factor = min(1.0, c / scale)
    out = np.empty_like(x)
    for i, tile in enumerate(x):
        h, w = tile.shape[:2]
        small = Image.fromarray(tile).resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BOX)
        out[i] = np.asarray(small.resize((w, h), Image.BOX))
    return out


@register("jpeg", severities=(25, 18, 15, 10, 7))  # ImageNet-C / Pathology-C: JPEG quality
def jpeg(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    """Re-encode with PIL's JPEG encoder at the ImageNet-C quality (default 4:2:0 chroma subsampling)."""
    out = np.empty_like(x)
    for i, tile in enumerate(x):
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


# ImageNet-C: disk radius and alias σ in reference pixels.
@register("defocus_blur", severities=((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), spatial=True)
def defocus_blur(x: np.ndarray, p: tuple, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Convolve with an anti-aliased disk (reflect border, as cv2.filter2D in ImageNet-C)."""
    radius, alias = p
    return _uint8(_convolve(_float(x), disk_kernel(radius * scale, alias * scale), "reflect"))


# ImageNet-C: ImageMagick radius and σ in reference pixels.
@register("motion_blur", severities=((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), spatial=True)
def motion_blur(x: np.ndarray, p: tuple, rng: np.random.Generator, scale: float) -> np.ndarray:
    """ImageMagick-style one-sided motion blur at a random angle in [-45, 45] degrees per tile."""
    radius, sigma = p
    angles = rng.uniform(-45, 45, size=len(x))
    f = _float(x)
    out = np.empty_like(f)
    for i, angle in enumerate(angles):
        out[i] = _convolve(f[i : i + 1], motion_kernel(radius * scale, sigma * scale, angle), "edge")[0]
    return _uint8(out)


@register("gaussian_noise", severities=(0.08, 0.12, 0.18, 0.26, 0.38))  # ImageNet-C: σ on [0, 1]
def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, σ²) noise on the [0, 1] scale to every stored pixel, clipped."""
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    return _uint8(_float(x) + sigma * noise)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float32 RGB in [0, 1] -> HSV in [0, 1] (skimage's convention: grey pixels get hue 0)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = np.maximum(np.maximum(r, g), b)  # not .max(axis=-1): reductions over a length-3 axis are slow
    delta = v - np.minimum(np.minimum(r, g), b)
    grey = delta == 0
    safe = np.where(grey, np.float32(1.0), delta)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(grey, np.float32(0.0), np.mod(h / np.float32(6.0), np.float32(1.0)))
    s = np.where(v > 0, delta / np.where(v > 0, v, np.float32(1.0)), np.float32(0.0))
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`: channel n in (R 5, G 3, B 1) is v - v s clip(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6 (the closed form of the sextant formula), float32."""
    h6, s, v = hsv[..., 0] * np.float32(6.0), hsv[..., 1], hsv[..., 2]
    vs = v * s
    out = np.empty(hsv.shape, np.float32)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = np.mod(h6 + np.float32(n), np.float32(6.0))
        out[..., c] = v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return out


def _hsv_shift(x: np.ndarray, channel: int, shift: float, wrap: bool) -> np.ndarray:
    hsv = rgb_to_hsv(_float(x))
    moved = hsv[..., channel] + shift
    hsv[..., channel] = np.mod(moved, 1.0) if wrap else np.clip(moved, 0.0, 1.0)
    return _uint8(hsv_to_rgb(hsv))


@register("brightness", severities=(0.05, 0.1, 0.15, 0.2, 0.25))  # Pathology-C: + V in HSV
def brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Raise V in HSV by the Pathology-C amount."""
    return _hsv_shift(x, 2, shift, wrap=False)


@register("contrast", severities=(0.4, 0.3, 0.2, 0.1, 0.05))  # ImageNet-C: factor towards the mean
def contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Pull every channel towards its tile mean: (x - mean) * c + mean."""
    f = _float(x)
    mean = f.mean(axis=(1, 2), keepdims=True)
    return _uint8((f - mean) * c + mean)


@register("saturation", severities=(0.05, 0.1, 0.15, 0.2, 0.25))  # Pathology-C: + S in HSV
def saturation(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Raise S in HSV by the Pathology-C amount (over-saturated stain)."""
    return _hsv_shift(x, 1, shift, wrap=False)


@register("hue", severities=(0.05, 0.1, 0.15, 0.2, 0.25))  # Pathology-C: + H in HSV (wraps)
def hue(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate H in HSV by the Pathology-C amount (stain colour shift)."""
    return _hsv_shift(x, 0, shift, wrap=True)


@register("stain", severities=(0.1, 0.2, 0.3, 0.4, 0.5))  # σ of the H and E scale and shift
def stain(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift the haematoxylin and eosin concentrations after colour deconvolution.

    Optical density OD = -ln(rgb) is unmixed with skimage's H-E-DAB matrix (no clamping, so the round
    trip is exact); H and E become (1 ± σ) c ± σ mean(c) with random signs per tile, then re-mixed.
    """
    signs = rng.choice([-1.0, 1.0], size=(len(x), 2, 2))  # (tile, [scale, shift], [H, E])
    od = -np.log(np.maximum(_float(x), 1.0 / 255.0)).astype(np.float64)
    stains = od @ color.hed_from_rgb
    mean = stains[..., :2].mean(axis=(1, 2))  # (N, 2)
    alpha = 1.0 + sigma * signs[:, 0]
    beta = sigma * signs[:, 1] * mean
    stains[..., :2] = stains[..., :2] * alpha[:, None, None, :] + beta[:, None, None, :]
    return _uint8(np.exp(-(stains @ color.rgb_from_hed)))


def _stroke_points(rng: np.random.Generator, size: tuple[int, int], n: int = 48) -> np.ndarray:
    """A quadratic Bezier curve crossing the tile (pixel coordinates, (n, 2) as x, y)."""
    h, w = size
    p = rng.uniform(-0.1, 1.1, size=(3, 2)) * np.array([w, h])
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]


def _draw_mask(size: tuple[int, int], draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas, dtype=np.float32) / 255.0


# strokes, width (fraction of the tile side), opacity
@register(
    "pen_marking", severities=((1, 0.02, 0.5), (1, 0.04, 0.6), (2, 0.05, 0.7), (2, 0.07, 0.8), (3, 0.09, 0.9))
)
def pen_marking(x: np.ndarray, p: tuple, rng: np.random.Generator) -> np.ndarray:
    """Semi-transparent marker strokes (Pathology-C's pen marking), drawn as smooth curves of ink.

    Ink absorbs light: inside a stroke the tile is multiplied by the ink's transmittance, mixed by the
    opacity. Stroke count, width and opacity grow with severity on curves fixed by the seed.
    """
    n_strokes, width_frac, opacity = p
    size = x.shape[1:3]
    f = _float(x)
    out = np.empty_like(f)
    for i in range(len(x)):
        curves = [_stroke_points(rng, size) for _ in range(MAX_STROKES)]
        ink = INKS[rng.integers(len(INKS))]
        width = max(1, round(width_frac * min(size)))

        def draw(d: ImageDraw.ImageDraw, curves=curves, width=width) -> None:
            for pts in curves[:n_strokes]:
                d.line([tuple(pt) for pt in pts], fill=255, width=width, joint="curve")

        mask = ndimage.gaussian_filter(_draw_mask(size, draw), sigma=max(0.5, 0.1 * width))[..., None]
        out[i] = f[i] * (1.0 - opacity * mask * (1.0 - ink))
    return _uint8(out)


# Pathology-C: blend ratio of the bubble inside its outline; the edge softness and blur (2 reference px) scale
@register("bubble", severities=(0.1, 0.3, 0.5, 0.7, 0.9), spatial=True)
def bubble(x: np.ndarray, ratio: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Air bubbles under the coverslip: washed-out, slightly blurred discs with a dark refractive rim.

    As Pathology-C, the bubble appearance is blended in with a ratio that grows with severity; the
    outlines (1-3 discs, radius 15-30 % of the tile, rim 3 %) are fixed by the seed.
    """
    n, h, w = x.shape[:3]
    f = _float(x)
    out = f.copy()
    for i in range(n):
        m = np.zeros((h, w), np.float32)  # bubble coverage (disc and rim)
        rim = np.zeros((h, w), np.float32)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.15, 0.3) * min(h, w)
            band = 0.03 * min(h, w)
            # only the window that the disc and its rim can reach
            y0, y1 = max(0, int(cy - r - 3 * band)), min(h, int(cy + r + 3 * band) + 1)
            x0, x1 = max(0, int(cx - r - 3 * band)), min(w, int(cx + r + 3 * band) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.ogrid[y0:y1, x0:x1]
            d = np.hypot(yy - cy, xx - cx).astype(np.float32)
            ring = np.exp(-(((d - r) / band) ** 2))
            disc = np.clip((r - d) / (2 * scale) + 0.5, 0, 1)
            rim[y0:y1, x0:x1] = np.maximum(rim[y0:y1, x0:x1], ring)
            m[y0:y1, x0:x1] = np.maximum(m[y0:y1, x0:x1], np.maximum(disc, ring))
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        # PIL's Gaussian blur (uint8, C) is far cheaper than a float convolution at 1000 px
        blurred = (
            np.asarray(Image.fromarray(x[i]).filter(ImageFilter.GaussianBlur(2 * scale)), np.float32) / 255.0
        )
        look = (0.55 + 0.45 * blurred[win]) * (1.0 - 0.5 * rim[win][..., None])
        mw = ratio * m[win][..., None]
        out[i][win] = f[i][win] * (1 - mw) + look * mw
    return _uint8(out)


# area (fraction of the tile), disk radius in reference pixels
@register("out_of_focus_patch", severities=((0.2, 3), (0.3, 4), (0.4, 6), (0.5, 8), (0.6, 10)), spatial=True)
def out_of_focus_patch(x: np.ndarray, p: tuple, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Part of the tile out of focus (uneven section, tissue fold): disk blur inside a smooth random region.

    The region is the top `area` fraction of a smooth random field fixed by the seed, so regions of
    higher severities contain those of lower ones.
    """
    area, radius = p
    n, h, w = x.shape[:3]
    f = _float(x)
    blurred = _convolve(f, disk_kernel(radius * scale, 0.5 * scale), "reflect")
    out = np.empty_like(f)
    for i in range(n):
        coarse = ndimage.zoom(rng.standard_normal((6, 6)), 64 / 6, order=3, mode="nearest")  # 64 x 64
        field = ndimage.zoom(coarse, (h / 64, w / 64), order=1)[:h, :w].astype(np.float32)
        # soft threshold at the (1 - area) quantile: a smooth-edged region, nested across severities
        width = 0.05 * float(np.ptp(coarse))
        mask = np.clip((field - np.quantile(coarse, 1.0 - area)) / width + 0.5, 0.0, 1.0)[..., None]
        out[i] = f[i] * (1 - mask) + blurred[i] * mask
    return _uint8(out)


def _known(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def corrupt_tiles(
    tiles: np.ndarray,
    name: str,
    severity: int,
    seed: int,
    chunk: int = 16,
    workers: int = 1,
    mpp: float = REFERENCE_MPP,
) -> np.ndarray:
    """Corrupt tiles at `mpp` µm/px deterministically for (`seed`, `chunk`): chunk i gets the i-th child
    of the seed's SeedSequence, so the result does not depend on `workers` (threads release the GIL)."""
    fn = _known(name)
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        return fn(tiles, severity, np.random.default_rng(seed), mpp)
    starts = range(0, len(tiles), chunk)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(starts))]

    def one(i: int) -> np.ndarray:
        return fn(tiles[starts[i] : starts[i] + chunk], severity, rngs[i], mpp)

    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(one, range(len(starts))))
    else:
        parts = [one(i) for i in range(len(starts))]
    return np.concatenate(parts) if parts else tiles.copy()


def seeded(
    name: str, chunk: int = 16, workers: int = 1, mpp: float = REFERENCE_MPP
) -> Callable[[np.ndarray, int, np.random.Generator], np.ndarray]:
    """`CORRUPTIONS[name]` as fn(tiles, severity, rng) running `corrupt_tiles` at `mpp` on a seed drawn
    from rng (for harnesses that hand out generators): chunked and multi-threaded, still deterministic."""
    _known(name)
    spatial_scale(mpp)

    def apply(tiles: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        return corrupt_tiles(tiles, name, severity, int(rng.integers(2**63)), chunk, workers, mpp)

    apply.__name__ = name
    return apply


def study_record(names: list[str], mpp: float) -> dict[str, Any]:
    """What a robustness output records about the corruptions: the severity table and the scaling rule."""
    return {
        "severity_table": {n: list(_known(n).severities) for n in names},
        "spatial_scaling": {
            "rule": (
                "spatial parameters are lengths at reference_mpp µm/px; in tile pixels they are"
                " multiplied by scale = reference_mpp / tile_mpp"
            ),
            "reference_mpp": REFERENCE_MPP,
            "tile_mpp": float(mpp),
            "scale": spatial_scale(mpp),
            "scaled": [n for n in names if _known(n).spatial],
        },
    }
