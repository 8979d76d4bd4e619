"""Slides -> tiles: slide reading, tissue mask, mosaic, cellularity, tile store; KimiaNet training.

`tile_slide` and `tile_slides` are imported on first use so that `import pathology` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tile_slide", "tile_slides"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pathology import tiler

        return getattr(tiler, name)
    raise AttributeError(f"module 'pathology' has no attribute {name!r}")
