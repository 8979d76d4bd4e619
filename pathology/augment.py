"""Tile augmentation and normalisation on torch tensors (C, H, W) in [0, 1], each draw from a given generator.

Stain jitter works in HED optical-density space exactly as scikit-image's `rgb2hed`/`hed2rgb`
(Ruifrok & Johnston matrices), perturbing each stain as s * a + b (Tellez et al. 2018). Every random
choice comes from the `torch.Generator` passed in, so a sample's augmentation depends only on its seed
(not on the worker or the number of processes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

from pathology.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LOG_ADJUST = math.log(1e-6)  # scikit-image's floor for optical density


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 channels-first in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    return t.movedim(-1, -3)


def normalize(
    x: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """Mean/std normalisation of (..., 3, H, W) tensors in [0, 1] (ImageNet's by default, as KimiaNet)."""
    return (x - x.new_tensor(mean).view(3, 1, 1)) / x.new_tensor(std).view(3, 1, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (C, H, W) or (N, C, H, W) to size x size (no-op when equal)."""
    if x.shape[-2:] == (size, size):
        return x
    batch = x.unsqueeze(0) if x.dim() == 3 else x
    out = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0] if x.dim() == 3 else out


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """scikit-image `rgb2hed` for a (3, H, W) tensor: stain concentrations, clipped at 0."""
    m = torch.as_tensor(hed_from_rgb, dtype=x.dtype)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    return torch.einsum("chw,cs->shw", od, m).clamp_min(0)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """scikit-image `hed2rgb` for a (3, H, W) tensor of stain concentrations."""
    m = torch.as_tensor(rgb_from_hed, dtype=hed.dtype)
    log_rgb = torch.einsum("shw,sc->chw", hed * _LOG_ADJUST, m)
    return torch.exp(log_rgb).clamp(0, 1)


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb each HED stain channel s -> s * alpha + beta and return to RGB."""
    hed = rgb_to_hed(x)
    return hed_to_rgb(hed * alpha.view(3, 1, 1) + beta.view(3, 1, 1))


def _uniform(g: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=g) * (high - low) + low


def random_resized_crop(
    x: torch.Tensor, size: int, scale: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """Crop a random square of area fraction in `scale`, resized to size x size (square tiles)."""
    h, w = x.shape[-2:]
    frac = float(_uniform(g, scale[0], scale[1]))
    side = max(1, min(h, w, round(math.sqrt(frac * h * w))))
    top = int(torch.randint(0, h - side + 1, (1,), generator=g))
    left = int(torch.randint(0, w - side + 1, (1,), generator=g))
    return resize(x[:, top : top + side, left : left + side], size)


def augment(x: torch.Tensor, size: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Training augmentation of one (3, H, W) tile in [0, 1]: crop, flips, 90° turns, stain, brightness."""
    scale = cfg.crop_scale
    x = random_resized_crop(x, size, scale, g) if scale[0] < 1.0 else resize(x, size)
    if cfg.flip and torch.rand(1, generator=g) < 0.5:
        x = x.flip(-1)
    if cfg.rot90:
        x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), dims=(-2, -1))
    sigma = cfg.hed_sigma
    if sigma > 0:
        x = hed_jitter(x, _uniform(g, 1 - sigma, 1 + sigma, 3), _uniform(g, -sigma, sigma, 3))
    b, c = cfg.brightness, cfg.contrast
    if b > 0:
        x = x * float(_uniform(g, 1 - b, 1 + b))
    if c > 0:
        mean = x.mean()
        x = (x - mean) * float(_uniform(g, 1 - c, 1 + c)) + mean
    return x.clamp(0, 1)
