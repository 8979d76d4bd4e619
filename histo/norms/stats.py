"""Running-statistics control: run a forward pass without updating any running statistics.

The reversible U-Net recomputes block inputs during backward; that second forward must normalise with
batch statistics exactly as the first did but must not move running means/variances again.
Protocol for custom blocks that keep running statistics: update them only when `updates_stats(self)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_FLAG = "_histo_stats_frozen"


def updates_stats(module: nn.Module) -> bool:
    """True when `module` should update its running statistics in this forward pass."""
    return module.training and not getattr(module, _FLAG, False)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, forward passes of `model` use batch statistics as usual but update none.

    torch BatchNorm/InstanceNorm layers that track statistics get momentum 0 (running = running) and their batch counter restored;
    registry blocks check `updates_stats(self)`.
    """
    flagged = [m for m in model.modules() if not getattr(m, _FLAG, False)]  # re-entrant: outer flags stay
    saved = []
    for m in flagged:
        setattr(m, _FLAG, True)
        if isinstance(m, _NormBase) and m.track_running_stats:
            tracked = None if m.num_batches_tracked is None else m.num_batches_tracked.clone()
            saved.append((m, m.momentum, tracked))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m in flagged:
            delattr(m, _FLAG)
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
