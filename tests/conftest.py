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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: several processes (DDP, workers) share 2 cores here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
