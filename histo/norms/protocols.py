"""The run-time protocols norm modules implement, so library code loops over modules instead of classes.

`histo.calibration` (α-BN) converts every `CalibratableNorm` (torch's BatchNorm layers through an adapter,
as they are not ours to extend); the reversible backward saves every `RecomputeState` after the forward and
restores it around the recomputation; `set_region_mask` reaches every `RegionMaskedNorm`. Running
statistics follow the separate `histo.norms.stats.updates_stats` rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from histo.norms.region import RegionMask


@runtime_checkable
class CalibratableNorm(Protocol):
    """A block whose eval forward can mix its running statistics with the test batch's (α-BN)."""

    calibration_alpha: float | None  # None: the running statistics alone

    def calibrate(self, alpha: float | None) -> None:
        """Eval forwards use (1 - alpha) running + alpha batch statistics; None restores the source layer."""
        ...


@runtime_checkable
class RecomputeState(Protocol):
    """A block whose forward reads state the caller may change before backward (e.g. rn_b's mask)."""

    def save_state(self) -> object:
        """The state the forward just used."""
        ...

    def restore_state(self, state: object) -> None:
        """Put back a state returned by `save_state`."""
        ...


@runtime_checkable
class RegionMaskedNorm(Protocol):
    """A block that normalises with a region mask given by the caller (`histo.norms.set_region_mask`)."""

    def set_mask(self, mask: RegionMask | None) -> None:
        """Use `mask` from the next forward on (None clears it)."""
        ...
