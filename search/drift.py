"""The drift check: has the index grown away from what its quantizers were trained on?

A build trains the IVF quantizers and calibrates nprobe on held-out slides (search/index.py), whose IDs the
manifest records (`training.held_out_slides`). Slides added since are assigned to the trained lists without
retraining (search/growth.py). The check measures, on the index as it is now:

- recall@k (`params.calibration_k`) of the held-out slides' tiles as queries, with those slides filtered out
  of the index (so they are unseen, as at calibration), against the exact neighbours over the same rows:
  float (FAISS's recall@k) and barcodes (tie-aware Hamming recall); at training it reached the calibrated
  value, and below `params.recall_target` the index should be retrained;
- the imbalance of the IVF list sizes (FAISS's `imbalance_factor`: N * sum(size^2) / (sum size)^2, 1 for
  equal lists; a search costs more the larger it is), against its value at training;
- the share of an HNSW graph's rows that are tombstones of removed slides (FAISS cannot delete them).

`--retrain` is advised when the recall is below the target, the imbalance grew by more than
`update.max_imbalance_growth`, or tombstones exceed `update.max_removed_fraction`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from search.barcodes import BarcodeIndex, hamming_recall
from search.config import UpdateConfig
from search.index import exact_knn, recall_at_k
from search.kinds import barcode_kind


def imbalance(index: Any) -> float | None:
    """FAISS's imbalance factor of an IVF index's list sizes (None for an index without lists)."""
    import faiss

    top = index if isinstance(index, faiss.IndexBinary) else faiss.downcast_index(index)
    if isinstance(top, faiss.IndexBinaryIVF):
        return round(float(top.invlists.imbalance_factor()), 4)
    if isinstance(top, faiss.IndexIVF):
        return round(float(top.invlists.imbalance_factor()), 4)
    return None


@dataclass
class Drift:
    """The drift check's measurements and its advice (`retrain`, with the reasons)."""

    tiles: int
    trained_tiles: int
    growth: float  # tiles now / tiles the quantizers were trained on
    held_out_slides: int
    recall: dict[str, dict[str, float | None]] = field(
        default_factory=dict
    )  # float|barcodes -> now, at training
    imbalance: dict[str, dict[str, float | None]] = field(default_factory=dict)
    tombstones: float = 0.0
    retrain: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human lines: what was measured and the advice."""
        out = [f"drift: {self.tiles} tiles, x{self.growth:.2f} the {self.trained_tiles} trained on"]
        for name, r in self.recall.items():
            out.append(f"drift: {name} recall@k {_fmt(r['now'])} (at training {_fmt(r['at_training'])})")
        for name, r in self.imbalance.items():
            out.append(
                f"drift: {name} list imbalance {_fmt(r['now'])} (at training {_fmt(r['at_training'])})"
            )
        if self.tombstones:
            out.append(f"drift: {self.tombstones:.1%} of the graph's rows are tombstones of removed slides")
        advice = "retrain advised (histo index --out DIR --retrain): " + "; ".join(self.reasons)
        out.append(advice if self.retrain else "drift: no retrain needed")
        return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def check_drift(index: Any, update: UpdateConfig) -> Drift:
    """The drift check of an opened SlideIndex (see the module docstring)."""
    m = index.manifest
    training = m["training"]
    cat = index.catalog
    held = [cat.position[s] for s in training["held_out_slides"] if s in cat.position]
    rows = np.zeros(len(cat.row_slide), dtype=bool)
    for s in held:
        rows[cat.rows(s)] = True
    drift = Drift(len(rows), training["tiles"], m["growth"]["tiles_vs_trained"], len(held))
    params = index.float_index.params
    k, target = int(params["calibration_k"]), float(params["recall_target"])
    float_kind, barcode_kind = index.float_index.kind, index.barcodes.kind
    if float_kind.tunes is not None and rows.any():
        drift.recall["float"] = {
            "now": _float_recall(index, rows, k),
            "at_training": params.get(f"calibrated_recall_at_{k}"),
        }
    barcode_params = m["barcode"]["index"]
    if barcode_kind.tunes is not None and rows.any():
        drift.recall["barcodes"] = {"now": _barcode_recall(index, rows, k),
                                    "at_training": barcode_params.get(f"calibrated_recall_at_{k}")}  # fmt: skip
    for name, structure in (("float", index.float_index.index), ("barcodes", index.barcodes.index)):
        at_training = training["imbalance"][name]
        if at_training is not None:
            drift.imbalance[name] = {"now": imbalance(structure), "at_training": at_training}
    drift.tombstones = round(index.float_index.tombstones / max(1, index.float_index.index.ntotal), 4)
    for name, r in drift.recall.items():
        if r["now"] is not None and r["now"] < target:
            drift.reasons.append(f"{name} recall@{k} {r['now']:.3f} is below recall_target {target}")
    for name, r in drift.imbalance.items():
        if r["now"] is not None and r["now"] > update.max_imbalance_growth * r["at_training"]:
            drift.reasons.append(f"{name} list imbalance grew from {r['at_training']:.3f} to {r['now']:.3f}")
    if drift.tombstones > update.max_removed_fraction:
        drift.reasons.append(f"{drift.tombstones:.1%} of the graph's rows are tombstones")
    drift.retrain = bool(drift.reasons)
    return drift


def _float_recall(index: Any, held: np.ndarray, k: int) -> float:
    """Recall@k of the held-out rows as queries over the other rows, against exact search over them."""
    features = index._features()
    queries = features[held]
    found = index.float_index.search(queries, k, ~held, own=True)[1]
    truth = exact_knn(queries, features, k, allowed=~held)[1]
    return round(recall_at_k(found, truth), 4)


def _barcode_recall(index: Any, held: np.ndarray, k: int) -> float:
    """Tie-aware Hamming recall@k of the held-out rows over the other rows (exact: a flat Hamming scan)."""
    import faiss

    codes = index.barcodes.codes
    exact = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    exact.add(codes)
    truth_d = BarcodeIndex(barcode_kind("flat"), exact, codes).search(codes[held], k, ~held)[0]
    found_d = index.barcodes.search(codes[held], k, ~held)[0]
    return round(hamming_recall(found_d, truth_d), 4)
