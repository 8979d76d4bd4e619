"""Shared fixtures: the real data folder beside the clone, and quiet, reproducible torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One torch thread for the whole session, in this process and (through the environment) in every
# subprocess a test starts: results then do not depend on test order or on which process computed them,
# and DDP tests with two processes do not oversubscribe the two cores CI has.
os.environ["OMP_NUM_THREADS"] = "1"
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HISTO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CI has it beside the clone); its absence is a failure, not a skip."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA} (set HISTO_SHARED_DATA)"
    return SHARED_DATA
