"""Synthetic slides: OpenSlide-readable pyramids, consistent levels, determinism, class differences."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import openslide

from pathology.cellularity import cellularity_score
from pathology.synthetic import make_cohort, render_tissue, style_of, write_synthetic_slide


def test_cohort_files_and_labels(tmp_path):
    csv_path = make_cohort(tmp_path / "c", n_classes=2, patients_per_class=2, size=(1600, 1200), seed=3)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["slide"] for r in rows] == [
        "SYN-C0-P00-S0.svs",
        "SYN-C0-P01-S0.tiff",
        "SYN-C1-P00-S0.svs",
        "SYN-C1-P01-S0.tiff",
    ]
    assert [r["label"] for r in rows] == ["class0", "class0", "class1", "class1"]
    assert rows[1]["patient"] == "SYN-C0-P01" and rows[2]["site"] == "site0"
    vendors = [
        openslide.OpenSlide(str(tmp_path / "c" / r["slide"])).properties["openslide.vendor"] for r in rows
    ]
    assert vendors == ["aperio", "generic-tiff", "aperio", "generic-tiff"]


def test_levels_are_downsampled_level0_and_files_are_deterministic(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", 2600, 2100, 3, seed=1)
    b = write_synthetic_slide(tmp_path / "b.svs", 2600, 2100, 3, seed=1)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    s = openslide.OpenSlide(str(a))
    assert s.level_downsamples == (1.0, 4.0) and s.dimensions == (2600, 2100)
    level0 = np.asarray(s.read_region((800, 800), 0, (800, 800)).convert("RGB"), np.float64)
    level1 = np.asarray(s.read_region((800, 800), 1, (200, 200)).convert("RGB"), np.float64)
    boxed = level0.reshape(200, 4, 200, 4, 3).mean(axis=(1, 3))
    err = np.abs(boxed - level1).mean()
    shifted = np.abs(boxed[:, 3:] - level1[:, :-3]).mean()  # same comparison, 3 px out of register
    assert err < 4.0 and shifted > 3 * err  # same content, JPEG (4:2:0) differences only
    thumb = np.asarray(s.associated_images["thumbnail"].convert("RGB"))
    assert max(thumb.shape[:2]) == 512


def test_classes_differ_in_nuclei_and_colour():
    rng = np.random.default_rng(0)
    tiles = {c: [render_tissue(rng, style_of(c), 256, 0.5) for _ in range(3)] for c in range(4)}
    cell = {c: np.mean([cellularity_score(t) for t in ts]) for c, ts in tiles.items()}
    assert cell[1] > 2 * cell[0]  # lymphoid-like class is much more cellular than stroma-like
    colour = {c: np.mean([t.reshape(-1, 3).mean(0) for t in ts], axis=0) for c, ts in tiles.items()}
    for c in range(4):
        for d in range(c + 1, 4):
            assert np.abs(colour[c] - colour[d]).max() > 3.0
    assert style_of(7) == style_of(7) and style_of(7) != style_of(8)  # classes beyond the table


def test_stain_variant_bounds_and_identity():
    import numpy as np

    from pathology.synthetic import stain_variant, style_of

    base = style_of(1)
    assert stain_variant(base, np.random.default_rng(0), 0.0) == base
    variants = [stain_variant(base, np.random.default_rng(s), 0.3) for s in range(50)]
    h = np.array([v.haematoxylin / base.haematoxylin for v in variants])
    hue = np.array([v.hue - base.hue for v in variants])
    assert h.min() >= 0.7 and h.max() <= 1.3 and h.std() > 0.05
    assert np.abs(hue).max() <= 0.3 and hue.std() > 0.05
    assert all(v.nuclei_per_mm2 == base.nuclei_per_mm2 for v in variants), "texture must not change"
