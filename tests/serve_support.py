"""Shared by the `histo serve` tests: reading the demo index (conftest's `demo`) and polling helpers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def catalog(index: Path) -> list[dict[str, Any]]:
    manifest = json.loads((index / "manifest.json").read_text())
    return json.loads((index / manifest["catalog"]).read_text())["slides"]


def index_files(index: Path) -> dict[str, bytes]:
    """Every file of the index dir outside the picture cache, with its bytes (to prove nothing changed)."""
    return {
        p.relative_to(index).as_posix(): p.read_bytes()
        for p in sorted(index.rglob("*"))
        if p.is_file() and ".serve-cache" not in p.parts
    }


def until(condition: Any, timeout: float = 120.0, step: float = 0.1) -> Any:
    """Poll `condition()` until it returns something truthy (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")
