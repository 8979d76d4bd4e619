"""Slide labels: the labels CSV (slide,label[,patient,site,project,mpp]) and TCGA barcode parsing."""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from histo.errors import InputFileError
from pathology.slide import SLIDE_EXTENSIONS

TCGA_RE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
OPTIONAL = ("patient", "site", "project", "mpp")


@dataclass(frozen=True)
class SlideMeta:
    """Labels of one slide; None where unknown."""

    label: str | None = None
    patient: str | None = None
    site: str | None = None
    project: str | None = None
    mpp: float | None = None


def tcga_patient(slide_id: str) -> str | None:
    """The TCGA patient ID (first 12 characters, e.g. TCGA-CR-7395) of a TCGA barcode, upper-cased."""
    m = TCGA_RE.match(slide_id)
    return m.group(1).upper() if m else None


def read_labels(path: str | Path) -> dict[str, SlideMeta]:
    """Read a labels CSV into {slide key: SlideMeta}; every error names the file and the row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputFileError(path, f"cannot read labels CSV: {e}") from None
    missing = {"slide", "label"} - set(header)
    if missing:
        raise InputFileError(
            path,
            f"labels CSV needs columns slide,label (missing {', '.join(sorted(missing))}){_delimiter_hint(header)}",
        )
    if not rows:
        raise InputFileError(path, "labels CSV has a header but no rows")
    out: dict[str, SlideMeta] = {}
    lines: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        key = (row["slide"] or "").strip()
        if not key:
            raise InputFileError(path, f"line {line}: empty slide name")
        if key in out:
            raise InputFileError(path, f"line {line}: slide {key!r} listed twice")
        values = {k: (row.get(k) or "").strip() or None for k in OPTIONAL}
        mpp = None
        if values["mpp"] is not None:
            try:
                mpp = float(values["mpp"])
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and mpp > 0):
                raise InputFileError(
                    path, f"line {line}: mpp must be a positive number, got {values['mpp']!r}"
                )
        label = (row["label"] or "").strip() or None
        out[key] = SlideMeta(label, values["patient"], values["site"], values["project"], mpp)
        lines[key] = line
    _check_names_agree(path, out, lines)
    return out


def _delimiter_hint(header: list[str]) -> str:
    """'; the header ... looks ';'-separated ...' when a one-column header holds another delimiter."""
    if len(header) == 1:
        for delimiter in (";", "\t", "|"):
            if delimiter in header[0]:
                return (
                    f"; its header {header[0]!r} looks {delimiter!r}-separated, and the file must use commas"
                )
    return ""


def _check_names_agree(path: Path, labels: dict[str, SlideMeta], lines: dict[str, int]) -> None:
    """Refuse a slide listed both with and without its extension (`X.svs` and `X`) with different
    values: either row could be the slide's."""
    for key, meta in labels.items():
        stem, suffix = os.path.splitext(key)
        if suffix.lower() in SLIDE_EXTENSIONS and stem in labels and labels[stem] != meta:
            raise InputFileError(
                path,
                f"lines {lines[stem]} and {lines[key]}: slide {stem!r} is listed as {stem!r} and {key!r} "
                f"with different values (label {labels[stem].label!r} and {meta.label!r}); keep one row",
            )


def find_meta(labels: dict[str, SlideMeta], path: Path, slide_id: str) -> SlideMeta | None:
    """The CSV row of a slide: matched by file name, file name without extension, or slide ID."""
    for key in (path.name, path.stem, slide_id):
        if key in labels:
            return labels[key]
    return None


def resolve_meta(meta: SlideMeta | None, slide_id: str) -> SlideMeta:
    """Fill what the CSV does not say: TCGA barcodes give the patient and project "TCGA"; otherwise
    each slide is its own patient."""
    meta = meta or SlideMeta()
    tcga = tcga_patient(slide_id)
    return SlideMeta(
        label=meta.label,
        patient=meta.patient or tcga or slide_id,
        site=meta.site,
        project=meta.project or ("TCGA" if tcga else None),
        mpp=meta.mpp,
    )
