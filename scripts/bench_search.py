"""Benchmark of slide search (issue 5 "Performance"): index build/storage, two-stage vs exhaustive slide
search, IVF recall, exact search vs a NumPy brute force. Prints a table and writes JSON.

Synthetic but structured features: C class centres; each slide = class centre + slide offset, with T
tissue clusters (slide centre + offset) whose tiles add noise. Query slides are new slides drawn around
indexed slides (a "sibling" slide of the same patient), so the nearest slides are well defined.

    .venv/bin/python scripts/bench_search.py --slides 2000 --queries 50 --out bench_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--threads" in sys.argv:  # BLAS/OpenMP thread counts must be set before numpy/faiss load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]
import tempfile
import time
from pathlib import Path

import numpy as np

from search.barcodes import BarcodeIndex, build_binary_index, minmax_barcode
from search.config import IndexConfig
from search.distance import slide_distance, slide_distances
from search.engine import Catalog, SearchEngine
from search.index import build_float_index, exact_knn, recall_at_k
from search.kinds import barcode_kind


def slide_features(rng, centre, n_tiles, dim, clusters=4, spread=0.6, noise=0.5) -> np.ndarray:
    """One slide: `clusters` tissue types around the slide centre, tiles around them."""
    tissue = centre + spread * rng.standard_normal((clusters, dim), dtype=np.float32)
    return tissue[rng.integers(0, clusters, n_tiles)] + noise * rng.standard_normal(
        (n_tiles, dim), dtype=np.float32
    )


def make_data(n_slides, n_tiles, dim, n_classes, n_queries, seed):
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((n_classes, dim), dtype=np.float32)
    slide_class = rng.integers(0, n_classes, n_slides)
    centres = classes[slide_class] + 0.8 * rng.standard_normal((n_slides, dim), dtype=np.float32)
    feats = np.empty((n_slides * n_tiles, dim), np.float32)
    for s in range(n_slides):
        feats[s * n_tiles : (s + 1) * n_tiles] = slide_features(rng, centres[s], n_tiles, dim)
    parents = rng.choice(n_slides, n_queries, replace=False)
    queries = [slide_features(rng, centres[p] + 0.3 * rng.standard_normal(dim, dtype=np.float32), n_tiles, dim)
               for p in parents]  # fmt: skip
    return feats, queries, slide_class


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--loop-queries", type=int, default=5, help="queries timed with the per-slide loop")
    ap.add_argument(
        "--tile-k", type=int, default=None, help="first-stage neighbours per tile (None: default)"
    )
    ap.add_argument(
        "--stage1-tiles",
        default="32",
        help="query tiles that run the first-stage kNN (comma list: one run each)",
    )
    ap.add_argument("--types", default="flat,ivf,ivfpq,hnsw", help="float index types ('' for none)")
    ap.add_argument("--no-slide-search", action="store_true", help="skip barcodes and slide search")
    ap.add_argument(
        "--train-per-list",
        type=int,
        default=None,
        help="IVF k-means training points per list (None: default)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=None, help="BLAS/OpenMP threads (default: library default)"
    )
    ap.add_argument("--out", default="bench_search.json")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    report: dict = {
        "config": vars(args),
        "faiss_threads": faiss.omp_get_max_threads(),
        "cpu_count": os.cpu_count(),
    }
    t, (feats, queries, _) = timed(lambda: make_data(args.slides, args.tiles, args.dim, args.classes,
                                                     args.queries, args.seed))  # fmt: skip
    n = len(feats)
    print(
        f"data: {args.slides} slides x {args.tiles} tiles x {args.dim}-d = {n:,} vectors ({t:.1f} s)",
        flush=True,
    )
    offsets = np.arange(args.slides + 1) * args.tiles
    cat = Catalog([f"s{i:06d}" for i in range(args.slides)], [None] * args.slides, [None] * args.slides,
                  [None] * args.slides, offsets, np.zeros((n, 2), np.int64))  # fmt: skip

    # ---- barcodes: build, storage, exhaustive vs two-stage (flat or IVF first stage) ------------
    report["barcodes"], report["slide_search"] = {}, {}
    if not args.no_slide_search:
        slide_search(args, report, feats, queries, cat, offsets)

    # ---- float indexes: build time, bytes, recall@10 of fresh query tiles ----------------------
    qtiles = np.concatenate(queries)[:: max(1, len(queries) * args.tiles // 1000)][:1000]
    base_norms = np.einsum("ij,ij->i", feats, feats)
    _, truth = exact_knn(qtiles, feats, 10, base_norms)
    report["float_indexes"] = {}
    for kind in filter(None, args.types.split(",")):
        t_build, idx = timed(
            lambda kind=kind: build_float_index(feats, kind, index_params(args), groups=cat.row_slide)
        )
        with tempfile.TemporaryDirectory() as tmp:
            idx.save(f"{tmp}/f.faiss")
            f_bytes = os.path.getsize(f"{tmp}/f.faiss")
        t_q, _ = timed(lambda idx=idx: idx.search(qtiles[:100], 10), repeat=3)
        row = {"build_s": t_build, "bytes_per_slide": f_bytes / args.slides, "recall_at_10": recall_at_k(
            idx.search(qtiles, 10)[1], truth), "search_100_tiles_ms": 1e3 * t_q,
            "params": {k: v for k, v in idx.params.items() if k in ("nlist", "nprobe", "pq_m", "pq_nbits",
                       "ef_search", "calibrated_recall_at_10")}}  # fmt: skip
        if kind == "flat":  # exact search vs NumPy brute force (norms precomputed for both)

            def numpy_bf(q=qtiles[:100]):
                d2 = base_norms[None, :] - 2.0 * (q @ feats.T)
                return np.argpartition(d2, 10, axis=1)[:, :10]

            row["numpy_bruteforce_100_tiles_ms"] = 1e3 * timed(numpy_bf, repeat=3)[0]
            raw = faiss.IndexFlatL2(args.dim)
            raw.add(feats)
            row["faiss_IndexFlatL2_100_tiles_ms"] = (
                1e3 * timed(lambda raw=raw: raw.search(qtiles[:100], 10), repeat=3)[0]
            )
            del raw
        report["float_indexes"][kind] = row
        print(f"{kind}: {row}", flush=True)
        del idx
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def index_params(args: argparse.Namespace) -> dict:
    """Index parameters the benchmark sets (the rest are the defaults of configs/index.yaml)."""
    return {} if args.train_per_list is None else {"train_points_per_list": args.train_per_list}


def slide_search(args, report, feats, queries, cat, offsets) -> None:
    """Barcode build/storage and exhaustive vs two-stage slide search (flat or IVF first stage)."""
    import faiss

    t_codes, codes = timed(lambda: minmax_barcode(feats))
    engines = {}
    for kind in ("flat", "ivf"):
        t_add, (binary, params) = timed(
            lambda kind=kind: build_binary_index(codes, kind, index_params(args), groups=cat.row_slide)
        )
        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index_binary(binary, f"{tmp}/b.faissb")
            b_bytes = os.path.getsize(f"{tmp}/b.faissb")
        report["barcodes"][kind] = {"build_s": t_codes + t_add, "bytes_per_slide": b_bytes / args.slides,
                                    "params": params}  # fmt: skip
        for m in (int(v) for v in args.stage1_tiles.split(",")):
            settings = IndexConfig.section("search", {"tile_k": args.tile_k, "stage1_tiles": m})
            searched = BarcodeIndex(barcode_kind(kind), binary, codes)  # the engine's kNN takes a row filter
            engines[f"{kind}/{m}"] = SearchEngine(cat, knn={"barcode": searched.search}, tiles={"barcode": lambda: codes},
                                                  settings=settings)  # fmt: skip
    base_q = [minmax_barcode(q) for q in queries]
    loop_t = []  # the Yottixel way: one slide-distance call per database slide (a few queries only)
    for q in base_q[: args.loop_queries]:
        loop_t.append(timed(lambda q=q: [slide_distance(q, codes[offsets[s] : offsets[s + 1]])
                                         for s in range(args.slides)])[0])  # fmt: skip
    report["per_slide_loop_ms_median"] = 1e3 * float(np.median(loop_t))
    # Exhaustive and two-stage are timed back to back on each query, so machine noise hits both alike.
    exhaustive_t, runs = [], {kind: {"t": [], "same": 0, "same_set": 0, "cands": []} for kind in engines}
    for q in base_q:
        t1, d = timed(lambda q=q: slide_distances(q, codes, offsets))
        exhaustive_t.append(t1)
        top = list(np.lexsort((np.arange(args.slides), d))[:5])
        for kind, engine in engines.items():
            t2, (ranked, info) = timed(lambda q=q, engine=engine: engine.rank(q, "barcode", k=5))
            two, run = [s for s, _ in ranked], runs[kind]
            run["t"].append(t2)
            run["same"] += top == two
            run["same_set"] += set(top) == set(two)
            run["cands"].append(info["candidates"])
            run["tile_k"] = info["tile_k"]
    for kind, run in runs.items():
        row = report["slide_search"][f"barcode/{kind}"] = {
            "exhaustive_ms_median": 1e3 * float(np.median(exhaustive_t)),
            "two_stage_ms_median": 1e3 * float(np.median(run["t"])),
            "speedup": float(np.median(exhaustive_t) / np.median(run["t"])),
            "speedup_vs_per_slide_loop": float(np.median(loop_t) / np.median(run["t"])),
            "identical_top5_fraction": run["same"] / len(base_q),
            "same_top5_set_fraction": run["same_set"] / len(base_q),
            "candidates_median": float(np.median(run["cands"])),
            "tile_k": run["tile_k"],
            "stage1_tiles": engines[kind].settings.stage1_tiles,
        }
        print(f"barcode/{kind}: {row}", flush=True)


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"\nscale: {c['slides']} slides x {c['tiles']} tiles x {c['dim']}-d, {c['queries']} query slides")
    for kind, b in r["barcodes"].items():
        print(f"barcodes ({kind}): {b['bytes_per_slide'] / 1024:.1f} KB per slide (target <= 16 KB), "
              f"build {b['build_s']:.1f} s, {b['params']}")  # fmt: skip
    if "per_slide_loop_ms_median" in r:
        print(f"exhaustive slide distance as a per-slide loop (Yottixel way): "
              f"{r['per_slide_loop_ms_median']:.1f} ms per query")  # fmt: skip
    print(f"{'index/stage-1 tiles':<20} {'exhaustive ms':>14} {'two-stage ms':>13} {'speed-up':>9} {'top-5 identical':>16}"
          f" {'same set':>9} {'candidates':>11} {'vs loop':>8}")  # fmt: skip
    for mode, s in r["slide_search"].items():
        print(f"{mode:<20} {s['exhaustive_ms_median']:>14.1f} {s['two_stage_ms_median']:>13.1f} {s['speedup']:>8.1f}x "
              f"{s['identical_top5_fraction']:>16.2%} {s['same_top5_set_fraction']:>9.2%} "
              f"{s['candidates_median']:>11.0f} {s['speedup_vs_per_slide_loop']:>7.1f}x")  # fmt: skip
    print(f"{'index':<7} {'build s':>8} {'KB/slide':>9} {'recall@10':>10} {'100-tile search ms':>19}  params")
    for kind, s in r["float_indexes"].items():
        print(f"{kind:<7} {s['build_s']:>8.1f} {s['bytes_per_slide'] / 1024:>9.1f} {s['recall_at_10']:>10.3f} "
              f"{s['search_100_tiles_ms']:>19.1f}  {s['params']}")  # fmt: skip
    f = r["float_indexes"].get("flat")
    if f:
        print(f"exact flat {f['search_100_tiles_ms']:.1f} ms vs NumPy brute force {f['numpy_bruteforce_100_tiles_ms']:.1f} ms"
              f" vs raw FAISS IndexFlatL2 {f['faiss_IndexFlatL2_100_tiles_ms']:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
