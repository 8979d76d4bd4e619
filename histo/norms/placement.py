"""IBN-Net's placement (Pan et al., ECCV 2018; XingangPan/IBN-Net): which norm goes at each site of a network.

A network asks `place(norm, position, layout, site)` at every norm site and `place_extra(...)` at every
site where IBN-Net adds a norm the network otherwise lacks, and builds what they answer. A norm without a
placement trait goes to every norm site; `ibn_a` and `ibn_b` go where the authors' code puts them,
BatchNorm at every other norm site:

- `IBN_A`: IBN at the first norm (`FIRST`) of every `layout.every`-th block of the early stages, i.e. the
  first three stages and never the last (ResNet `ibn_cfg=('a', 'a', 'a', None)`: layer1-3 of 4; DenseNet:
  dense blocks 1-3 of 4, every third dense layer; a U-Net: encoder levels 1-3 of 4). The split and order
  per architecture are the layout's (`RESNET`: IN on the first half; DenseNet: BN on the first
  int(0.6*C), IN on the rest).
- `IBN_B`: the affine IN of `ibn_b` replaces the stem's norm (`STEM`, ResNet `bn1`) or follows a stem
  that has none (`STEM_END`), and follows the last residual sum of the first two stages (`STAGE_END`;
  ResNet `ibn_cfg=('b', 'b', None, None)`). Networks without residual sums refuse it through the norm's
  `unsupported` trait (checked by `check_placeable`).

At the extra sites (`STEM_END`, `STAGE_END`) `place_extra` answers None unless the placement puts a norm
there, so networks of every other norm keep their parameter names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from histo.norms.choice import NormChoice, resolve_norm
from histo.norms.registry import names, norm_traits
from histo.norms.traits import IBN_A, IBN_B

FIRST = "first"  # the first norm of a block (ResNet bn1, DenseNet layer norm1, MBConv norm1)
OTHER = "other"  # every other norm site (later norms of a block, transitions, decoder, final norm)
STEM = "stem"  # the stem's norm (ResNet bn1 of conv1, DenseNet norm0)
STEM_END = "stem_end"  # extra site after a stem that has no norm of its own
STAGE_END = "stage_end"  # extra site after a stage's last residual sum
NORM_SITES = frozenset({FIRST, OTHER, STEM})
EXTRA_SITES = frozenset({STEM_END, STAGE_END})
IBN_A_STAGES = 3  # ResNet-IBN-a: layer1-3
IBN_B_STAGES = 2  # ResNet-IBN-b: layer1-2
IBN_KWARGS = frozenset({"ratio", "in_first"})  # arguments of the IBN block only, not of the BN sites
STALE_PLACEMENT = (
    "histo checkpoints written before {name} followed IBN-Net's placement (it was at every norm site, "
    "and DenseNet's IBN put IN on the first int(0.4*C) channels) normalise other channels and cannot be "
    "converted: retrain the model"
)


@dataclass(frozen=True)
class IBNLayout:
    """How the authors' code places IBN in one architecture family.

    family: the name norms' `unsupported` trait refers to. ratio / in_first: the IBN block's IN share and
    whether IN takes the first channels. every: IBN-a in every `every`-th block of an early stage.
    """

    family: str
    ratio: float = 0.5
    in_first: bool = True
    every: int = 1


@dataclass(frozen=True)
class Site:
    """Where a block sits: its 0-based `stage` (None: outside the stages, e.g. a decoder or a head), the
    network's number of stages, and the block's index within its stage."""

    stage: int | None
    stages: int
    block: int = 0

    def early(self, first_stages: int) -> bool:
        """In the first `first_stages` stages and not the last one."""
        return self.stage is not None and self.stage < min(first_stages, self.stages - 1)


EARLY = Site(stage=0, stages=4)  # a standalone block: placed as a block of a ResNet's first stage
RESNET = IBNLayout("resnet")  # ibnnet/resnet_ibn.py: IBN(planes) = IN on the first half


def check_placeable(norm: NormChoice, layout: IBNLayout) -> None:
    """Raise ValueError when `norm` has a placement that the layout's family refuses (its reason)."""
    reason = norm.traits.unsupported.get(layout.family) if norm.traits.placement else None
    if reason is not None:
        raise ValueError(f"norm {norm.name!r} cannot be placed in a {layout.family} network: {reason}")


def place(norm: NormChoice, position: str, layout: IBNLayout, site: Site | None = None) -> NormChoice:
    """The norm to build at norm site `position` (FIRST, OTHER, STEM) of a block at `site`."""
    if position not in NORM_SITES:
        raise ValueError(f"unknown norm site {position!r}; norm sites: {', '.join(sorted(NORM_SITES))}")
    check_placeable(norm, layout)
    rule = norm.traits.placement
    if rule is None:
        return norm
    if rule == IBN_A and position == FIRST and _ibn_a_block(layout, site):
        return resolve_norm(norm, {"ratio": layout.ratio, "in_first": layout.in_first, **norm.kwargs})
    if rule == IBN_B and position == STEM:
        return norm
    if rule in (IBN_A, IBN_B):
        return batch_like(norm)
    raise ValueError(f"norm {norm.name!r}: unknown placement {rule!r}")


def place_extra(
    norm: NormChoice, position: str, layout: IBNLayout, site: Site | None = None
) -> NormChoice | None:
    """The norm to add at extra site `position` (STEM_END, STAGE_END), or None: nothing there."""
    if position not in EXTRA_SITES:
        raise ValueError(f"unknown extra site {position!r}; extra sites: {', '.join(sorted(EXTRA_SITES))}")
    check_placeable(norm, layout)
    if norm.traits.placement != IBN_B:
        return None
    early = site is not None and site.early(IBN_B_STAGES)
    return norm if position == STEM_END or early else None


def _ibn_a_block(layout: IBNLayout, site: Site | None) -> bool:
    """Whether a block at `site` gets IBN-a: every `layout.every`-th block of an early stage."""
    return site is not None and site.early(IBN_A_STAGES) and site.block % layout.every == 0


def batch_like(norm: NormChoice) -> NormChoice:
    """BatchNorm with the norm's own arguments (less the IBN block's), for the sites a placement leaves BN."""
    return resolve_norm("batch", {k: v for k, v in norm.kwargs.items() if k not in IBN_KWARGS})


def stale_placement_hint(norm: object) -> str:
    """What to add to a weights-do-not-fit message when `norm` (a config's norm) is a placed one, else ''."""
    if not isinstance(norm, str) or norm not in names() or norm_traits(norm).placement is None:
        return ""
    return f" ({STALE_PLACEMENT.format(name=norm)})"
