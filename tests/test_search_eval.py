"""Leave-one-patient-out evaluation on tiny hand-made indexes with hand-computed numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from search.config import IndexConfig
from search.engine import Catalog, SearchEngine
from search.evaluate import evaluate_engine
from search.index import exact_knn


def settings(**keys):
    """The index's search settings (first stage, matches) with `keys` over the packaged defaults."""
    return IndexConfig.section("search", keys)


def line_engine(xs, labels, patients, sites) -> SearchEngine:
    """One tile per slide at position x on a line: slide distance = |x_i - x_j| (float mode)."""
    feats = np.array([[x, 0.0] for x in xs], dtype=np.float32)
    cat = Catalog(
        slide_ids=[f"s{i}" for i in range(len(xs))],
        labels=labels,
        patients=patients,
        sites=sites,
        offsets=np.arange(len(xs) + 1),
        coords=np.zeros((len(xs), 2), np.int64),
    )
    return SearchEngine(
        cat,
        knn={"float": lambda q, k, rows: exact_knn(q, feats, k, allowed=rows)},
        tiles={"float": lambda: feats},
        settings=settings(),
    )


SIX = line_engine(
    xs=[0, 1, 3, 4, 10, 11],
    labels=["A", "A", "B", "B", "A", "B"],
    patients=["p0", "p1", "p2", "p3", "p4", "p5"],
    sites=["x", "x", "x", "y", "y", "y"],
)


def test_horizontal_numbers_by_hand(tmp_path) -> None:
    ev = evaluate_engine(SIX, ks=(1, 3, 5), mode="float", out_dir=tmp_path, progress=False)
    h = ev.scopes["horizontal"]
    # Rankings by |x_i - x_j|: top-1 predictions A A B B B A; MV@3 B B A A B B; MV@5 B B A A B A.
    assert [h.predictions[f"s{i}"][1] for i in range(6)] == list("AABBBA")
    assert [h.predictions[f"s{i}"][3] for i in range(6)] == list("BBAABB")
    assert [h.predictions[f"s{i}"][5] for i in range(6)] == list("BBAABA")
    s1, s3, s5 = h.scores[1], h.scores[3], h.scores[5]
    assert s1.accuracy == pytest.approx(4 / 6) and s1.macro_f1 == pytest.approx(2 / 3)
    assert s1.confusion == [[2, 1], [1, 2]]
    assert s3.accuracy == pytest.approx(1 / 6)
    assert s3.per_class["A"].f1 == 0.0 and s3.per_class["B"].precision == pytest.approx(1 / 4)
    assert s3.per_class["B"].recall == pytest.approx(1 / 3) and s3.per_class["B"].f1 == pytest.approx(2 / 7)
    assert s3.macro_f1 == pytest.approx(1 / 7) and s3.confusion == [[0, 3], [2, 1]]
    assert s5.accuracy == 0.0 and s5.macro_f1 == 0.0
    assert (tmp_path / "confusion_horizontal_float.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "evaluation_float.json").read_text())
    assert saved["scopes"]["horizontal"]["scores"]["3"]["accuracy"] == pytest.approx(1 / 6)


def test_vertical_searches_within_the_site() -> None:
    ev = evaluate_engine(SIX, ks=(1, 3), mode="float", progress=False)
    v = ev.scopes["vertical"]
    # Site x = s0 s1 s2, site y = s3 s4 s5: top-1 A A A A B A.
    assert [v.predictions[f"s{i}"][1] for i in range(6)] == list("AAAABA")
    assert v.scores[1].accuracy == pytest.approx(2 / 6)
    assert v.scores[1].per_class["A"].precision == pytest.approx(2 / 5)
    assert v.scores[1].per_class["A"].f1 == pytest.approx(0.5) and v.scores[1].macro_f1 == pytest.approx(0.25)


def test_same_patient_slides_are_excluded() -> None:
    eng = line_engine([0, 0, 5], ["A", "B", "A"], ["p0", "p0", "p1"], [None, None, None])
    ev = evaluate_engine(eng, ks=(1,), mode="float", progress=False)
    assert list(ev.scopes) == ["horizontal"]  # no sites: no vertical search
    h = ev.scopes["horizontal"]
    # s0 and s1 may only find s2 (A); s2 finds s0 and s1 tied at 5, s0 ranked first (A).
    assert h.predictions == {"s0": {1: "A"}, "s1": {1: "A"}, "s2": {1: "A"}}
    assert h.scores[1].accuracy == pytest.approx(2 / 3)


def test_unanswerable_queries_are_listed_not_scored() -> None:
    eng = line_engine([0, 1, 2], ["A", "B", "A"], ["p0", "p1", "p2"], ["x", "y", "y"])
    v = evaluate_engine(eng, ks=(1,), mode="float", progress=False).scopes["vertical"]
    assert v.unanswerable == ["s0"] and v.n_queries == 2


def test_two_stage_matches_exhaustive_on_clustered_slides() -> None:
    from search.barcodes import BarcodeIndex, build_binary_index, minmax_barcode
    from search.kinds import barcode_kind

    rng = np.random.default_rng(1)
    n_slides, n_tiles = 60, 20
    centres = rng.standard_normal((n_slides, 128))
    feats = np.repeat(centres, n_tiles, 0) + 0.6 * rng.standard_normal((n_slides * n_tiles, 128))
    codes = minmax_barcode(feats)
    index, _ = build_binary_index(codes, "flat")
    cat = Catalog([f"s{i:02d}" for i in range(n_slides)], [None] * n_slides, [None] * n_slides,
                  [None] * n_slides, np.arange(n_slides + 1) * n_tiles, np.zeros((len(codes), 2), np.int64))  # fmt: skip
    eng = SearchEngine(
        cat,
        knn={"barcode": BarcodeIndex(barcode_kind("flat"), index, codes).search},
        tiles={"barcode": lambda: codes},
        settings=settings(stage1_tiles=8),
    )
    for parent in range(0, n_slides, 6):
        query = minmax_barcode(centres[parent] + 0.6 * rng.standard_normal((n_tiles, 128)))
        fast, info = eng.rank(query, "barcode", k=5)
        slow, _ = eng.rank(query, "barcode", k=5, exhaustive=True)
        assert fast == slow and fast[0][0] == parent
        assert info["strategy"] == "two-stage" and info["tile_k"] == 30 and 5 <= info["candidates"] < n_slides
        assert 5 <= info["measured"] <= info["candidates"]  # the second stage's branch and bound
    eng.settings = settings(stage1_tiles=8, tile_k=1)  # one neighbour per tile hits only the parent:
    # widened 4x until 5 slides are hit
    fast, info = eng.rank(query, "barcode", k=5)
    assert info["strategy"] == "two-stage" and info["tile_k"] > 1 and info["candidates"] >= 5 and fast == slow


def test_first_stage_uses_an_evenly_spread_subset_of_query_tiles() -> None:
    calls = []

    def knn(q: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        calls.append(q.copy())
        return np.zeros((len(q), k)), np.tile(np.arange(k), (len(q), 1))

    n = 12
    cat = Catalog([str(i) for i in range(n)], [None] * n, [None] * n, [None] * n, np.arange(n + 1) * 2,
                  np.zeros((2 * n, 2), np.int64))  # fmt: skip
    codes = np.arange(2 * n, dtype=np.uint8)[:, None].repeat(4, 1)
    eng = SearchEngine(
        cat,
        knn={"barcode": knn},
        tiles={"barcode": lambda: codes},
        settings=settings(stage1_tiles=3, tile_k=4),
    )
    query = np.arange(7, dtype=np.uint8)[:, None].repeat(4, 1)
    eng.rank(query, "barcode", k=2)
    assert [c[:, 0].tolist() for c in calls] == [[0, 3, 6]]
    eng.settings = settings(stage1_tiles=50, tile_k=4)  # more than the query has: every tile
    eng.rank(query, "barcode", k=2)
    assert calls[-1][:, 0].tolist() == list(range(7))


def tiles_engine(slides: list[list[list[float]]], labels, **search_keys) -> SearchEngine:
    """Slides of 2-D float tiles, one patient each; exact kNN over all tiles."""
    feats = np.array([t for s in slides for t in s], dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in slides])])
    n = len(slides)
    cat = Catalog([f"s{i}" for i in range(n)], labels, [f"p{i}" for i in range(n)], [None] * n, offsets,
                  np.zeros((len(feats), 2), np.int64))  # fmt: skip
    knn = {"float": lambda q, k, rows: exact_knn(q, feats, k, allowed=rows)}
    return SearchEngine(cat, knn=knn, tiles={"float": lambda: feats}, settings=settings(**search_keys))


# s0's first tile (the only one the first stage searches) is nearest the tiles of s1, but by the median of
# minimum distances over all its tiles s2 is the nearest slide: the two-stage answer is s1, the exact s2.
MISSED = tiles_engine(
    [[[0, 0], [10, 0], [10, 1]], [[0, 0.1], [0, 0.2], [0.1, 0], [0, 0.3]], [[1.5, 0], [10, 0.2], [10, 1.2]],
     [[50, 50], [51, 50], [52, 50]], [[-50, 50], [-51, 50], [-52, 50]]],
    ["X", "Y", "X", "Y", "Y"], tile_k=1, stage1_tiles=1,
)  # fmt: skip


def test_evaluation_ranks_exhaustively_by_default_and_counts_where_two_stage_differs(tmp_path) -> None:
    ev = evaluate_engine(MISSED, ks=(1,), mode="float", out_dir=tmp_path, progress=False)
    h = ev.scopes["horizontal"]
    assert ev.strategy == "exhaustive" and h.predictions["s0"] == {1: "X"}  # s2, the exact nearest slide
    differ, votes, fallbacks = 0, 0, 0
    for s in range(5):
        allowed = np.arange(5) != s
        query = MISSED.tiles["float"]()[MISSED.catalog.rows(s)]
        exact, _ = MISSED.rank(query, "float", 1, allowed, exhaustive=True)
        fast, info = MISSED.rank(query, "float", 1, allowed)
        differ += exact != fast
        votes += MISSED.catalog.labels[exact[0][0]] != MISSED.catalog.labels[fast[0][0]]
        fallbacks += info["strategy"] != "two-stage"
    a = h.agreement
    assert (a.other, a.n_queries, a.rankings_differ, a.predictions_differ, a.fallbacks) == (
        "two-stage",
        5,
        differ,
        {1: votes},
        fallbacks,
    )
    assert differ >= 1 and votes >= 1
    saved = json.loads((tmp_path / "evaluation_float.json").read_text())
    assert (
        saved["strategy"] == "exhaustive"
        and saved["scopes"]["horizontal"]["agreement"]["rankings_differ"] == differ
    )
    assert ev.strategy_lines()[0] == "ranking: exhaustive"
    assert ev.strategy_lines()[1].startswith(f"horizontal: two-stage differs on {differ}/5 rankings")


def test_two_stage_is_an_option_and_compares_only_when_asked() -> None:
    from histo.errors import HistoError

    fast = evaluate_engine(MISSED, ks=(1,), mode="float", progress=False, strategy="two-stage")
    assert fast.strategy == "two-stage" and fast.scopes["horizontal"].predictions["s0"] == {1: "Y"}
    assert fast.scopes["horizontal"].agreement is None and fast.agreements() == {}
    both = evaluate_engine(MISSED, ks=(1,), mode="float", progress=False, strategy="two-stage", compare=True)
    exact = evaluate_engine(MISSED, ks=(1,), mode="float", progress=False)
    assert both.agreements()["horizontal"] == {**exact.agreements()["horizontal"], "other": "exhaustive"}
    with pytest.raises(HistoError, match=r"evaluate\.strategy must be one of exhaustive, two-stage"):
        evaluate_engine(MISSED, ks=(1,), mode="float", progress=False, strategy="approximate")
