"""Shared fixtures: the real data folder beside the clone, and quiet, reproducible torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CI has it beside the clone); its absence is a failure, not a skip."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA} (set HISTO_SHARED_DATA)"
    return SHARED_DATA
