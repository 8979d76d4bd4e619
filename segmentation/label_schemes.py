"""BraTS label schemes as data: one table row per task, giving its label values and names, the regions it
scores and the regions a model predicts (REFERENCE.md §5 and §8; the 2023+ rows follow the bundled task
configs of the official `brats-evaluation` package).

A scheme's `regions` are the evaluated label groups (e.g. ET = {3}, TC = {1, 3}, WT = {1, 2, 3}); its
`channels` are the regions a model outputs, one sigmoid each (MONAI's BraTS order TC, WT, ET first). The
channels nest or are disjoint, and each one owns exactly one label value (its labels minus those of the
channels inside it), so a label map and its channel masks convert both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LabelScheme:
    """One task's label values {value: name}, evaluated regions {name: values}, model channels, how its
    lesion-wise means are taken ("matched" or "penalised", see segmentation.lesions) and the official
    config it corresponds to (None: the same definitions with this scheme's values)."""

    name: str
    title: str
    labels: Mapping[int, str]
    regions: Mapping[str, frozenset[int]]
    channels: tuple[str, ...]
    lesionwise: str = "matched"
    official: str | None = None
    id_prefixes: tuple[str, ...] = ()
    fill: Mapping[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fill", _fill_labels(self))

    @property
    def values(self) -> tuple[int, ...]:
        """The label values of the scheme, background 0 excluded, ascending."""
        return tuple(sorted(self.labels))

    def describe(self) -> str:
        """`BraTS 2018-2021 glioma: 0, 1 NCR, 2 ED, 4 ET`."""
        return f"{self.title}: 0, " + ", ".join(f"{v} {self.labels[v]}" for v in self.values)


def _fill_labels(scheme: LabelScheme) -> dict[str, int]:
    """The label value each channel owns; ValueError when the channels cannot encode the label map."""
    unknown = [c for c in scheme.channels if c not in scheme.regions]
    if unknown:
        raise ValueError(f"scheme {scheme.name}: channels {unknown} are not among its regions")
    sets = {c: scheme.regions[c] for c in scheme.channels}
    fill = {}
    for name, values in sets.items():
        for other, inner in sets.items():
            if other != name and values & inner and not (inner <= values or values <= inner):
                raise ValueError(f"scheme {scheme.name}: channels {name} and {other} overlap without nesting")
        own = set(values) - set().union(*(inner for inner in sets.values() if inner < values))
        if len(own) != 1:
            raise ValueError(f"scheme {scheme.name}: channel {name} owns labels {sorted(own)}, not one")
        fill[name] = own.pop()
    if sorted(fill.values()) != sorted(scheme.labels):
        raise ValueError(f"scheme {scheme.name}: the channels do not encode every label value")
    return fill


def _regions(**groups: tuple[int, ...]) -> dict[str, frozenset[int]]:
    return {name: frozenset(values) for name, values in groups.items()}


_GLIOMA_2023 = {1: "NETC", 2: "SNFH", 3: "ET"}
_POST_TREATMENT = {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}

SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        LabelScheme(
            "2021",
            "BraTS 2018-2021 glioma",
            {1: "NCR", 2: "ED", 4: "ET"},
            _regions(ET=(4,), TC=(1, 4), WT=(1, 2, 4)),
            ("TC", "WT", "ET"),
        ),
        LabelScheme(
            "2023",
            "BraTS 2023 adult glioma",
            _GLIOMA_2023,
            _regions(ET=(3,), TC=(1, 3), WT=(1, 2, 3)),
            ("TC", "WT", "ET"),
            official="GoAT",  # the bundled config with exactly these groups
            id_prefixes=("BraTS-GLI", "BraTS-SSA"),
        ),
        LabelScheme(
            "gli",
            "BraTS 2024 post-treatment glioma",
            _POST_TREATMENT,
            _regions(ET=(3,), TC=(1, 3), WT=(1, 2, 3), RC=(4,), NETC=(1,), SNFH=(2,)),
            ("TC", "WT", "ET", "RC"),
            official="gli",
        ),
        LabelScheme(
            "ped",
            "BraTS paediatric tumours",
            {1: "ET", 2: "NETC", 3: "CC", 4: "ED"},
            _regions(ET=(1,), NETC=(2,), CC=(3,), ED=(4,), TC=(1, 2, 3), WT=(1, 2, 3, 4)),
            ("TC", "WT", "ET", "CC"),
            official="ped",
            id_prefixes=("BraTS-PED",),
        ),
        LabelScheme(
            "menpre",
            "BraTS pre-operative meningioma",
            _GLIOMA_2023,
            _regions(ET=(3,), TC=(1, 3), WT=(1, 2, 3)),
            ("TC", "WT", "ET"),
            official="MenPre",
            id_prefixes=("BraTS-MEN",),
        ),
        LabelScheme(
            "menrt",
            "BraTS meningioma radiotherapy",
            {1: "GTV"},
            _regions(GTV=(1,)),
            ("GTV",),
            official="MenRT",
            id_prefixes=("BraTS-MEN-RT",),
        ),
        LabelScheme(
            "mets",
            "BraTS brain metastases",
            _POST_TREATMENT,
            _regions(ET=(3,), TC=(1, 3), WT=(1, 2, 3), RC=(4,)),
            ("TC", "WT", "ET", "RC"),
            lesionwise="penalised",
            official="mets",
            id_prefixes=("BraTS-MET",),
        ),
        LabelScheme(
            "goat",
            "BraTS generalizability across tumours",
            _GLIOMA_2023,
            _regions(ET=(3,), TC=(1, 3), WT=(1, 2, 3)),
            ("TC", "WT", "ET"),
            official="GoAT",
            id_prefixes=("BraTS-GoAT",),
        ),
    )
}
REGIONS = SCHEMES["2021"].channels  # the channels of checkpoints that record no scheme (histo 0.1)


def get_scheme(scheme: str | LabelScheme) -> LabelScheme:
    """The scheme of a name (see SCHEMES); ValueError naming the known ones."""
    if isinstance(scheme, LabelScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown BraTS label scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[scheme]


def detect_scheme(case_id: str, names_2023: bool) -> tuple[str, str]:
    """(scheme name, why) from a case's ID prefix (BraTS-PED-…, BraTS-MET-…), else its file names: 2023
    names (t1n, t1c, t2w, t2f) -> 2023 glioma, others -> 2018-2021. Post-treatment glioma shares the
    BraTS-GLI prefix with 2023, so it needs `--labels gli`."""
    by_length = sorted(
        ((p, s.name) for s in SCHEMES.values() for p in s.id_prefixes), key=lambda x: -len(x[0])
    )
    for prefix, name in by_length:
        if case_id.lower().startswith(prefix.lower() + "-"):
            return name, f"case ID prefix {prefix}"
    if names_2023:
        return "2023", "2023 file names (t1n, t1c, t2w, t2f)"
    return "2021", "2018-2021 file names"


def check_values(seg: np.ndarray, scheme: str | LabelScheme) -> None:
    """ValueError `label values [3] are not in scheme 2021 (…)` for values outside the scheme."""
    scheme = get_scheme(scheme)
    values = np.unique(np.asarray(seg))
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"label map has non-integer values, e.g. {values[values != np.round(values)][:3]}")
    unknown = sorted(set(values.astype(np.int64).tolist()) - {0, *scheme.labels})
    if unknown:
        raise ValueError(f"label values {unknown} are not in scheme {scheme.name} ({scheme.describe()})")


def region_masks(seg: np.ndarray, scheme: str | LabelScheme, names: tuple[str, ...]) -> np.ndarray:
    """(…) label map -> (len(names), …) bool masks of the scheme's regions `names` (values checked)."""
    scheme = get_scheme(scheme)
    check_values(seg, scheme)
    seg = np.asarray(seg)
    return np.stack([np.isin(seg, sorted(scheme.regions[n])) for n in names])


def labels_to_regions(seg: np.ndarray, scheme: str | LabelScheme) -> np.ndarray:
    """(…) integer label map -> (C, …) bool masks of the scheme's channels (2021: [TC, WT, ET])."""
    scheme = get_scheme(scheme)
    return region_masks(seg, scheme, scheme.channels)


def paint_order(scheme: str | LabelScheme) -> list[tuple[int, int]]:
    """(channel index, label value) from the outermost channel in: painting them in turn gives the label map."""
    scheme = get_scheme(scheme)
    size = {c: len(scheme.regions[c]) for c in scheme.channels}
    order = sorted(range(len(scheme.channels)), key=lambda i: -size[scheme.channels[i]])
    return [(i, scheme.fill[scheme.channels[i]]) for i in order]


def regions_to_labels(regions: np.ndarray, scheme: str | LabelScheme) -> np.ndarray:
    """(C, …) channel masks -> uint8 label map; where channels disagree the inner-most wins (ET > TC > WT)."""
    scheme = get_scheme(scheme)
    regions = np.asarray(regions, dtype=bool)
    if regions.shape[0] != len(scheme.channels):
        raise ValueError(
            f"expected {len(scheme.channels)} region channels {list(scheme.channels)}, got shape {regions.shape}"
        )
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    for index, value in paint_order(scheme):
        out[regions[index]] = value
    return out


def class_regions(scheme: str | LabelScheme) -> np.ndarray:
    """(C, 1 + labels) 0/1 matrix: channel c holds class k (k = 0 background, then the label values in
    ascending order), the map from softmax class probabilities to channel probabilities."""
    scheme = get_scheme(scheme)
    classes = (0, *scheme.values)
    return np.array([[k in scheme.regions[c] for k in classes] for c in scheme.channels], dtype=np.float32)
