"""Synthetic H&E-like whole-slide images that OpenSlide opens (Aperio-style SVS or generic tiled TIFF).

Texture is rendered in optical-density space (Beer-Lambert, haematoxylin and eosin stain vectors): an
eosin field with fibres and lumens, and haematoxylin nuclei whose density, size, shape and colour
depend on the class. A slide is assembled from a small bank of rendered 512 px tiles (8 orientations
each) placed on smooth random tissue blobs; full tissue and background tiles are JPEG-encoded once and
reused, so a 60,000 x 40,000 px pyramid takes seconds to write and memory stays small.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import ndtri

from histo.io import atomic_path

H_VEC = np.array([0.65, 0.70, 0.29])  # haematoxylin OD per unit concentration (Ruifrok-Johnston)
E_VEC = np.array([0.07, 0.99, 0.11])  # eosin
BANK = 12  # rendered tissue tiles per slide
CELL = 32  # level-0 px per cell of the tissue layout
BACKGROUND = (246.0, 245.0, 247.0)


@dataclass(frozen=True)
class Style:
    """Class appearance: nuclei per mm², radius (µm), elongation, stain strengths, fibres, colour."""

    nuclei_per_mm2: float
    radius_um: float
    elongation: float
    haematoxylin: float
    eosin: float
    fibre: float
    angle: float
    lumens: float  # fraction of white lumen/gland space
    hue: float  # rotates the haematoxylin vector toward blue (+) or red (-)


STYLES = (
    Style(1200, 2.6, 2.8, 1.1, 0.80, 0.55, 0.3, 0.00, 0.00),  # fibrous stroma: sparse spindle nuclei
    Style(9000, 2.4, 1.1, 1.7, 0.30, 0.05, 0.0, 0.02, 0.15),  # lymphoid: dense small dark round nuclei
    Style(4200, 4.6, 1.4, 0.9, 0.55, 0.10, 1.2, 0.18, -0.10),  # carcinoma: large pale nuclei, glands
    Style(2500, 3.4, 1.3, 1.2, 0.45, 0.25, 2.1, 0.08, 0.30),  # mixed, bluish
)


def style_of(class_id: int) -> Style:
    """The appearance of a class: a fixed table for the first four, seeded random ones beyond."""
    if class_id < len(STYLES):
        return STYLES[class_id]
    r = np.random.default_rng([7919, class_id])
    return Style(
        r.uniform(1000, 9000), r.uniform(2.3, 5.0), r.uniform(1.0, 3.0), r.uniform(0.8, 1.7),
        r.uniform(0.3, 0.8), r.uniform(0.0, 0.6), r.uniform(0, np.pi), r.uniform(0, 0.2), r.uniform(-0.2, 0.3),
    )  # fmt: skip


def stain_variant(style: Style, rng: np.random.Generator, jitter: float) -> Style:
    """A slide's own staining (a site, batch or scanner effect): stain strengths scaled by U(1 ± jitter)
    and hue shifted by U(± jitter), so colour alone no longer tells the classes apart."""
    if jitter <= 0:
        return style
    h, e = rng.uniform(1 - jitter, 1 + jitter, 2)
    hue = style.hue + rng.uniform(-jitter, jitter)
    return replace(style, haematoxylin=style.haematoxylin * h, eosin=style.eosin * e, hue=hue)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (float32): periodic Gaussian-filtered noise by FFT,
    computed on a coarser grid and upsampled when sigma is large."""
    factor = max(1, min(8, int(sigma // 4)))
    small = (-(-shape[0] // factor), -(-shape[1] // factor))
    fy = np.fft.fftfreq(small[0])[:, None]
    fx = np.fft.rfftfreq(small[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma / factor) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(small)) * transfer, s=small).astype(np.float32)
    if factor > 1:
        img = Image.fromarray(field).resize((small[1] * factor, small[0] * factor), Image.Resampling.BILINEAR)
        field = np.asarray(img)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-12)


def render_tissue(rng: np.random.Generator, style: Style, size: int, mpp: float) -> np.ndarray:
    """One size x size RGB uint8 tile of synthetic H&E at `mpp` µm/px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * np.float32(mpp)
    # Eosin: patchy field, fibres along the class angle, white lumens.
    patch = 0.75 + 0.25 * _smooth_noise(rng, (size, size), 12.0 / mpp)
    phase = 2.5 * _smooth_noise(rng, (size, size), 20.0 / mpp)
    along = xx * np.cos(style.angle) + yy * np.sin(style.angle)
    fibres = 1.0 + style.fibre * np.sin(2 * np.pi * along / 9.0 + phase)
    eosin = style.eosin * patch * fibres
    if style.lumens > 0:
        holes = _smooth_noise(rng, (size, size), 10.0 / mpp) > ndtri(1.0 - style.lumens)
        eosin = np.where(holes, 0.03, eosin)
    # Haematoxylin: elliptical nuclei with chromatin texture.
    nuclei = np.zeros((size, size), np.float32)
    area_mm2 = (size * mpp / 1000.0) ** 2
    n = rng.poisson(style.nuclei_per_mm2 * area_mm2)
    from skimage.draw import ellipse

    for _ in range(n):
        r = style.radius_um * rng.uniform(0.75, 1.3) / mpp
        a, b = r * np.sqrt(style.elongation), r / np.sqrt(style.elongation)
        angle = style.angle + rng.normal(0, 0.3) if style.elongation > 1.5 else rng.uniform(0, np.pi)
        rr, cc = ellipse(rng.uniform(0, size), rng.uniform(0, size), a, b, (size, size), rotation=angle)
        nuclei[rr, cc] = style.haematoxylin * rng.uniform(0.75, 1.2)
    chromatin = 1.0 + 0.25 * _smooth_noise(rng, (size, size), 0.6 / mpp)
    nuclei = ndimage.gaussian_filter(nuclei * chromatin, 0.35 / mpp)
    h_vec = (H_VEC + style.hue * np.array([-0.15, 0.0, 0.25])).astype(np.float32)
    od = nuclei[..., None] * h_vec + eosin[..., None] * E_VEC.astype(np.float32)
    od += rng.normal(0, 0.02, od.shape).astype(np.float32)
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def tissue_layout(rng: np.random.Generator, cells_y: int, cells_x: int, fraction: float) -> np.ndarray:
    """Smooth random blobs covering about `fraction` of a cells_y x cells_x grid (bool)."""
    field = _smooth_noise(rng, (cells_y, cells_x), max(cells_y, cells_x) / 10.0)
    yy, xx = np.mgrid[0:cells_y, 0:cells_x]
    # Fade out towards the border so tissue lies inside the slide like a real section.
    edge = np.minimum.reduce([yy, xx, cells_y - 1 - yy, cells_x - 1 - xx]) / (
        0.08 * min(cells_y, cells_x) + 1
    )
    field = field - 3.0 * np.clip(1.0 - edge, 0.0, 1.0)
    return field > np.quantile(field, 1.0 - fraction)


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


class _Renderer:
    """Level tiles of one synthetic slide, composed from the tile bank and the tissue layout."""

    def __init__(
        self,
        width: int,
        height: int,
        class_id: int,
        seed: int,
        mpp: float,
        tile: int,
        fraction: float,
        stain_jitter: float = 0.0,
    ):
        rng = np.random.default_rng([seed, class_id, 1])
        style = stain_variant(style_of(class_id), np.random.default_rng([seed, class_id, 2]), stain_jitter)
        self.tile, self.width, self.height = tile, width, height
        bank = [render_tissue(rng, style, tile, mpp) for _ in range(BANK)]
        self.bank = [
            np.rot90(t, k % 4)[:, ::-1] if k >= 4 else np.rot90(t, k) for t in bank for k in range(8)
        ]
        self.bank = [np.ascontiguousarray(t) for t in self.bank]
        self.background = np.clip(rng.normal(BACKGROUND, 1.2, (tile, tile, 3)), 0, 255).astype(np.uint8)
        self.ty, self.tx = -(-height // tile), -(-width // tile)
        self.choice = rng.integers(0, 8 * BANK, (self.ty, self.tx))  # bank tile * 8 + orientation
        cells_y, cells_x = -(-height // CELL), -(-width // CELL)
        layout = tissue_layout(rng, cells_y, cells_x, fraction)
        per = tile // CELL
        self.mask = np.zeros((self.ty * per + 2, self.tx * per + 2), np.float32)  # one-cell zero halo
        self.mask[1 : cells_y + 1, 1 : cells_x + 1] = layout
        self._small: dict[tuple[int, int], np.ndarray] = {}
        self._encoded: dict[int, bytes] = {}

    def _oriented(self, index: int) -> np.ndarray:
        """Bank tile index // 8 in orientation index % 8 (4 rotations, mirrored or not); -1: background."""
        if index < 0:
            return self.background
        tile, k = self.bank[index // 8], index % 8
        return np.ascontiguousarray(np.rot90(tile[:, ::-1] if k >= 4 else tile, k % 4))

    def _bank_at(self, index: int, ds: int) -> np.ndarray:
        key = (index, ds)
        if key not in self._small:
            side = self.tile // ds
            img = Image.fromarray(self._oriented(index))
            self._small[key] = np.asarray(img.resize((side, side), Image.Resampling.BOX))
        return self._small[key]

    def _alpha(self, ds: int, ty: int, tx: int) -> np.ndarray:
        """Tissue opacity of a level tile (tile x tile x 1 float32), from the layout with a 1-cell margin."""
        span = self.tile * ds // CELL  # cells covered by this level tile
        cells = np.zeros((span + 2, span + 2), np.float32)
        src = self.mask[ty * span : (ty + 1) * span + 2, tx * span : (tx + 1) * span + 2]
        cells[: src.shape[0], : src.shape[1]] = src
        resample = Image.Resampling.BILINEAR if ds < CELL else Image.Resampling.BOX
        img = Image.fromarray(cells).resize((self.tile, self.tile), resample, box=(1, 1, 1 + span, 1 + span))
        return np.asarray(img)[..., None]

    def level_tile(self, ds: int, ty: int, tx: int, quality: int) -> bytes:
        """The JPEG bytes of tile (ty, tx) of the level with downsample `ds` (a divisor of the tile)."""
        per, side = self.tile // CELL, self.tile // ds
        if ds == 1:
            cells = self.mask[ty * per : (ty + 1) * per + 2, tx * per : (tx + 1) * per + 2]
            inside = ty < self.ty and tx < self.tx
            if cells.min() == 1 and inside:
                key = int(self.choice[ty, tx])
            elif cells.max() == 0:
                key = -1
            else:
                key = None
            if key is not None:
                if key not in self._encoded:
                    self._encoded[key] = _jpeg(self._oriented(key), quality)
                return self._encoded[key]
        tissue = np.empty((self.tile, self.tile, 3), np.uint8)
        for i in range(ds):
            for j in range(ds):
                y, x = ty * ds + i, tx * ds + j
                index = int(self.choice[y, x]) if y < self.ty and x < self.tx else -1
                tissue[i * side : (i + 1) * side, j * side : (j + 1) * side] = self._bank_at(index, ds)
        alpha = self._alpha(ds, ty, tx)
        bg = self._bank_at(-1, 1)
        out = alpha * tissue.astype(np.float32) + (1.0 - alpha) * bg.astype(np.float32)
        return _jpeg(np.clip(out + 0.5, 0, 255).astype(np.uint8), quality)


def _downsamples(width: int, height: int, tile: int) -> list[int]:
    """Pyramid downsamples 1, 4, 16, ... while the level's long side is at least 512 px (<= tile)."""
    out = [1]
    while out[-1] * 4 <= tile and max(width, height) / (out[-1] * 4) >= 512:
        out.append(out[-1] * 4)
    return out


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    class_id: int,
    seed: int,
    fmt: str = "svs",
    mpp: float = 0.25,
    tile: int = 512,
    tissue_fraction: float = 0.4,
    quality: int = 85,
    stain_jitter: float = 0.0,
    scale: bool = True,
) -> Path:
    """Write a pyramidal JPEG tiled slide: "svs" (Aperio-style, MPP and AppMag in the description) or
    "tiff" (generic TIFF, scale in the resolution tags); `scale` False records neither (a slide that
    needs --mpp, as some TCGA files do), the pixels unchanged. Written to a temporary file and renamed."""
    import tifffile

    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', got {fmt!r}")
    if tile % CELL or tile < 64:
        raise ValueError(f"tile must be a multiple of {CELL} and >= 64, got {tile}")
    path = Path(path)
    r = _Renderer(width, height, class_id, seed, mpp, tile, tissue_fraction, stain_jitter)
    power = 10.0 / mpp
    levels = _downsamples(width, height, tile)
    bigtiff = width * height > 1_500_000_000
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        for k, ds in enumerate(levels):
            w, h = -(-width // ds), -(-height // ds)
            nty, ntx = -(-h // tile), -(-w // tile)
            tiles = (r.level_tile(ds, ty, tx, quality) for ty in range(nty) for tx in range(ntx))
            options: dict = {}
            if fmt == "svs":
                recorded = f"|AppMag = {power:g}|MPP = {mpp:g}" if scale else ""
                options["description"] = (
                    f"Aperio Image Library v12.0.0 synthetic\r\n{width}x{height} [0,0 {w}x{h}] "
                    f"({tile}x{tile}) JPEG/RGB Q={quality}{recorded}|class = {class_id}"
                )
            elif k == 0 and scale:
                options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            tif.write(
                tiles, shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                compression="jpeg", subsampling=(2, 2), metadata=None, subfiletype=1 if k else 0, **options,
            )  # fmt: skip
            if fmt == "svs" and k == 0:
                tif.write(_thumbnail(r, width, height), photometric="rgb", metadata=None, description="")
    return path


def _thumbnail(r: _Renderer, width: int, height: int) -> np.ndarray:
    """A small picture for the Aperio thumbnail page: the layout painted with the mean tissue colour."""
    scale = 512 / max(width, height)
    mask = Image.fromarray(r.mask[1:-1, 1:-1]).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
    )
    alpha = np.asarray(mask)[..., None]
    colour = np.mean([t.reshape(-1, 3).mean(0) for t in r.bank], axis=0)
    return np.clip(alpha * colour + (1 - alpha) * np.array(BACKGROUND), 0, 255).astype(np.uint8)


def make_cohort(
    out_dir: str | os.PathLike,
    n_classes: int = 4,
    patients_per_class: int = 3,
    slides_per_patient: int = 1,
    size: tuple[int, int] = (6000, 4000),
    seed: int = 0,
    stain_jitter: float = 0.0,
    prefix: str = "SYN",
) -> Path:
    """Write a labelled cohort of synthetic slides and `labels.csv` (slide,label,patient,site).

    Patients alternate between SVS and generic TIFF; classes are grouped two per site. `stain_jitter`
    gives every slide its own staining (see `stain_variant`), as real cohorts from several labs have;
    `prefix` starts every patient ID (cohorts with different prefixes share no patient).
    Returns the CSV path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(n_classes):
        for p in range(patients_per_class):
            patient = f"{prefix}-C{c}-P{p:02d}"
            fmt = "svs" if p % 2 == 0 else "tiff"
            for s in range(slides_per_patient):
                name = f"{patient}-S{s}.{fmt}"
                slide_seed = seed * 1_000_003 + (c * 1000 + p) * 100 + s
                write_synthetic_slide(
                    out / name, size[0], size[1], c, slide_seed, fmt=fmt, stain_jitter=stain_jitter
                )
                rows.append(
                    {"slide": name, "label": f"class{c}", "patient": patient, "site": f"site{c // 2}"}
                )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["slide", "label", "patient", "site"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = out / "labels.csv"
    from histo.io import atomic_write_text

    atomic_write_text(csv_path, text.getvalue())
    return csv_path
