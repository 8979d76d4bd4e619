"""Tiles -> features -> FAISS index -> ranked slides: the slide-retrieval API and its evaluation.

`SlideIndex` is imported on first use so that `import search` stays light (no faiss, torch or zarr).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SlideIndex"]


def __getattr__(name: str) -> Any:
    if name == "SlideIndex":
        from search.slide_index import SlideIndex

        return SlideIndex
    raise AttributeError(f"module 'search' has no attribute {name!r}")
