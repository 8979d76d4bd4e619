"""Filtered search (`--where`): parsing, the row-filtered kNN of every index kind, the two-stage search
exact within the filter, and the vertical evaluation that uses it (search/filters.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from growth_support import build, slide_ids, write_features

from histo.errors import HistoError
from search.barcodes import BarcodeIndex, build_binary_index, hamming_matrix, minmax_barcode
from search.evaluate import evaluate_engine
from search.filters import LastFilter, ListGroups, ListPlan, digest, parse_where, slide_mask, where_of
from search.index import EXACT_SCAN_ADVANTAGE, exact_knn
from search.kinds import barcode_kind
from search.slide_index import SlideIndex

KINDS = ("flat", "ivf", "ivfpq", "hnsw", "ivf_hnsw")
FILTERS = (
    {"site": frozenset({"A"})},
    {"site": frozenset({"B", "C"}), "label": frozenset({"x", "z"})},
    {"project": frozenset({"CPTAC"})},
)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SlideIndex]:
    """One index of every kind over the same 120 synthetic slides (4 sites, 3 labels, 2 projects)."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        write_features(root, slide_ids(120), seed=3)
        build(root, slide_ids(120), kind)
        out[kind] = SlideIndex.open(root)
    return out


def test_where_clauses_parse_into_one_filter() -> None:
    assert parse_where(["site=A,B", "label=x"]) == {"site": {"A", "B"}, "label": {"x"}}
    assert parse_where(["label=x,y", "label=y,z"]) == {"label": {"y"}}  # a key twice: both must allow
    assert where_of({"site": "A", "label": ["x", "y"]}) == {"site": {"A"}, "label": {"x", "y"}}
    assert where_of(["project=TCGA"]) == {"project": {"TCGA"}} and where_of(None) == {}
    with pytest.raises(
        HistoError,
        match=r"^--where 'organ=lung': unknown key 'organ' \(filter on label, site, project, patient\)$",
    ):
        parse_where(["organ=lung"])
    with pytest.raises(HistoError, match=r"^--where 'site': expected key=value\[,value...\], e.g. site=A,B$"):
        parse_where(["site"])
    with pytest.raises(
        HistoError, match=r"^--where 'label=z': no label value is allowed by every clause on label$"
    ):
        parse_where(["label=x", "label=z"])


def test_a_filter_no_slide_passes_names_what_the_index_has(indexes: dict) -> None:
    cat = indexes["flat"].catalog
    mask = slide_mask(cat, {"site": frozenset({"A"}), "label": frozenset({"x"})})
    assert mask.tolist() == [s == "A" and lab == "x" for s, lab in zip(cat.sites, cat.labels, strict=True)]
    with pytest.raises(HistoError, match=r"^no indexed slide has site=Q \(the index has site: A, B, C, D\)$"):
        slide_mask(cat, {"site": frozenset({"Q"})})
    with pytest.raises(HistoError, match=r"^no indexed slide has patient=P000 and site=C$"):
        slide_mask(cat, {"patient": frozenset({"P000"}), "site": frozenset({"C"})})


def test_exact_knn_within_a_filter_is_brute_force_over_the_subset() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5000, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    for fraction in (0.9, 0.3, 0.01):  # masked blocks, gathered blocks, a handful of rows
        allowed = rng.random(5000) < fraction
        d, i = exact_knn(queries, base, 10, allowed=allowed)
        rows = np.flatnonzero(allowed)
        dist = np.linalg.norm(base[rows][None] - queries[:, None], axis=2)
        expected = rows[np.argsort(dist, axis=1, kind="stable")[:, :10]]
        np.testing.assert_array_equal(i, expected)
        assert allowed[i].all()
    few = np.zeros(5000, dtype=bool)
    few[[3, 77]] = True
    d, i = exact_knn(queries, base, 5, allowed=few)
    assert i.shape == (7, 5) and (np.sort(i[:, :2], axis=1) == [3, 77]).all() and (i[:, 2:] == -1).all()
    assert np.isinf(d[:, 2:]).all()


def test_barcode_flat_and_ivf_filters_return_allowed_rows_only() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 64))
    feats = np.repeat(centres, 50, 0) + 0.5 * rng.standard_normal((2000, 64))
    codes = minmax_barcode(feats)
    groups = np.repeat(np.arange(40), 50)
    allowed = np.isin(groups, np.arange(0, 40, 3))
    flat, _ = build_binary_index(codes, "flat")
    d, i = BarcodeIndex(barcode_kind("flat"), flat, codes).search(codes[:20], 10, allowed)
    truth = np.sort(hamming_matrix(codes[:20], codes[allowed]), axis=1)[:, :10]
    np.testing.assert_array_equal(d, truth)  # exact within the filter
    assert allowed[i].all()
    ivf, _ = build_binary_index(codes, "ivf", {"calibration_queries": 200}, groups=groups)
    searched = BarcodeIndex(barcode_kind("ivf"), ivf, codes)
    d, i = searched.search(codes[:20], 10, allowed)
    assert allowed[i[i >= 0]].all() and (i >= 0).all()
    assert ((d <= truth[:, -1:]).sum() / d.size) >= 0.9  # tie-aware recall within the filter
    np.testing.assert_array_equal(searched.search(codes[:20], 10)[1], ivf.search(codes[:20], 10)[1])


def test_binary_ivf_probes_only_lists_holding_allowed_rows_and_every_one_the_list_scan_took() -> None:
    """The binary IVF ranks only the lists holding an allowed row, nearest first (ties: the lower list),
    until they hold as many allowed rows as the query's nprobe nearest lists hold rows, and at least every
    such list as near as its nprobe-th nearest; so it scans every non-empty list `ListPlan.probes` scans."""
    import faiss

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((60, 64))
    codes = minmax_barcode(np.repeat(centres, 40, 0) + 0.5 * rng.standard_normal((2400, 64)))
    groups = np.repeat(np.arange(60), 40)
    ivf, _ = build_binary_index(codes, "ivf", {"calibration_queries": 200}, groups=groups)
    quantizer = faiss.downcast_IndexBinary(ivf.quantizer)
    centroids = faiss.vector_to_array(quantizer.xb).reshape(-1, ivf.code_size)
    plan, queries, nprobe = ListPlan.of(ivf.invlists), codes[::97], int(ivf.nprobe)
    distances = hamming_matrix(queries, centroids)
    for allowed in (groups % 2 == 0, groups % 10 == 0, groups == 7, np.ones(2400, dtype=bool)):
        sizes = plan.allowed_sizes(allowed, digest(allowed))
        lists = plan.probes_among(distances.astype(np.uint16), sizes, nprobe)
        scanned = plan.probes(np.argsort(distances, axis=1, kind="stable"), sizes, nprobe)
        for q, row in enumerate(lists):
            order = np.argsort(distances[q], kind="stable")
            target, reach = plan.sizes[order[:nprobe]].sum(), distances[q, order[nprobe - 1]]
            expected, met = [], 0
            for i in order[sizes[order] > 0]:
                if met >= target and distances[q, i] > reach:
                    break
                expected.append(i)
                met += sizes[i]
            assert row[row >= 0].tolist() == expected and (row[len(expected) :] == -1).all()
            took = scanned[q][scanned[q] >= 0]
            assert set(took[sizes[took] > 0]) <= set(expected)


def test_binary_ivf_groups_of_lists_hold_what_the_list_rule_asks() -> None:
    """A filter's view merges the lists holding allowed rows into groups of about the unfiltered mean list
    size (each such list in exactly one group); a query scans its groups nearest first (a group as near as
    its nearest list) until they hold as many allowed rows as its nprobe nearest lists hold rows, and every
    group holding a list as near as its nprobe-th nearest list."""
    import faiss

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((60, 64))
    codes = minmax_barcode(np.repeat(centres, 40, 0) + 0.5 * rng.standard_normal((2400, 64)))
    groups_of_rows = np.repeat(np.arange(60), 40)
    ivf, _ = build_binary_index(codes, "ivf", {"calibration_queries": 200}, groups=groups_of_rows)
    centroids = faiss.vector_to_array(faiss.downcast_IndexBinary(ivf.quantizer).xb).reshape(-1, ivf.code_size)
    plan, queries, nprobe = ListPlan.of(ivf.invlists), codes[::97], int(ivf.nprobe)
    distances = hamming_matrix(queries, centroids)
    mean_size = ivf.ntotal / ivf.nlist
    spread = np.arange(2400)
    merged = 0
    for allowed in (spread % 4 == 0, spread % 10 == 0, groups_of_rows % 2 == 0, groups_of_rows == 7):
        sizes = plan.allowed_sizes(allowed, digest(allowed))
        groups = ListGroups.of(centroids, sizes, mean_size)
        holding = np.flatnonzero(sizes > 0)
        assert (groups.group_of[sizes == 0] == -1).all() and (groups.group_of[holding] >= 0).all()
        assert len(groups.sizes) == min(len(holding), max(1, round(sizes.sum() / mean_size)))
        np.testing.assert_array_equal(
            groups.sizes, np.bincount(groups.group_of[holding], weights=sizes[holding])
        )
        if sizes[holding].mean() < mean_size / 2:  # lists mostly excluded: merged into fewer, larger ones
            assert len(groups.sizes) < len(holding)
            merged += 1
        picked = plan.probes_among(distances.astype(np.uint16), sizes, nprobe, groups)
        for q, row in enumerate(picked):
            scanned = row[row >= 0]
            members = [np.flatnonzero(groups.group_of == g) for g in range(len(groups.sizes))]
            group_d = np.array([distances[q, m].min() for m in members])
            assert (np.diff(group_d[scanned].astype(int)) >= 0).all()  # nearest first
            order = np.argsort(distances[q], kind="stable")
            target, reach = plan.sizes[order[:nprobe]].sum(), distances[q, order[nprobe - 1]]
            assert groups.sizes[scanned].sum() >= min(target, sizes.sum())
            assert set(groups.group_of[holding[distances[q, holding] <= reach]]) <= set(scanned)
            assert groups.sizes[scanned[:-1]].sum() < target or group_d[scanned[-1]] <= reach  # no extra
    assert merged == 2


def rank_all(index: SlideIndex, queries: SlideIndex, where: dict | None, exhaustive: bool = False) -> list:
    """Top-5 (slide ID, distance) of every slide of `queries` as a query (both modes), within `where`, with
    a first stage of 15 neighbours for each of 8 query tiles (the same for every index compared)."""
    cat = index.catalog
    allowed = cat.allowed(None, where) if where else None
    settings = index.engine.settings.model_copy(update={"tile_k": 15, "stage1_tiles": 8})
    out = []
    for mode in ("barcode", "float"):
        tiles = queries.engine.tiles[mode]()
        for s in range(len(queries)):
            q = tiles[queries.catalog.rows(s)]
            ranked, _ = index.engine.rank(q, mode, 5, allowed, exhaustive, settings)
            assert allowed is None or all(allowed[i] for i, _ in ranked)
            out.append([(cat.slide_ids[i], d) for i, d in ranked])
    return out


def test_a_filtered_search_is_the_search_of_the_subset(indexes: dict, tmp_path: Path) -> None:
    """Exact within the filter: on the whole index, a filtered search returns what the same search returns
    on an index of the allowed slides alone (two-stage and exhaustive, both modes)."""
    from growth_support import copy_features

    full = indexes["flat"]
    for n, where in enumerate(FILTERS):
        ids = [
            sid for sid, ok in zip(full.catalog.slide_ids, slide_mask(full.catalog, where), strict=True) if ok
        ]
        copy_features(full.path, tmp_path / str(n), ids)
        build(tmp_path / str(n), ids)
        subset = SlideIndex.open(tmp_path / str(n))
        for exhaustive in (False, True):
            assert rank_all(full, full, where, exhaustive) == rank_all(subset, full, None, exhaustive)


def agreement(index: SlideIndex, flat: SlideIndex, filters: tuple) -> float:
    """Share of queries whose top-5 slide IDs are the flat index's, over `filters`."""
    pairs = [
        (a, b)
        for w in filters
        for a, b in zip(rank_all(index, flat, w), rank_all(flat, flat, w), strict=True)
    ]
    return sum([s for s, _ in a] == [s for s, _ in b] for a, b in pairs) / len(pairs)


SCANS = ("auto", "selector")  # an IVF's filtered search as it chooses, or always through its lists


def scanning(index: SlideIndex, scan: str, monkeypatch: pytest.MonkeyPatch) -> SlideIndex:
    """The index, its IVF made to search every filter through its lists (FAISS id selector) for
    "selector" (without its rows' vectors it cannot scan the allowed rows exactly)."""
    if scan == "selector":
        monkeypatch.setattr(index.float_index, "base", None)
    return index


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_a_filter_costs_approximate_kinds_no_accuracy(
    indexes: dict, kind: str, scan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within every filter (one that excludes the query's own label among them) an approximate index finds
    the flat index's top-5 at least as often as it does without a filter."""
    scanning(indexes[kind], scan, monkeypatch)
    unfiltered = agreement(indexes[kind], indexes["flat"], (None,))
    margin = 0.05 if kind == "ivfpq" else 0.02  # PQ codes rank far neighbours (another label's) coarsely
    for where in (*FILTERS, {"label": frozenset({"x"})}):  # label x: the nearest allowed slides of a y or z
        filtered = agreement(indexes[kind], indexes["flat"], (where,))  # query lie beyond its own lists
        assert filtered >= unfiltered - margin, (kind, where, filtered, unfiltered)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("kind", KINDS)
def test_filtered_knn_of_every_kind_stays_in_the_filter(
    indexes: dict, kind: str, scan: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = scanning(indexes[kind], scan, monkeypatch)
    cat = index.catalog
    rows = cat.allowed(None, {"site": frozenset({"D"})})[cat.row_slide]
    for mode in ("barcode", "float"):
        q = index.engine.tiles[mode]()[::37]
        _, i = index.engine.knn[mode](q, 15, rows)
        assert (i >= 0).all() and rows[i].all()
        if mode == "float":  # near the exact neighbours within the filter
            truth = exact_knn(q, index._features(), 15, allowed=rows)[1]
            hits = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(i, truth, strict=True)])
            assert hits >= (0.8 if kind == "ivfpq" else 0.9)


@pytest.mark.parametrize("kind", ("ivf", "ivfpq", "ivf_hnsw"))
def test_an_ivf_scans_the_rows_of_a_narrow_filter_exactly(
    indexes: dict, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter allowing few rows is searched exactly (cheaper than the lists a filtered IVF would scan):
    the exact neighbours within it; a wide filter goes through the lists."""
    index = indexes[kind]
    f = index.float_index
    narrow = index.catalog.allowed(None, {"site": frozenset({"D"})})[index.catalog.row_slide]
    wide = ~index.catalog.allowed(None, {"site": frozenset({"D"})})[index.catalog.row_slide]
    nlist, nprobe = f.params["nlist"], f.params["nprobe"]
    assert f.exact_is_cheaper(narrow) == ((narrow.mean() ** 2) <= EXACT_SCAN_ADVANTAGE * nprobe / nlist)
    q = index._features()[::29]
    assert f.exact_is_cheaper(narrow)  # 23 % of the rows of a 28-list index
    d, i = f.search(q, 15, narrow)
    truth_d, truth_i = exact_knn(q, index._features(), 15, allowed=narrow)
    np.testing.assert_array_equal(i, truth_i)
    np.testing.assert_allclose(d, truth_d, rtol=1e-5)

    def no_exact_scan(*args, **kwargs):
        raise AssertionError("own=True searches the index's lists (what the drift check measures)")

    monkeypatch.setattr("search.index.exact_knn", no_exact_scan)
    _, own = f.search(q, 15, narrow, own=True)
    assert (own >= 0).all() and narrow[own].all()
    assert f.exact_is_cheaper(wide) == ((wide.mean() ** 2) <= EXACT_SCAN_ADVANTAGE * nprobe / nlist)
    many_lists = dataclasses.replace(f, parameters=f.parameters.with_resolved({"nprobe": 1, "nlist": 10_000}))
    assert not many_lists.exact_is_cheaper(wide) and not many_lists.exact_is_cheaper(narrow)  # short lists


def test_slide_index_search_takes_where(indexes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    index = indexes["ivf"]
    query = index.catalog.rows(7)
    record = SimpleNamespace(slide_id="q", tile_size_level0=None)  # what the query's tiler records
    stored = (index._features()[query], index.catalog.coords[query], record)  # slide 7's tiles as the query
    monkeypatch.setattr(index, "query_features", lambda source: stored)
    from search.queries import SlideQuery

    result = index._search_slide(
        SlideQuery("q", None), 5, "float", "search", where={"site": ["B"], "label": "y"}
    )
    assert result.results and all(
        index.catalog.sites[index.catalog.position[h.slide_id]] == "B" for h in result.results
    )
    assert all(h.label == "y" for h in result.results)
    n = int(slide_mask(index.catalog, {"site": frozenset({"B"}), "label": frozenset({"y"})}).sum())
    assert result.info["where"] == {"label": ["y"], "site": ["B"]} and result.info["allowed_slides"] == n
    plain = index._search_slide(SlideQuery("q", None), 5, "float", "search")
    assert "where" not in plain.info


def test_vertical_evaluation_runs_the_filtered_two_stage_search(indexes: dict) -> None:
    """A site holds a quarter of the slides: the first stage searches its rows only, never falling back."""
    engine = indexes["flat"].engine
    ev = evaluate_engine(
        engine, ks=(1, 3), mode="barcode", progress=False, strategy="two-stage", compare=True
    )
    vertical = ev.scopes["vertical"]
    assert vertical.n_queries == 120 and vertical.agreement.fallbacks == 0
    assert vertical.agreement.rankings_differ <= 1  # two-stage within the site ~ every slide of the site


def test_cli_search_where(tmp_path: Path) -> None:
    """`histo search --where` on a real index is covered in test_search_cli.py; here the option errors."""
    from click.testing import CliRunner

    from histo.cli import main

    result = CliRunner().invoke(main, ["search", "--index", str(tmp_path), "q.svs", "--where", "organ=lung"])
    assert result.exit_code == 2 and "unknown key 'organ'" in result.stderr and result.stderr.count("\n") == 1


def test_few_excluded_rows_widen_the_unfiltered_knn() -> None:
    """A patient's slides excluded: the kNN of k + their rows without them is the filtered kNN."""
    from search.filters import widened

    rng = np.random.default_rng(2)
    base = rng.standard_normal((3000, 8)).astype(np.float32)
    queries = base[:5] + 0.01
    rows = np.ones(3000, dtype=bool)
    rows[:40] = False  # the queries' own rows and their neighbours' first rows
    d, i = widened(lambda q, k: exact_knn(q, base, k), queries, 10, rows)
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(i, exact_knn(queries, base, 10, allowed=rows)[1])
    assert rows[i].all()
    rows[:200] = False  # more than 4 x k excluded: no widening
    assert widened(lambda q, k: exact_knn(q, base, k), queries, 10, rows) is None


@pytest.mark.parametrize("spread", [400, 12, 1])
def test_nearest_lists_equals_the_stable_sort_of_the_centroid_distances(spread: int) -> None:
    """The vectors of each query's nprobe nearest lists and the nprobe-th distance, by a partition: the same
    as taking the first nprobe of a stable sort (ties to the lower list), however many lists tie."""
    rng = np.random.default_rng(spread)
    sizes = rng.integers(0, 600, 300)
    plan = ListPlan(np.concatenate([[0], np.cumsum(sizes)]), np.zeros(sizes.sum(), np.int64),
                    np.repeat(np.arange(300), sizes).astype(np.int32))  # fmt: skip
    distances = rng.integers(300, 300 + spread, (7, 300)).astype(np.uint16)
    for nprobe in (1, 16, 300, 400):
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :nprobe]
        target, reach = plan.nearest_lists(distances, nprobe)
        assert (target == sizes[nearest].sum(axis=1)).all()
        assert (reach == np.take_along_axis(distances, nearest, 1).max(axis=1)).all()


def test_last_filter_hashes_a_mask_again_unless_it_is_the_same_read_only_one() -> None:
    last, rows = LastFilter(), np.arange(100) % 3 == 0
    assert last.digest(rows) == digest(rows)
    rows[0] = False  # a writable mask may have changed in place: hashed again
    assert last.digest(rows) == digest(rows)
    frozen = rows.copy()
    frozen.flags.writeable = False
    key = last.digest(frozen)
    assert last.digest(frozen) is key and last.digest(~frozen) == digest(~frozen) != key
