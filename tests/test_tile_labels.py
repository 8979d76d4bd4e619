"""Labels CSV parsing, slide matching and TCGA barcode fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from histo.errors import InputFileError
from pathology.slide_labels import SlideMeta, find_meta, read_labels, resolve_meta, tcga_patient


def test_read_and_match(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text(
        "slide,label,patient,site,mpp\na.svs,LUAD,P1,lung,\nb,LUSC,,lung,0.25\nTCGA-CR-7395-01A,HNSC,,,\n"
    )
    labels = read_labels(csv)
    assert labels["a.svs"] == SlideMeta("LUAD", "P1", "lung", None, None)
    assert labels["b"].mpp == 0.25 and labels["b"].patient is None
    assert find_meta(labels, Path("/x/a.svs"), "a").label == "LUAD"  # file name
    assert find_meta(labels, Path("/x/b.ndpi"), "b").label == "LUSC"  # file name without extension
    assert find_meta(labels, Path("/x/c.svs"), "c") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("name,label\na,x\n", "needs columns slide,label"),
        ("slide,label\na,x\na,y\n", "line 3: slide 'a' listed twice"),
        ("slide,label,mpp\na,x,fast\n", "line 2: mpp must be a positive number"),
        ("slide,label,mpp\na,x,-1\n", "line 2: mpp must be a positive number"),
        ("slide,label\n,x\n", "line 2: empty slide name"),
        ("slide,label\n", "has a header but no rows"),
        ("", r"needs columns slide,label \(missing label, slide\)"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, text, reason):
    csv = tmp_path / "l.csv"
    csv.write_text(text)
    with pytest.raises(InputFileError, match=reason) as e:
        read_labels(csv)
    assert str(csv) in str(e.value)


def test_tcga_barcode_fallbacks():
    assert tcga_patient("TCGA-CR-7395-01A-01-TS1") == "TCGA-CR-7395"
    assert tcga_patient("tcga-cr-7395-01a-01-ts1") == "TCGA-CR-7395"
    assert tcga_patient("slide-7") is None
    meta = resolve_meta(None, "TCGA-AB-1234-01Z-00-DX1")
    assert (meta.patient, meta.project, meta.label) == ("TCGA-AB-1234", "TCGA", None)
    assert resolve_meta(SlideMeta("X", patient="P9"), "TCGA-AB-1234-01Z").patient == "P9"  # the CSV wins
    assert resolve_meta(None, "local-17").patient == "local-17"  # each slide its own patient
