"""Benchmark of an index that grows (issue 19 "Performance"): adding slides to a built index against a fresh
build, results after the add, an IVF grown by 50 % without retraining, filtered against unfiltered search,
IVF-HNSW against IVF-Flat, and barcode search at 1M-10M tiles. Prints tables and writes JSON.

Features are synthetic (scripts/bench_search.py's generator: class centres, slides, tissue clusters) and
written as an index's stored features (features.zarr), so every index here is built and grown by the same
code as `histo index` (search/growth.py), feature extraction aside. Query slides are new "sibling" slides
of indexed ones. Slides carry a site (10), a label (their class) and a project, for the filters.

    nice -n 5 .venv/bin/python scripts/bench_grow.py --slides 10000 --add 100 --threads 1 \
        --work /tmp/bench_grow --out bench_grow.json

Each measurement is a piece saved in WORK/pieces/ as soon as it is measured (the stored features and the
built indexes stay in WORK): a run killed part-way is resumed by the same command, which measures only the
missing pieces (new query slides are drawn then; the exact neighbours are saved with their query tiles).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys

if "--threads" in sys.argv:  # BLAS/OpenMP thread counts must be set before numpy/faiss load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_search import slide_features, timed

from search import features as feats_io
from search.barcodes import BarcodeIndex, minmax_barcode
from search.config import IndexConfig
from search.engine import Catalog, SearchEngine
from search.growth import add_extracted, build_version
from search.index import build_float_index, exact_knn, recall_at_k
from search.kinds import barcode_kind
from search.slide_index import SlideIndex

MODEL = {"hash": "bench", "feature_definition": "synthetic", "feature_dim": None}
SITES = 10


class Cohort:
    """The synthetic archive: class centres, slide centres, and a generator of slides and query slides."""

    def __init__(self, n_slides: int, dim: int, n_classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.rng = dim, rng
        self.classes = rng.standard_normal((n_classes, dim), dtype=np.float32)
        self.slide_class = rng.integers(0, n_classes, n_slides)
        self.centres = self.classes[self.slide_class] + 0.8 * rng.standard_normal(
            (n_slides, dim), dtype=np.float32
        )

    def record(self, s: int, n_tiles: int) -> dict:
        return {"slide_id": f"s{s:06d}", "label": f"c{self.slide_class[s]:02d}", "patient": f"p{s:06d}",
                "site": f"site{s % SITES}", "project": "TCGA" if s % 4 else "CPTAC", "n_tiles": n_tiles}  # fmt: skip

    def write(self, root: Path, slides: range, n_tiles: int) -> None:
        """Store the features of `slides` in the index dir `root` (what extraction leaves)."""
        features = feats_io.open_features(root, {**MODEL, "feature_dim": self.dim}, {"tile": "synthetic"})
        for s in slides:
            f = slide_features(self.rng, self.centres[s], n_tiles, self.dim)
            feats_io.write_slide(features, self.record(s, n_tiles), f, np.zeros((n_tiles, 2), np.int64))

    def queries(self, n: int, n_tiles: int, among: int | np.ndarray) -> list[np.ndarray]:
        """`n` new slides, each a sibling of a random slide of `among` (a count, or slide numbers)."""
        parents = self.rng.choice(among, n, replace=False)
        return [slide_features(self.rng, self.centres[p] + 0.3 * self.rng.standard_normal(self.dim, dtype=np.float32),
                               n_tiles, self.dim) for p in parents]  # fmt: skip


def content(kind: str, params: dict) -> dict:
    cfg = IndexConfig.coerce({"type": kind, "params": params})
    return {"index": {"type": kind, "params_requested": cfg.params.model_dump(mode="json")},
            "search": cfg.search.model_dump(mode="json"), "failed_slides": [], "built_with": {}}  # fmt: skip


def share_features(source: Path, index_dir: Path) -> None:
    """An index dir over the shared stored features (a link: every index here reads the same features)."""
    index_dir.mkdir(parents=True)
    (index_dir / feats_io.FEATURES_DIR).symlink_to(source / feats_io.FEATURES_DIR)


def dir_bytes(index_dir: Path, manifest: dict) -> int:
    """Bytes of the index's own files (parts, catalog, trained indexes), features aside."""
    return sum(v["bytes"] for k, v in manifest["files"].items() if not k.startswith(feats_io.FEATURES_DIR))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=10000)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--add", type=int, default=100, help="slides added to the built index")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--filter-queries", type=int, default=100,
                    help="query slides per filter, side and mode (100: a share of identical top-5 to 1 %%)")  # fmt: skip
    ap.add_argument("--growth-kinds", default="flat,ivf", help="kinds built and grown by --add slides")
    ap.add_argument("--no-fifty", action="store_true", help="skip the IVF grown by 50 %%")
    ap.add_argument("--no-hnsw-table", action="store_true", help="skip the IVF-HNSW vs IVF-Flat table")
    ap.add_argument("--barcode-scales", default="1000000,3000000,10000000", help="tiles ('' for none)")
    ap.add_argument("--train-per-list", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--work",
        default=None,
        help="scratch folder, kept: a rerun with the same folder reuses its stored features, indexes and "
        "finished pieces (WORK/pieces/*.json) and measures only the missing ones (default: a temporary "
        "folder, deleted)",
    )
    ap.add_argument("--out", default="bench_grow.json")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    params = {} if args.train_per_list is None else {"train_points_per_list": args.train_per_list}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_grow_"))
    b = Bench(work, Path(args.out), {"config": vars(args), "faiss_threads": faiss.omp_get_max_threads(),
                                     "cpu_count": os.cpu_count()})  # fmt: skip
    cohort = Cohort(args.slides + args.add, args.dim, args.classes, args.seed)
    shared = work / "features"
    ids = [f"s{s:06d}" for s in range(args.slides)]
    row = b.piece(
        "features", lambda: {"s": timed(lambda: cohort.write(shared, range(args.slides), args.tiles))[0]}
    )
    print(
        f"stored features: {args.slides} slides x {args.tiles} tiles x {args.dim}-d ({row['s']:.0f} s)",
        flush=True,
    )
    queries = cohort.queries(args.queries, args.tiles, args.slides)
    qtiles = np.concatenate(queries)[:: max(1, len(queries) * args.tiles // 1000)][:1000]
    try:
        kinds = [k for k in args.growth_kinds.split(",") if k]
        for kind in kinds:
            b.piece(
                f"growth/{kind}/build", lambda kind=kind: build(work, kind, params, ids), f"growth/{kind}"
            )
        if not args.no_fifty and "ivf" in kinds:
            b.piece("ivf_grown_50", lambda: fifty(args, cohort, work, shared, ids, qtiles, params))
        b.piece(
            "added_features",
            lambda: cohort.write(shared, range(args.slides, args.slides + args.add), args.tiles) or {},
        )
        for kind in kinds:
            b.piece(
                f"growth/{kind}/add",
                lambda kind=kind: add(work, kind, b.report["growth"][kind]["build_s"]),
                f"growth/{kind}",
            )
        all_ids = [f"s{s:06d}" for s in range(args.slides + args.add)]
        if "flat" in kinds:
            b.piece("fresh_flat", lambda: fresh_flat(work, params, all_ids))
            b.piece("truth", lambda: truth(work, qtiles))
            qtiles = np.load(work / "qtiles.npy")
        if "ivf" in kinds:
            build_s = b.report["growth"]["ivf"]["structures_s"]["float"]
            row = b.piece("ivf_after_add", lambda: ivf_after_add(work, qtiles, build_s))
            b.report["growth"]["ivf"]["recall_at_10_after_add"] = row["recall_at_10_after_add"]
            b.report["ivf_flat_1m"] = row["ivf_flat_1m"]
        if not args.no_hnsw_table and "flat" in kinds:
            b.piece("ivf_hnsw_1m", lambda: hnsw_row(work, qtiles, params))
        scales = [int(v) for v in args.barcode_scales.split(",") if v]
        for n in (n for n in scales if n <= 3_000_000):
            barcodes_piece(b, n, args.tiles, cohort)
        if "flat" in kinds:
            b.piece("growth/flat/equal", lambda: flat_equal(work, queries), "growth/flat")
        for kind, name in (("flat", "flat_fresh"), ("ivf", "ivf")):
            if kind in kinds:
                filtered(b, work / name, kind, cohort, args.filter_queries, args.tiles)
        for n in (n for n in scales if n > 3_000_000):  # last: the longest piece
            barcodes_piece(b, n, args.tiles, cohort)
    finally:
        b.write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(b.report)


class Bench:
    """The report, assembled from pieces: each is measured once, saved as WORK/pieces/<name>.json and
    merged into the report at its path (`a/b/c` -> report[a][b][c]), so a killed run loses only the piece
    it was measuring and a rerun with the same --work measures only the missing ones."""

    def __init__(self, work: Path, out: Path, report: dict) -> None:
        self.folder, self.out, self.report = work / "pieces", out, report
        self.folder.mkdir(parents=True, exist_ok=True)

    def piece(self, name: str, measure, at: str | None = None) -> dict:
        """The piece `name`, measured unless saved, merged into the report at `at` (default: `name`)."""
        file = self.folder / (name.replace("/", "__").replace(" ", "_").replace("%", "pct") + ".json")
        if file.exists():
            row = json.loads(file.read_text())
        else:
            row = measure()
            file.write_text(json.dumps(row, indent=2, default=str))
        *path, last = (at or name).split("/")
        node = self.report
        for key in path:
            node = node.setdefault(key, {})
        if isinstance(node.get(last), dict):
            node[last] |= row
        else:
            node[last] = row
        self.write()
        return row

    def write(self) -> None:
        self.out.write_text(json.dumps(self.report, indent=2, default=str))


def build(work: Path, kind: str, params: dict, ids: list[str]) -> dict:
    """A fresh build of `kind` on the stored features of `ids` (kept in WORK/<kind> for the add)."""
    if (work / kind).exists():
        shutil.rmtree(work / kind)  # a build killed before its piece was saved
    share_features(work / "features", work / kind)
    t_build, m = timed(lambda: build_version(work / kind, content(kind, params), ids, None))
    print(f"{kind}: fresh build of {len(ids)} slides in {t_build:.1f} s", flush=True)
    return {
        "build_s": t_build,
        "structures_s": m["training"]["seconds"],
        "index_bytes": dir_bytes(work / kind, m),
    }


def add(work: Path, kind: str, build_s: float) -> dict:
    """The add of the newly stored slides to the built index, against its fresh build's time."""
    t_add, update = timed(lambda: add_extracted(work / kind))
    row = {"add_s": t_add, "added_slides": len(update.slide_ids), "add_vs_build": t_add / build_s}
    print(
        f"{kind}: +{row['added_slides']} slides in {t_add:.2f} s = {row['add_vs_build']:.2%} of the build",
        flush=True,
    )
    return row


def fresh_flat(work: Path, params: dict, all_ids: list[str]) -> dict:
    """A fresh flat build on every slide: the grown flat index's reference."""
    if (work / "flat_fresh").exists():
        shutil.rmtree(work / "flat_fresh")
    share_features(work / "features", work / "flat_fresh")
    build_version(work / "flat_fresh", content("flat", params), all_ids, None)
    return {}


def truth(work: Path, qtiles: np.ndarray) -> dict:
    """The exact 10 nearest rows of the query tiles (saved beside them: a rerun draws other queries)."""
    fresh = SlideIndex.open(work / "flat_fresh", {"run": {"verify": "none"}})
    np.save(work / "qtiles.npy", qtiles)
    np.save(work / "truth.npy", exact_knn(qtiles, fresh._features(), 10)[1])
    return {}


def flat_equal(work: Path, queries: list[np.ndarray]) -> dict:
    """Whether the grown flat index ranks like the fresh build and holds the same arrays."""
    results = []
    for name in ("flat", "flat_fresh"):
        index = SlideIndex.open(work / name, {"run": {"verify": "none"}})
        arrays = {k: hash_of(v) for k, v in (("codes", index.codes), ("features", index._features()))}
        results.append((rankings(index, queries), arrays))
        del index
        gc.collect()
    (grown, grown_arrays), (fresh, fresh_arrays) = results
    row = {
        "results_equal_fresh_build": grown == fresh,
        "arrays_equal_fresh_build": grown_arrays == fresh_arrays,
    }
    print(f"flat grown vs fresh: {row}", flush=True)
    return row


def ivf_after_add(work: Path, qtiles: np.ndarray, build_s: float) -> dict:
    """Recall@10 of the grown IVF index, and its IVF-Flat row of the IVF-HNSW table."""
    index = SlideIndex.open(work / "ivf", {"run": {"verify": "none"}})
    truth = np.load(work / "truth.npy")
    row = {"recall_at_10_after_add": recall_at_k(index.float_index.search(qtiles, 10)[1], truth),
           "ivf_flat_1m": float_row(index.float_index, qtiles, truth, build_s)}  # fmt: skip
    print(f"ivf after the add: {row}", flush=True)
    return row


def fifty(args, cohort, work, shared, ids, qtiles, params) -> dict:
    """An IVF index built on two thirds of the slides, grown by 50 % without retraining."""
    if (work / "ivf50").exists():
        shutil.rmtree(work / "ivf50")
    share_features(shared, work / "ivf50")
    first = ids[: len(ids) * 2 // 3]
    t_build, _ = timed(lambda: build_version(work / "ivf50", content("ivf", params), first, None))
    t_add, update = timed(lambda: add_extracted(work / "ivf50"))
    index = SlideIndex.open(work / "ivf50", {"run": {"verify": "none"}})
    truth = exact_knn(qtiles, index._features(), 10)[1]
    drift = index.drift()
    row = {
        "built_on_slides": len(first), "build_s": t_build, "added_slides": len(update.slide_ids), "add_s": t_add,
        "recall_at_10": recall_at_k(index.float_index.search(qtiles, 10)[1], truth),
        "calibrated_recall_at_10": index.float_index.params["calibrated_recall_at_10"],
        "drift": drift.to_dict(),
    }  # fmt: skip
    print(
        f"ivf grown by 50 %: {row['recall_at_10']:.3f} recall@10; {drift.lines()}",
        flush=True,
    )
    del index
    shutil.rmtree(work / "ivf50")
    return row


def hash_of(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def rankings(index: SlideIndex, queries: list[np.ndarray]) -> list:
    out = []
    for mode in ("barcode", "float"):
        for q in queries:
            codes = minmax_barcode(q) if mode == "barcode" else q
            out.append([(index.catalog.slide_ids[s], d) for s, d in index.engine.rank(codes, mode, 5)[0]])
    return out


FILTERS = {"site (10 %)": {"site": frozenset({"site3"})},
           "two labels (10 %)": {"label": frozenset({"c01", "c02"})},
           "project (25 %)": {"project": frozenset({"CPTAC"})}}  # fmt: skip


def filtered(b: Bench, index_dir: Path, kind: str, cohort: Cohort, n_queries: int, n_tiles: int) -> None:
    """Per filter and mode, on queries whose sibling is inside the filter (a vertical search) and outside
    it: the two-stage latency unfiltered and filtered (medians), and how often the filtered two-stage top-5
    is the exhaustive top-5 over the same subset. One piece per row; the index opens once, if needed."""
    index = None
    for name, where in FILTERS.items():
        for side in ("inside", "outside"):
            for mode in ("barcode", "float"):

                def measure(name=name, where=where, side=side, mode=mode) -> dict:
                    nonlocal index
                    index = index or SlideIndex.open(index_dir, {"run": {"verify": "none"}})
                    allowed = index.catalog.allowed(None, where)
                    slides = np.arange(len(index.catalog))
                    parents = slides[allowed] if side == "inside" else slides[~allowed]
                    queries = cohort.queries(n_queries, n_tiles, parents)
                    qs = [minmax_barcode(q) if mode == "barcode" else q for q in queries]
                    return filtered_row(index, qs, mode, allowed)

                row = b.piece(f"filtered/{kind}/{mode}|{name}|{side}", measure)
                print(f"{kind} {mode}/{name}/{side}: {row}", flush=True)
    del index
    gc.collect()


def filtered_row(index: SlideIndex, qs: list[np.ndarray], mode: str, allowed: np.ndarray) -> dict:
    unfiltered, times, same = [], [], 0
    for q in qs:  # back to back on each query, so machine noise hits both alike
        unfiltered.append(timed(lambda q=q: index.engine.rank(q, mode, 5), repeat=2)[0])
        t, (ranked, _) = timed(lambda q=q: index.engine.rank(q, mode, 5, allowed), repeat=2)
        times.append(t)
        same += ranked == index.engine.rank(q, mode, 5, allowed, exhaustive=True)[0]
    return {"unfiltered_ms_median": 1e3 * float(np.median(unfiltered)),
            "filtered_ms_median": 1e3 * float(np.median(times)),
            "identical_top5_to_exhaustive_in_subset": same / len(qs), "allowed_slides": int(allowed.sum()),
            "queries": len(qs)}  # fmt: skip


def float_row(findex, qtiles, truth, build_s) -> dict:
    """Build time, bytes, 100-tile search time and recall@10 of a float index."""
    import faiss

    t_q, _ = timed(lambda: findex.search(qtiles[:100], 10), repeat=3)
    t_k, _ = timed(lambda: findex.search(qtiles[:32], 150), repeat=3)  # a first stage: 32 tiles, tile_k 150
    return {"build_s": build_s, "bytes": int(faiss.serialize_index(findex.index).nbytes),
            "search_100_tiles_k10_ms": 1e3 * t_q, "first_stage_32_tiles_k150_ms": 1e3 * t_k,
            "recall_at_10": recall_at_k(findex.search(qtiles, 10)[1], truth),
            "params": {k: findex.params.get(k) for k in ("nlist", "nprobe", "calibrated_recall_at_10")}}  # fmt: skip


def hnsw_row(work: Path, qtiles: np.ndarray, params: dict) -> dict:
    """IVF-HNSW (FAISS's guideline index for 1e6-1e7 vectors) built on the same 1M stored vectors."""
    flat = SlideIndex.open(work / "flat", {"run": {"verify": "none"}})
    vectors, groups = np.array(flat._features()), flat.catalog.row_slide
    del flat
    gc.collect()
    truth = np.load(work / "truth.npy")
    t_build, index = timed(lambda: build_float_index(vectors, "ivf_hnsw", params, groups))
    vectors = None  # the build holds its own copy
    row = float_row(index, qtiles, truth, t_build)
    print(f"ivf_hnsw: {row}", flush=True)
    return row


def barcodes_piece(b: Bench, n: int, n_tiles: int, cohort: Cohort) -> None:
    row = b.piece(f"barcodes_scale/{n}", lambda: barcodes_row(n, n_tiles, cohort))
    print(f"barcodes at {n:,} tiles: {row}", flush=True)
    gc.collect()


def barcodes_row(n: int, n_tiles: int, cohort: Cohort) -> dict:
    import faiss

    n_slides = n // n_tiles
    codes = np.empty((n, cohort.dim // 8), dtype=np.uint8)
    rng = np.random.default_rng(7)
    t_gen = time.perf_counter()
    for s in range(n_slides):  # slides around random slide centres of the cohort's classes
        centre = cohort.classes[s % len(cohort.classes)] + 0.8 * rng.standard_normal(
            cohort.dim, dtype=np.float32
        )
        codes[s * n_tiles : (s + 1) * n_tiles] = minmax_barcode(
            slide_features(rng, centre, n_tiles, cohort.dim)
        )
    t_gen = time.perf_counter() - t_gen
    index = faiss.IndexBinaryFlat(cohort.dim)
    t_add, _ = timed(lambda: index.add(codes))
    offsets = np.arange(n_slides + 1) * n_tiles
    cat = Catalog([f"s{i}" for i in range(n_slides)], [None] * n_slides, [None] * n_slides,
                  [f"site{i % SITES}" for i in range(n_slides)], offsets, np.zeros((1, 2), np.int64))  # fmt: skip
    searched = BarcodeIndex(barcode_kind("flat"), index, codes)
    engine = SearchEngine(cat, knn={"barcode": searched.search}, tiles={"barcode": lambda: codes},
                          settings=IndexConfig.section("search", {}))  # fmt: skip
    qs = [minmax_barcode(q) for q in cohort.queries(5, n_tiles, len(cohort.centres))]
    site = cat.allowed(None, {"site": frozenset({"site3"})})
    t_first = [timed(lambda q=q: searched.search(q[:32], 150))[0] for q in qs]
    t_two = [timed(lambda q=q: engine.rank(q, "barcode", 5))[0] for q in qs]
    t_site = [timed(lambda q=q: engine.rank(q, "barcode", 5, site))[0] for q in qs]
    return {"codes_bytes": int(codes.nbytes), "generate_s": t_gen, "add_s": t_add,
            "first_stage_32_tiles_k150_ms": 1e3 * float(np.median(t_first)),
            "two_stage_ms_median": 1e3 * float(np.median(t_two)),
            "two_stage_site_filter_ms_median": 1e3 * float(np.median(t_site))}  # fmt: skip


def print_tables(r: dict) -> None:
    c = r["config"]
    print(f"\nscale: {c['slides']} slides x {c['tiles']} tiles x {c['dim']}-d, +{c['add']} slides")
    print(f"{'index':<6} {'fresh build s':>14} {'add s':>7} {'add/build':>10}  results after the add")
    for kind, g in r.get("growth", {}).items():
        after = (f"equal to a fresh build: {g.get('results_equal_fresh_build')} (arrays {g.get('arrays_equal_fresh_build')})"
                 if kind == "flat" else f"recall@10 {g.get('recall_at_10_after_add', float('nan')):.3f}")  # fmt: skip
        print(
            f"{kind:<6} {g['build_s']:>14.1f} {g.get('add_s', float('nan')):>7.2f} {g.get('add_vs_build', float('nan')):>10.2%}  {after}"
        )
    if "ivf_grown_50" in r:
        g = r["ivf_grown_50"]
        print(f"IVF built on {g.get('built_on_slides')} slides, +{g.get('added_slides')} without retraining: recall@10 "
              f"{g['recall_at_10']:.3f} (calibrated {g.get('calibrated_recall_at_10')}); drift: {g.get('drift')}")  # fmt: skip
    print(
        f"{'index/mode/filter/queries':<42} {'unfiltered ms':>14} {'filtered ms':>12} {'top-5 = exhaustive':>19}"
    )
    for kind, rows in r.get("filtered", {}).items():
        for name, f in rows.items():
            print(f"{kind + '/' + name:<42} {f['unfiltered_ms_median']:>14.1f} {f['filtered_ms_median']:>12.1f} "
                  f"{f['identical_top5_to_exhaustive_in_subset']:>19.0%}")  # fmt: skip
    print(
        f"{'float index':<10} {'build s':>8} {'MB':>7} {'100 tiles k=10 ms':>18} {'32 tiles k=150 ms':>18} {'recall@10':>10}"
    )
    for name in ("ivf_flat_1m", "ivf_hnsw_1m"):
        if name in r:
            f = r[name]
            print(f"{name:<10} {f['build_s']:>8.1f} {f['bytes'] / 2**20:>7.0f} {f['search_100_tiles_k10_ms']:>18.1f} "
                  f"{f['first_stage_32_tiles_k150_ms']:>18.1f} {f['recall_at_10']:>10.3f}  {f['params']}")  # fmt: skip
    for n, b in r.get("barcodes_scale", {}).items():
        print(f"barcodes {int(n):>11,} tiles: {b['codes_bytes'] / 2**20:>6.0f} MB, add {b['add_s']:.1f} s, first stage "
              f"{b['first_stage_32_tiles_k150_ms']:.0f} ms, two-stage {b['two_stage_ms_median']:.0f} ms, with a site "
              f"filter {b['two_stage_site_filter_ms_median']:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
