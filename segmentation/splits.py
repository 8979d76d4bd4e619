"""Train/validation splits of BraTS cases by patient: a seeded held-out fraction, or K folds.

BraTS 2023+ case IDs end in a timepoint (`BraTS-GLI-00001-000`, `-001`: one patient); every other ID is
its own patient. A patient's cases are always on one side of a split, so no validation patient is seen
in training.
"""

from __future__ import annotations

import re

import numpy as np

from histo.errors import ConfigError
from segmentation.config import SegmentConfig
from segmentation.data import Case


def patient_id(case_id: str) -> str:
    """The patient of a case: BraTS 2023+ IDs end in a timepoint (BraTS-GLI-00001-000 and -001 are one
    patient); any other ID is its own patient."""
    found = re.fullmatch(r"(BraTS-[A-Za-z]+(?:-RT)?-\d+)-\d+", case_id, flags=re.IGNORECASE)
    return found.group(1) if found else case_id


def _by_patient(cases: list[Case]) -> tuple[list[str], dict[str, list[int]]]:
    """(sorted patient IDs, {patient: indices of its cases})."""
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(patient_id(case.case_id), []).append(i)
    return sorted(groups), groups


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by patient (at least one of each when there are >= 2)."""
    patients, groups = _by_patient(cases)
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = min(max(round(val_fraction * len(patients)), 1 if val_fraction > 0 else 0), len(patients) - 1)
    return _split(cases, {patients[i] for i in order[:n_val].tolist()}, groups)


def fold_cases(cases: list[Case], folds: int, fold: int, seed: int) -> tuple[list[Case], list[Case]]:
    """Train/validation cases of fold `fold` of `folds` patient-level folds: the patients, shuffled by
    `seed`, are dealt round-robin into the folds, so a patient's timepoints stay together."""
    if folds < 2 or not 0 <= fold < folds:
        raise ConfigError(f"data.folds must be >= 2 and 0 <= data.fold < data.folds, got {folds} and {fold}")
    patients, groups = _by_patient(cases)
    if len(patients) < folds:
        raise ConfigError(f"data.folds {folds} exceeds the {len(patients)} patients of the training data")
    order = np.random.default_rng(seed).permutation(len(patients))
    return _split(cases, {patients[p] for k, p in enumerate(order.tolist()) if k % folds == fold}, groups)


def _split(cases: list[Case], held_out: set[str], groups: dict[str, list[int]]):
    val = sorted(i for p in held_out for i in groups[p])
    return [c for i, c in enumerate(cases) if i not in val], [cases[i] for i in val]


def split_for(cases: list[Case], config: SegmentConfig) -> tuple[list[Case], list[Case]]:
    """The split the config asks for: K patient-level folds (data.folds > 0) or data.val_fraction."""
    if config.data.folds:
        return fold_cases(cases, config.data.folds, config.data.fold, config.seed)
    return split_cases(cases, config.data.val_fraction, config.seed)
