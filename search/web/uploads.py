"""Uploaded patch images: only image types, bounded bytes and pixels, decoded to RGB or refused.

The byte limit is enforced while the request body arrives (`BodyLimit` in search/web/security.py); here
the image's own header is read first and an image with more pixels than allowed is refused before it is
decoded, so a small file that would expand into gigabytes (a decompression bomb) never does.
"""

from __future__ import annotations

import io

import numpy as np

from histo.errors import HistoError
from search.queries import open_header

FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")  # what Pillow may open an upload as (no GIF, no SVG)
MIN_SIDE = 8  # px; smaller is no tissue patch


class UploadRejected(HistoError):
    """An upload that is not an acceptable image (answered 400, or 413 when too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_patch(data: bytes, name: str, content_type: str | None, max_pixels: int) -> np.ndarray:
    """The uploaded image as RGB uint8 (H, W, 3); UploadRejected naming the file and the reason."""
    from PIL import UnidentifiedImageError

    if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise UploadRejected(f"{name}: not an image upload (content type {content_type})")
    if not data:
        raise UploadRejected(f"{name}: empty upload")
    try:
        im = open_header(io.BytesIO(data), data[:16], FORMATS)  # the header only: nothing decoded yet
        if im is None:
            raise UploadRejected(f"{name}: not a {', '.join(FORMATS)} image")
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise UploadRejected(
                    f"{name}: {w}x{h} = {w * h:,} pixels is more than the {max_pixels:,} allowed", 413
                )
            if min(w, h) < MIN_SIDE:
                raise UploadRejected(f"{name}: {w}x{h} is too small for a tissue patch")
            im.seek(0)
            return np.array(im.convert("RGB"))
    except UploadRejected:
        raise
    except UnidentifiedImageError:
        raise UploadRejected(f"{name}: not a {', '.join(FORMATS)} image") from None
    except (OSError, ValueError, SyntaxError, IndexError, EOFError) as e:
        raise UploadRejected(f"{name}: unreadable image ({type(e).__name__})") from None
