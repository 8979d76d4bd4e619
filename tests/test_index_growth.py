"""An index that grows: adds and removals on the trained structures, versions, snapshots, kills, the lock,
the drift check and --retrain (search/growth.py, storage.py, manifest.py, lock.py, drift.py)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from growth_support import build, copy_features, slide_ids, write_features

from histo.errors import HistoError
from histo.lock import LockedError
from search.config import IndexConfig
from search.growth import add_extracted, remove_slides, retrain, writing
from search.index import exact_knn, recall_at_k
from search.kinds import float_kind
from search.manifest import read_manifest
from search.slide_index import SlideIndex

REPO = Path(__file__).resolve().parent.parent
KINDS = ("flat", "ivf", "ivfpq", "hnsw", "ivf_hnsw")
IDS = slide_ids(90)
NO_COMPACTION = IndexConfig.section("update", {"max_parts": 100, "max_removed_fraction": 1.0})


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stored features of 90 slides (3 labels, 4 sites, 2 projects)."""
    root = tmp_path_factory.mktemp("source")
    write_features(root, IDS)
    return root


def fresh(source: Path, root: Path, ids: list[str], kind: str = "flat") -> SlideIndex:
    copy_features(source, root, ids)
    build(root, ids, kind)
    return SlideIndex.open(root)


def grown(source: Path, root: Path, first: list[str], later: list[list[str]], kind: str = "flat") -> Path:
    """An index built on `first`, then grown by each batch of `later` (one add each)."""
    copy_features(source, root, first)
    build(root, first, kind)
    for batch in later:
        copy_features(source, root, batch)
        assert add_extracted(root, NO_COMPACTION).slide_ids == tuple(sorted(batch))
    return root


def unnamed(root: Path) -> list[str]:
    """Files in the index dir that its current version does not name (the lock file aside)."""
    named = set(read_manifest(root)["files"])
    own = {".lock", "manifest.json"}
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.name not in named | own)


def same_index(a: SlideIndex, b: SlideIndex) -> None:
    """Two indexes hold the same slides, rows, codes and vectors."""
    assert a.catalog.slide_ids == b.catalog.slide_ids
    np.testing.assert_array_equal(a.catalog.offsets, b.catalog.offsets)
    np.testing.assert_array_equal(a.catalog.coords, b.catalog.coords)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a._features(), b._features())


def rankings(index: SlideIndex, queries: SlideIndex, allowed=None) -> list:
    """Top-5 of every 4th slide of `queries` as a query, both modes, two-stage and exhaustive."""
    out = []
    for mode in ("barcode", "float"):
        tiles = queries.engine.tiles[mode]()
        for s in range(0, len(queries), 4):
            q = tiles[queries.catalog.rows(s)]
            for exhaustive in (False, True):
                ranked, _ = index.engine.rank(q, mode, 5, allowed, exhaustive)
                out.append([(index.catalog.slide_ids[i], d) for i, d in ranked])
    return out


def test_flat_after_adds_and_removals_equals_a_fresh_build(source: Path, tmp_path: Path) -> None:
    root = grown(source, tmp_path / "g", IDS[::3], [IDS[1::3], IDS[2::3]])
    removed = IDS[5:40:4]
    remove_slides(root, removed, NO_COMPACTION)
    manifest = read_manifest(root)
    assert [len(manifest["parts"][r]) for r in ("coords", "barcodes", "float")] == [3, 3, 3]  # not merged
    assert manifest["storage_rows"] > manifest["counts"]["tiles"]  # the removed rows are still stored
    kept = [s for s in IDS if s not in removed]
    reference = fresh(source, tmp_path / "fresh", kept)
    index = SlideIndex.open(root)
    same_index(index, reference)
    assert rankings(index, reference) == rankings(reference, reference)
    for rgb_row in (0, 57, len(index.codes) - 1):  # patch queries: nearest tiles, both modes
        for mode in ("float", "barcode"):
            codes = index.engine.tiles[mode]()[rgb_row : rgb_row + 1]
            a, b = (
                index.engine.nearest_tiles("q", codes, mode, 7),
                reference.engine.nearest_tiles("q", codes, mode, 7),
            )
            assert [h.to_dict() for h in a.results] == [h.to_dict() for h in b.results]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw", "ivf_hnsw"])
def test_approximate_kinds_grow_without_retraining(source: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / kind
    copy_features(source, root, IDS[:60])
    build(root, IDS[:60], kind)
    before = read_manifest(root)
    trained = {name: (root / f).read_bytes() for name, f in before["training"]["files"].items() if f}
    # the barcode IVF is trained; the float index too, except HNSW (its graph takes the rows in place)
    assert "barcodes" in trained and ("float" in trained) == (kind != "hnsw")
    copy_features(source, root, IDS[60:])
    update = add_extracted(root, NO_COMPACTION)
    after = read_manifest(root)
    assert update.op == "add" and len(update.slide_ids) == 30 and after["version"] == 2
    assert after["training"] == before["training"]  # no retraining: the same trained files and record
    assert {name: (root / f).read_bytes() for name, f in after["training"]["files"].items() if f} == trained
    assert after["index"]["params"] == before["index"]["params"]  # nprobe / efSearch kept
    float_parts = 1 if kind == "hnsw" else 2  # HNSW (grows: rewrite) rewrote its one part
    assert [len(after["parts"][r]) for r in ("coords", "barcodes", "float")] == [2, 2, float_parts]
    growth = after["growth"]
    assert growth["added_slides"] == 30 and growth["since_version"] == 1
    assert growth["tiles_vs_trained"] == pytest.approx(
        after["counts"]["tiles"] / before["counts"]["tiles"], abs=1e-4
    )
    index, reference = SlideIndex.open(root), fresh(source, tmp_path / "flat", IDS)
    assert index.catalog.slide_ids == reference.catalog.slide_ids
    np.testing.assert_array_equal(index._features(), reference._features())  # read back from the index
    queries = reference._features()[::5]
    truth = exact_knn(queries, reference._features(), 10)[1]
    assert recall_at_k(index.float_index.search(queries, 10)[1], truth) >= (0.75 if kind == "ivfpq" else 0.9)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_slides_are_never_returned(source: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / kind
    copy_features(source, root, IDS[:50])
    build(root, IDS[:50], kind)
    removed = IDS[10:20]
    before = SlideIndex.open(root)
    remove_slides(root, removed, NO_COMPACTION)
    index = SlideIndex.open(root)
    assert index.catalog.slide_ids == [s for s in IDS[:50] if s not in removed]
    assert not any((root / "features.zarr" / "slides" / s).exists() for s in removed)
    removed_rows = int(before.catalog.offsets[20] - before.catalog.offsets[10])
    assert index.float_index.tombstones == (0 if float_kind(kind).removes else removed_rows)
    for mode in ("barcode", "float"):
        for s in range(10, 20):  # the removed slides' own tiles as queries
            q = before.engine.tiles[mode]()[before.catalog.rows(s)]
            ranked, _ = index.engine.rank(q, mode, 5)
            assert not {index.catalog.slide_ids[i] for i, _ in ranked} & set(removed)
            _, rows = index.engine.knn[mode](q, 20, None)
            assert rows.min() >= 0 and rows.max() < len(index.codes)
    assert (
        index.manifest["growth"]["removed_slides"] == 10 and index.manifest["history"][-1]["op"] == "remove"
    )
    with pytest.raises(HistoError, match="not in the index: S010"):
        remove_slides(root, ["S010"])
    left = index.catalog.slide_ids
    with pytest.raises(HistoError, match="removing every slide would leave an empty index"):
        remove_slides(root, left)
    assert SlideIndex.open(root).catalog.slide_ids == left  # refused: nothing changed


def test_a_large_removal_merges_the_parts(source: Path, tmp_path: Path) -> None:
    root = grown(source, tmp_path / "g", IDS[:30], [IDS[30:40]])
    update = remove_slides(root, IDS[:15])  # half of the rows: above update.max_removed_fraction
    m = read_manifest(root)
    assert update.compacted and m["history"][-1]["op"] == "compact"
    assert m["storage_rows"] == m["counts"]["tiles"] and all(len(p) == 1 for p in m["parts"].values())
    same_index(SlideIndex.open(root), fresh(source, tmp_path / "fresh", IDS[15:40]))
    assert unnamed(root) == []  # every file of the earlier versions was deleted


def test_too_many_parts_are_merged(source: Path, tmp_path: Path) -> None:
    root = grown(source, tmp_path / "g", IDS[:30], [])
    update_config = IndexConfig.section("update", {"max_parts": 2})
    copy_features(source, root, IDS[30:35])
    assert not add_extracted(root, update_config).compacted
    copy_features(source, root, IDS[35:40])
    assert add_extracted(root, update_config).compacted
    assert all(len(p) == 1 for p in read_manifest(root)["parts"].values())
    same_index(SlideIndex.open(root), fresh(source, tmp_path / "fresh", IDS[:40]))


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_readers_keep_their_version(source: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / kind
    copy_features(source, root, IDS[:40])
    build(root, IDS[:40], kind)
    old = SlideIndex.open(root)
    queries = fresh(source, tmp_path / "queries", IDS)
    before = rankings(old, queries)
    copy_features(source, root, IDS[40:70])
    add_extracted(root, NO_COMPACTION)
    remove_slides(root, IDS[:20], NO_COMPACTION)
    assert rankings(old, queries) == before  # the reader opened before still searches its version
    assert old.catalog.slide_ids == IDS[:40]
    new = SlideIndex.open(root)
    assert new.catalog.slide_ids == IDS[20:70] and new.manifest["version"] == 3
    hits = {sid for r in rankings(new, queries) for sid, _ in r}
    assert hits & set(IDS[40:70]) and not hits & set(IDS[:20])


KILL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import search.growth as growth
point = sys.argv[2]

def killing(real, before):
    def call(*args, **kwargs):
        if not before:
            real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    return call

if point == "mid-write":  # the first FAISS part of the update is written, then the kill
    growth.write_faiss = killing(growth.write_faiss, before=False)
else:  # just before or just after the manifest is replaced
    growth.write_manifest = killing(growth.write_manifest, before=point == "before-switch")
op = sys.argv[3]
if op == "add":
    growth.add_extracted(sys.argv[1])
else:
    growth.remove_slides(sys.argv[1], sys.argv[4:])
"""


def killed(root: Path, point: str, *args: str) -> None:
    script = KILL.format(repo=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root), point, *args], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


@pytest.mark.parametrize("point", ["mid-write", "before-switch"])
def test_a_kill_during_an_add_leaves_the_previous_version(source: Path, tmp_path: Path, point: str) -> None:
    root = tmp_path / "g"
    copy_features(source, root, IDS[:40])
    build(root, IDS[:40], "ivf")
    manifest_bytes = (root / "manifest.json").read_bytes()
    previous = rankings(SlideIndex.open(root), SlideIndex.open(root))
    copy_features(source, root, IDS[40:60])
    killed(root, point, "add")
    assert (root / "manifest.json").read_bytes() == manifest_bytes  # the switch never happened
    orphans = [p.name for p in root.iterdir() if ".000002." in p.name]
    assert orphans  # the killed writer's new files are there, named by no version
    survivor = SlideIndex.open(root)  # verifies every file of version 1
    assert survivor.manifest["version"] == 1 and rankings(survivor, survivor) == previous
    assert add_extracted(root, NO_COMPACTION).slide_ids == tuple(IDS[40:60])  # the next writer completes it
    assert unnamed(root) == [] and SlideIndex.open(root).catalog.slide_ids == IDS[:60]


def test_a_kill_after_the_switch_leaves_the_new_version(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "g"
    copy_features(source, root, IDS[:40])
    build(root, IDS[:40], "flat")
    killed(root, "after-switch", "remove", *IDS[:5])
    index = SlideIndex.open(root)  # complete: every file of version 2 verifies
    assert index.manifest["version"] == 2 and index.catalog.slide_ids == IDS[5:40]
    assert (root / "catalog.000001.json").exists()  # the killed writer did not clean up
    assert all((root / "features.zarr" / "slides" / s).exists() for s in IDS[:5])
    assert index.manifest["retired_features"] == IDS[:5]  # still to delete
    copy_features(source, root, IDS[40:42])
    add_extracted(root, NO_COMPACTION)  # the next writer deletes what it left first
    assert not (root / "catalog.000001.json").exists()
    assert not any((root / "features.zarr" / "slides" / s).exists() for s in IDS[:5])
    assert SlideIndex.open(root).catalog.slide_ids == IDS[5:42]  # the removed slides did not come back


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from histo.lock import writer_lock
with writer_lock(sys.argv[1], "histo index --remove"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_in_one_line(source: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from histo.cli import main

    root = tmp_path / "g"
    copy_features(source, root, IDS[:20])
    build(root, IDS[:20])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO)), str(root)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(
            LockedError,
            match=rf"PID {holder.pid} on .* \(histo index --remove, since .*\) is writing here",
        ):
            remove_slides(root, IDS[:2])
        result = CliRunner().invoke(main, ["index", "--out", str(root), "--remove", IDS[0]])
        assert (
            result.exit_code == 2
            and result.stderr.count("\n") == 1
            and f"PID {holder.pid} on " in result.stderr
        )
    finally:
        holder.kill()
        holder.wait()
    remove_slides(root, IDS[:2])  # a killed holder never blocks the next writer
    with writing(root, "outer"):  # one process may nest its own writes
        remove_slides(root, IDS[2:3])
    assert SlideIndex.open(root).catalog.slide_ids == IDS[3:20]


def test_the_drift_check_says_when_to_retrain(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "ivf"
    copy_features(source, root, IDS[:60])
    build(root, IDS[:60], "ivf")
    index = SlideIndex.open(root)
    drift = index.drift()
    held = index.manifest["training"]["held_out_slides"]
    assert held and drift.held_out_slides == len(held) and drift.growth == 1.0
    params = index.float_index.params
    assert drift.recall["float"]["at_training"] == params["calibrated_recall_at_10"]
    assert drift.recall["float"]["now"] == pytest.approx(params["calibrated_recall_at_10"], abs=0.02)
    assert drift.imbalance["float"]["now"] == drift.imbalance["float"]["at_training"]
    assert not drift.retrain and drift.lines()[-1] == "drift: no retrain needed"
    # an archive that grows with another kind of tissue: its rows crowd into a few lists
    write_features(root, [f"S{i:03d}" for i in range(120, 360, 3)], seed=5, shift=6.0)  # one label
    add_extracted(root, NO_COMPACTION)
    shifted = SlideIndex.open(root).drift()
    assert (
        shifted.growth > 2
        and shifted.imbalance["float"]["now"] > 1.5 * shifted.imbalance["float"]["at_training"]
    )
    assert shifted.retrain and any("list imbalance grew" in r for r in shifted.reasons)
    assert "retrain advised" in shifted.lines()[-1]
    update = retrain(root)
    m = read_manifest(root)
    assert update.op == "retrain" and m["training"]["version"] == m["version"] == 3
    assert m["training"]["tiles"] == m["counts"]["tiles"] and m["growth"]["added_slides"] == 0
    again = SlideIndex.open(root).drift()
    assert not again.retrain and again.growth == 1.0


def test_retrain_of_a_flat_index_is_a_fresh_build(source: Path, tmp_path: Path) -> None:
    root = grown(source, tmp_path / "g", IDS[:30], [IDS[30:50]])
    remove_slides(root, IDS[:4], NO_COMPACTION)
    retrain(root)
    reference_dir = tmp_path / "fresh"
    fresh(source, reference_dir, IDS[4:50])
    mine, theirs = read_manifest(root), read_manifest(reference_dir)
    for role in ("coords", "barcodes", "float"):
        assert (root / mine["parts"][role][0]["file"]).read_bytes() == (
            reference_dir / theirs["parts"][role][0]["file"]
        ).read_bytes()
    assert (root / mine["catalog"]).read_bytes() == (reference_dir / theirs["catalog"]).read_bytes()
    assert [h["op"] for h in mine["history"]] == ["build", "add", "remove", "retrain"]


def test_open_retries_when_an_update_switches_versions(source: Path, tmp_path: Path, monkeypatch) -> None:
    """A reader that read the manifest of version 1 while an update deleted its files reads version 2."""
    import search.slide_index as slide_index

    root = tmp_path / "g"
    copy_features(source, root, IDS[:20])
    build(root, IDS[:20])
    stale = read_manifest(root)
    copy_features(source, root, IDS[20:25])
    add_extracted(root, IndexConfig.section("update", {"max_parts": 1}))  # merged: v1's parts deleted
    reads = []

    def first_the_stale_one(path, verify, verified=None):
        reads.append(verify)
        return stale if len(reads) == 1 else read_manifest(path, verify, verified)

    monkeypatch.setattr(slide_index, "read_manifest", first_the_stale_one)
    monkeypatch.setattr(slide_index, "_current_version", lambda path: [1, 3][min(1, len(reads))])
    index = SlideIndex.open(root)
    assert len(reads) == 2 and index.catalog.slide_ids == IDS[:25]


def test_an_existing_index_keeps_its_type(source: Path, tmp_path: Path) -> None:
    from search.slide_index import check_request

    root = tmp_path / "ivf"
    copy_features(source, root, IDS[:20])
    build(root, IDS[:20], "ivf")
    m = read_manifest(root)
    check_request(root, m, IndexConfig.coerce())  # the defaults ask for nothing: the index's own type
    check_request(root, m, IndexConfig.coerce({"type": "ivf"}))
    with pytest.raises(
        HistoError,
        match=r"an existing index with type='ivf'; adding slides keeps it, so type='hnsw' needs a new --out",
    ):
        check_request(root, m, IndexConfig.coerce({"type": "hnsw"}))
    with pytest.raises(HistoError, match=r"params.nlist=None; .* params.nlist=8 needs a new --out"):
        check_request(root, m, IndexConfig.coerce({"params": {"nlist": 8}}))


def test_history_and_catalog_records(source: Path, tmp_path: Path) -> None:
    root = grown(source, tmp_path / "g", IDS[:10], [IDS[10:12]])
    history = read_manifest(root)["history"]
    assert [h["op"] for h in history] == ["build", "add"] and [h["version"] for h in history] == [1, 2]
    assert history[1]["slide_ids"] == IDS[10:12] and all(
        time.strptime(h["at"][:19], "%Y-%m-%dT%H:%M:%S") for h in history
    )
    slides = json.loads((root / read_manifest(root)["catalog"]).read_text())["slides"]
    assert [s["project"] for s in slides[:6]] == ["CPTAC", "TCGA", "TCGA", "TCGA", "TCGA", "CPTAC"]


def test_a_removed_slide_can_come_back(source: Path, tmp_path: Path) -> None:
    """Its old features are deleted once; features extracted again later are indexed, not deleted."""
    root = grown(source, tmp_path / "g", IDS[:20], [])
    remove_slides(root, IDS[3:5], NO_COMPACTION)
    assert read_manifest(root)["retired_features"] == []  # deleted, and recorded as deleted
    assert not any((root / "features.zarr" / "slides" / s).exists() for s in IDS[3:5])
    copy_features(source, root, IDS[3:5])  # extracted again (from a rescan, say)
    assert add_extracted(root, NO_COMPACTION).slide_ids == tuple(IDS[3:5])
    assert read_manifest(root)["retired_features"] == []
    same_index(SlideIndex.open(root), fresh(source, tmp_path / "fresh", IDS[:20]))


def test_features_extracted_again_replace_a_slides_rows_and_new_labels_reach_the_catalog(
    source: Path, tmp_path: Path
) -> None:
    """A re-run's changes to indexed slides (a slide tiled anew, a corrected labels CSV) become a version."""
    from search import features as feats_io

    root = tmp_path / "g"
    copy_features(source, root, IDS[:20])
    build(root, IDS[:20])
    other = tmp_path / "other"  # the features slide IDS[3] gets once tiled anew: another slide's tiles
    write_features(other, [IDS[3]], seed=11, shift=3.0)
    shutil.rmtree(root / feats_io.FEATURES_DIR / feats_io.SLIDES / IDS[3])
    copy_features(other, root, [IDS[3]])
    feats_io.update_record(root / feats_io.FEATURES_DIR, IDS[5], {"label": "z", "site": "Q"})
    update = add_extracted(root, NO_COMPACTION, extracted=[IDS[3]], relabelled=[IDS[5]])
    assert update.op == "add" and update.slide_ids == (IDS[3],) and update.relabelled == (IDS[5],)
    index = SlideIndex.open(root)  # full verify: the manifest covers the rewritten features
    reference = tmp_path / "ref"
    copy_features(source, reference, [s for s in IDS[:20] if s != IDS[3]])
    copy_features(other, reference, [IDS[3]])
    feats_io.update_record(reference / feats_io.FEATURES_DIR, IDS[5], {"label": "z", "site": "Q"})
    build(reference, IDS[:20])
    same_index(index, SlideIndex.open(reference))  # the old rows of IDS[3] are gone
    position = index.catalog.position[IDS[5]]
    assert (index.catalog.labels[position], index.catalog.sites[position]) == ("z", "Q")
    feats_io.update_record(root / feats_io.FEATURES_DIR, IDS[6], {"patient": "P999"})
    relabel = add_extracted(root, NO_COMPACTION, relabelled=[IDS[6]])
    assert relabel.op == "relabel" and relabel.relabelled == (IDS[6],) and relabel.tiles == 0
    reopened = SlideIndex.open(root)
    assert reopened.catalog.patients[reopened.catalog.position[IDS[6]]] == "P999"
    assert add_extracted(root, NO_COMPACTION, relabelled=[IDS[6]]) is None  # nothing changed since


def test_new_parts_follow_the_umask(source: Path, tmp_path: Path) -> None:
    """Colleagues can open a grown index: its new files get 0666 less the umask, like any new file."""
    import os

    root = tmp_path / "g"
    copy_features(source, root, IDS[:10])
    build(root, IDS[:10])
    copy_features(source, root, IDS[10:12])
    old = os.umask(0o002)
    try:
        update = add_extracted(root, NO_COMPACTION)
    finally:
        os.umask(old)
    manifest = read_manifest(root)
    new = [f for f in manifest["files"] if f".{update.version:06d}." in f]
    assert len(new) == 4  # catalog, coords, barcodes, float
    assert all((root / f).stat().st_mode & 0o777 == 0o664 for f in [*new, "manifest.json"])
