"""H&E tile corruptions (ImageNet-C / Pathology-C style), 5 severities each, deterministic for a seed.

Every function takes uint8 RGB tiles, one (H, W, 3) or a batch (N, H, W, 3), a severity 0..5 (0 is the
identity) and a `numpy.random.Generator`, and returns uint8 of the same shape. Random quantities (motion
angle, stroke and bubble geometry, noise, signs) are drawn independently of the severity, so for one seed
a higher severity distorts the same tile strictly more.

Parameter sources (written here from the published tables; no code copied):
- ImageNet-C, Hendrycks & Dietterich, ICLR 2019, github.com/hendrycks/robustness
  `ImageNet-C/imagenet_c/imagenet_c/corruptions.py`: gaussian_noise, contrast, defocus_blur, motion_blur,
  pixelate, jpeg_compression (the last four also used unchanged by Pathology-C).
- Pathology-C, Zhang et al., MICCAI 2022 (arXiv 2206.14973), github.com/superjamessyx/robustness_benchmark
  `utils.py`: brightness, saturation and hue shifts in HSV (+0.05 .. +0.25), bubble blend ratios
  (0.1 .. 0.9), pen marking.
- Stain variation after Tellez et al., IEEE TMI 2018 / MedIA 2019 (HED scale and shift), on the
  Ruifrok & Johnston deconvolution matrices of `skimage.color`.
Spatial parameters are defined for 224 px tiles (as in ImageNet-C) and scaled by min(H, W) / 224, so a
corruption looks the same to a network after the extractor resizes the tile to its input size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage, signal
from skimage import color

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

#: Severity parameters, index = severity - 1.
PARAMS: dict[str, list] = {
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],  # ImageNet-C / Pathology-C: BOX resize factor
    "jpeg": [25, 18, 15, 10, 7],  # ImageNet-C / Pathology-C: JPEG quality
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],  # ImageNet-C: disk radius, alias σ
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],  # ImageNet-C: ImageMagick radius, σ
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],  # ImageNet-C: σ on [0, 1]
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.25],  # Pathology-C: + V in HSV
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],  # ImageNet-C: factor towards the channel mean
    "saturation": [0.05, 0.1, 0.15, 0.2, 0.25],  # Pathology-C: + S in HSV
    "hue": [0.05, 0.1, 0.15, 0.2, 0.25],  # Pathology-C: + H in HSV (wraps)
    "stain": [0.1, 0.2, 0.3, 0.4, 0.5],  # σ: H, E scaled by 1 ± σ, shifted by ± σ x tile mean
    "pen_marking": [(1, 0.02, 0.5), (1, 0.04, 0.6), (2, 0.05, 0.7), (2, 0.07, 0.8), (3, 0.09, 0.9)],
    "bubble": [0.1, 0.3, 0.5, 0.7, 0.9],  # Pathology-C: blend ratio of the bubble inside its outline
    "out_of_focus_patch": [(0.2, 3), (0.3, 4), (0.4, 6), (0.5, 8), (0.6, 10)],  # area fraction, radius
}

# Ink transmittance (RGB) of common slide-marker colours: green, blue, black, red.
INKS = np.array([[0.15, 0.55, 0.3], [0.15, 0.25, 0.7], [0.15, 0.15, 0.15], [0.8, 0.15, 0.2]], np.float32)
MAX_STROKES = 3


def _scale(x: np.ndarray) -> float:
    """Spatial scale of a batch relative to the 224 px tiles the parameters were set for."""
    return min(x.shape[1], x.shape[2]) / 224.0


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


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Down- then up-sample with PIL's BOX filter (area average), as ImageNet-C."""
    c = PARAMS["pixelate"][severity - 1]
    out = np.empty_like(x)
    for i, tile in enumerate(x):
        h, w = tile.shape[:2]
        small = Image.fromarray(tile).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
        out[i] = np.asarray(small.resize((w, h), Image.BOX))
    return out


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Re-encode with PIL's JPEG encoder at the ImageNet-C quality (default 4:2:0 chroma subsampling)."""
    quality = PARAMS["jpeg"][severity - 1]
    out = np.empty_like(x)
    for i, tile in enumerate(x):
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Convolve with an anti-aliased disk (reflect border, as cv2.filter2D in ImageNet-C)."""
    radius, alias = PARAMS["defocus_blur"][severity - 1]
    s = _scale(x)
    return _uint8(_convolve(_float(x), disk_kernel(radius * s, alias * s), "reflect"))


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick-style one-sided motion blur at a random angle in [-45, 45] degrees per tile."""
    radius, sigma = PARAMS["motion_blur"][severity - 1]
    s = _scale(x)
    angles = rng.uniform(-45, 45, size=len(x))
    f = _float(x)
    out = np.empty_like(f)
    for i, angle in enumerate(angles):
        out[i] = _convolve(f[i : i + 1], motion_kernel(radius * s, sigma * s, angle), "edge")[0]
    return _uint8(out)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, σ²) noise on the [0, 1] scale, clipped."""
    sigma = PARAMS["gaussian_noise"][severity - 1]
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


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Raise V in HSV by the Pathology-C amount."""
    return _hsv_shift(x, 2, PARAMS["brightness"][severity - 1], wrap=False)


def saturation(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Raise S in HSV by the Pathology-C amount (over-saturated stain)."""
    return _hsv_shift(x, 1, PARAMS["saturation"][severity - 1], wrap=False)


def hue(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate H in HSV by the Pathology-C amount (stain colour shift)."""
    return _hsv_shift(x, 0, PARAMS["hue"][severity - 1], wrap=True)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pull every channel towards its tile mean: (x - mean) * c + mean."""
    c = PARAMS["contrast"][severity - 1]
    f = _float(x)
    mean = f.mean(axis=(1, 2), keepdims=True)
    return _uint8((f - mean) * c + mean)


def stain(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Scale and shift the haematoxylin and eosin concentrations after colour deconvolution.

    Optical density OD = -ln(rgb) is unmixed with skimage's H-E-DAB matrix (no clamping, so the round
    trip is exact); H and E become (1 ± σ) c ± σ mean(c) with random signs per tile, then re-mixed.
    """
    sigma = PARAMS["stain"][severity - 1]
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


def pen_marking(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Semi-transparent marker strokes (Pathology-C's pen marking), drawn as smooth curves of ink.

    Ink absorbs light: inside a stroke the tile is multiplied by the ink's transmittance, mixed by the
    opacity. Stroke count, width and opacity grow with severity on curves fixed by the seed.
    """
    n_strokes, width_frac, opacity = PARAMS["pen_marking"][severity - 1]
    size = x.shape[1:3]
    f = _float(x)
    out = np.empty_like(f)
    for i in range(len(x)):
        curves = [_stroke_points(rng, size) for _ in range(MAX_STROKES)]
        ink = INKS[rng.integers(len(INKS))]
        width = max(1, round(width_frac * min(size)))

        def draw(d: ImageDraw.ImageDraw, curves=curves, width=width) -> None:
            for pts in curves[:n_strokes]:
                d.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")

        mask = ndimage.gaussian_filter(_draw_mask(size, draw), sigma=max(0.5, 0.1 * width))[..., None]
        out[i] = f[i] * (1.0 - opacity * mask * (1.0 - ink))
    return _uint8(out)


def bubble(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Air bubbles under the coverslip: washed-out, slightly blurred discs with a dark refractive rim.

    As Pathology-C, the bubble appearance is blended in with a ratio that grows with severity; the
    outlines (1-3 discs, radius 15-30 % of the tile) are fixed by the seed.
    """
    ratio = PARAMS["bubble"][severity - 1]
    n, h, w = x.shape[:3]
    s = _scale(x)
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
            disc = np.clip((r - d) / (2 * s) + 0.5, 0, 1)
            rim[y0:y1, x0:x1] = np.maximum(rim[y0:y1, x0:x1], ring)
            m[y0:y1, x0:x1] = np.maximum(m[y0:y1, x0:x1], np.maximum(disc, ring))
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        # PIL's Gaussian blur (uint8, C) is far cheaper than a float convolution at 1000 px
        blurred = (
            np.asarray(Image.fromarray(x[i]).filter(ImageFilter.GaussianBlur(2 * s)), np.float32) / 255.0
        )
        look = (0.55 + 0.45 * blurred[win]) * (1.0 - 0.5 * rim[win][..., None])
        mw = ratio * m[win][..., None]
        out[i][win] = f[i][win] * (1 - mw) + look * mw
    return _uint8(out)


def out_of_focus_patch(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Part of the tile out of focus (uneven section, tissue fold): disk blur inside a smooth random region.

    The region is the top `area` fraction of a smooth random field fixed by the seed, so regions of
    higher severities contain those of lower ones.
    """
    area, radius = PARAMS["out_of_focus_patch"][severity - 1]
    n, h, w = x.shape[:3]
    s = _scale(x)
    f = _float(x)
    blurred = _convolve(f, disk_kernel(radius * s, 0.5 * s), "reflect")
    out = np.empty_like(f)
    for i in range(n):
        coarse = ndimage.zoom(rng.standard_normal((6, 6)), 64 / 6, order=3, mode="nearest")  # 64 x 64
        field = ndimage.zoom(coarse, (h / 64, w / 64), order=1)[:h, :w].astype(np.float32)
        # soft threshold at the (1 - area) quantile: a smooth-edged region, nested across severities
        width = 0.05 * float(np.ptp(coarse))
        mask = np.clip((field - np.quantile(coarse, 1.0 - area)) / width + 0.5, 0.0, 1.0)[..., None]
        out[i] = f[i] * (1 - mask) + blurred[i] * mask
    return _uint8(out)


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "pixelate": pixelate,
    "jpeg": jpeg,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "gaussian_noise": gaussian_noise,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "hue": hue,
    "stain": stain,
    "pen_marking": pen_marking,
    "bubble": bubble,
    "out_of_focus_patch": out_of_focus_patch,
}

SEVERITIES = (1, 2, 3, 4, 5)


def _checked(name: str) -> Corruption:
    """Wrap a batch function: validate input, accept (H, W, 3) or (N, H, W, 3), severity 0 = identity."""
    batch_fn = _FUNCTIONS[name]

    def apply(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim not in (3, 4) or rgb.shape[-1] != 3:
            raise ValueError(f"{name}: expected uint8 (H, W, 3) or (N, H, W, 3), got {rgb.dtype} {rgb.shape}")
        if severity not in (0, *SEVERITIES):
            raise ValueError(f"{name}: severity must be 0..5, got {severity}")
        if severity == 0:
            return rgb.copy()
        single = rgb.ndim == 3
        out = batch_fn(rgb[None] if single else rgb, severity, rng)
        return out[0] if single else out

    apply.__name__ = name
    apply.__doc__ = batch_fn.__doc__
    return apply


#: name -> fn(rgb uint8 (H, W, 3) or (N, H, W, 3), severity 0..5, rng) -> uint8 of the same shape.
CORRUPTIONS: dict[str, Corruption] = {name: _checked(name) for name in _FUNCTIONS}


def corrupt_tiles(
    tiles: np.ndarray, name: str, severity: int, seed: int, chunk: int = 16, workers: int = 1
) -> np.ndarray:
    """Corrupt tiles deterministically for (`seed`, `chunk`): chunk i gets the i-th child of the seed's
    SeedSequence, so the result does not depend on `workers` (threads; numpy/scipy release the GIL)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    tiles = np.asarray(tiles)
    fn = CORRUPTIONS[name]
    if tiles.ndim == 3:
        return fn(tiles, severity, np.random.default_rng(seed))
    starts = range(0, len(tiles), chunk)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(starts))]

    def one(i: int) -> np.ndarray:
        return fn(tiles[starts[i] : starts[i] + chunk], severity, rngs[i])

    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(one, range(len(starts))))
    else:
        parts = [one(i) for i in range(len(starts))]
    return np.concatenate(parts) if parts else tiles.copy()


def seeded(name: str, chunk: int = 16, workers: int = 1) -> Corruption:
    """`CORRUPTIONS[name]` as fn(tiles, severity, rng) running `corrupt_tiles` on a seed drawn from rng
    (for harnesses that hand out generators): chunked and multi-threaded, still deterministic."""

    def apply(tiles: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        return corrupt_tiles(tiles, name, severity, int(rng.integers(2**63)), chunk, workers)

    apply.__name__ = name
    return apply
