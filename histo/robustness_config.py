"""Typed config of `histo robustness pathology|segment` (RobustnessConfig); defaults in robustness.yaml.

It lives in `histo` beside the harness because its file has a section per domain and neither domain may
import the other. A consumer reads `cfg.severities` (a tuple of ints), `cfg.pathology.k`, `cfg.segment.roi`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from histo.config import (
    Count,
    Device,
    Fraction,
    NonNegative,
    OpenFraction,
    Overlap,
    PositiveInt,
    Roi,
    RunOptions,
    Section,
    Seed,
    StageConfig,
)
from histo.errors import HistoError


def _severities(value: Any) -> Any:
    """'1-5' or '1,3,5' (or one int, or a list) -> a sorted tuple of distinct severities."""
    from histo.robustness.grid import parse_severities

    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        return value  # refused by the tuple type with its own message
    try:
        return tuple(parse_severities(value))
    except HistoError as e:
        raise ValueError(str(e)) from None


Severity = Annotated[int, Field(ge=1, le=5)]


class PathologyRobustness(Section):
    """Nearest-neighbour tile classification on a tile store (pathology.robustness)."""

    # --model/--reference are this encoder's weight files (a name pathology.robustness checks against its
    # registry: histo imports no domain package); None: histo checkpoints
    encoder: Annotated[str, Field(min_length=1)] | None
    k: PositiveInt
    batch_size: PositiveInt  # also the α-BN calibration batch, so it changes results
    max_tiles_per_slide: Count
    alpha_bn_archive: bool  # α-BN also on the archive's features (its own clean batches); false: queries only


class SegmentRobustness(Section):
    """Dice / HD95 per region on labelled BraTS cases (segmentation.robustness)."""

    roi: Roi
    overlap: Overlap
    threshold: OpenFraction
    max_cases: Count


class RobustnessRun(RunOptions):
    device: Device
    workers: PositiveInt  # threads corrupting tiles (pathology; results do not depend on it)
    cache_mb: NonNegative  # clean tiles kept in memory (pathology)
    cache_cases: Count  # loaded cases kept in memory (segment)


class RobustnessConfig(StageConfig):
    """`histo robustness`: everything but `run` is recorded in the output's settings."""

    stage = "robustness"
    seed: Seed
    corruptions: Annotated[str, Field(min_length=1)]
    severities: Annotated[tuple[Severity, ...], BeforeValidator(_severities), Field(min_length=1)]
    alpha_bn: Fraction | None
    pathology: PathologyRobustness
    segment: SegmentRobustness
    run: RobustnessRun
