"""Pen ink: blue, green and black marker strokes found by colour and cut out of the tissue mask and of the
nucleus count.

Pathologists circle regions with markers; CLAM users report such strokes tiled and scored as tissue, and a
haematoxylin-density score rises on them (on the shared TCGA crop with thin synthetic strokes, inked tiles
out-scored every clean one: tests/test_ink.py). A pixel is ink of a colour by its HSV hue, saturation and value:
    blue   hue 190-255°, saturation >= 0.5, value >= 0.15 (haematoxylin is purple, hue ~260-300°, or less
           saturated)
    green  hue 70-190°, saturation >= 0.2, value >= 0.1 (no H&E stain is green)
    black  value <= 0.22 (darker than any stained tissue of the shared tiles; also folds and debris)
Blue and black specks smaller than `speck_px` (a nucleus, at tile resolution) are dropped by an opening, and
what is left is widened by `margin_px`, so the soft edge of a stroke goes too. Ink dots of a nucleus' size
and darkness stay indistinguishable from nuclei (green excepted).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

INK_COLOURS = ("blue", "green", "black")


def ink_pixels(rgb: np.ndarray, colours: Iterable[str]) -> dict[str, np.ndarray]:
    """Colour -> boolean (H, W): the pixels of an RGB uint8 image that have that marker colour."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(rgb[..., :3])
    hue, sat, val = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    rules = {
        "blue": lambda: (hue >= 190) & (hue <= 255) & (sat >= 0.5) & (val >= 0.15),
        "green": lambda: (hue >= 70) & (hue < 190) & (sat >= 0.2) & (val >= 0.1),
        "black": lambda: val <= 0.22,
    }
    return {c: rules[c]() for c in dict.fromkeys(colours)}


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def ink_regions(rgb: np.ndarray, colours: Iterable[str], speck_px: int, margin_px: int) -> np.ndarray:
    """Boolean (H, W): the ink of an image widened by `margin_px`. Blue and black specks under `speck_px` in
    radius are dropped first (a dark nucleus is not a stroke), unless they belong to a larger ink region;
    green has no stain to mistake it for and always counts."""
    pixels = ink_pixels(rgb, colours)
    ink = np.logical_or.reduce(list(pixels.values())) if pixels else np.zeros(rgb.shape[:2], bool)
    if speck_px > 0:
        ink = ndimage.binary_opening(ink, _disk(speck_px)) | pixels.get("green", False)
    if margin_px > 0 and ink.any():
        ink = ndimage.binary_dilation(ink, _disk(margin_px))
    return ink
