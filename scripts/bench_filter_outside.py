"""Why a query outside a label filter costs more than an unfiltered search (issue 19), measured: per stage,
and what the two ways to make it cheaper would cost in exactness. Prints a table and writes JSON.

It reads the binary IVF index that scripts/bench_grow.py leaves in its work folder (WORK/ivf, 1M tiles with
the default sizes) and draws new query slides the way that benchmark does: siblings of indexed slides whose
label is inside the filter (the filter's own kind of query) or outside it. For each it times the two stages
of the unfiltered and the filtered search back to back, then:

- a smaller first-stage scan: the filtered search with the binary IVF's `nprobe` (the scan budget that the
  filtered scan matches in allowed codes) divided by 2, 4 and 8;
- fewer candidates: only the C slides the first stage hits most often get the exact slide distance.

Both are scored by how often the filtered top-5 is the exhaustive top-5 over the same subset (the issue asks
for 99 %).

    nice -n 5 .venv/bin/python scripts/bench_filter_outside.py --work /tmp/bench_grow --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--threads" in sys.argv:  # BLAS/OpenMP thread counts must be set before numpy/faiss load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = sys.argv[sys.argv.index("--threads") + 1]
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grow import FILTERS, Cohort

from search.barcodes import minmax_barcode
from search.distance import nearest_slides, slide_distances
from search.slide_index import SlideIndex

BUDGET_DIVISORS = (2, 4, 8)
CANDIDATE_CAPS = (50, 100, 200, 300)


def clocked(fn):
    """(seconds, result) of a call made once to warm up and once timed."""
    fn()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def stages(index: SlideIndex, q: np.ndarray, allowed: np.ndarray | None) -> tuple[float, float, int, float]:
    """Seconds of the first stage and of the exact second stage (top 5, pruned), the number of candidates,
    and the seconds of the second stage measuring every candidate on every query tile."""
    engine, cat = index.engine, index.catalog
    t1, (hit, _) = clocked(lambda: engine._first_stage(q, "barcode", allowed, 5, engine.settings))
    codes = engine.tiles["barcode"]()
    t2, _ = clocked(lambda: nearest_slides(q, codes, cat.offsets, hit, 5, cat.id_rank))
    t_all, _ = clocked(lambda: slide_distances(q, codes, cat.offsets, hit))
    return t1, t2, len(hit), t_all


def capped_top5(index: SlideIndex, q: np.ndarray, allowed: np.ndarray, cap: int) -> list[int]:
    """The top-5 when only the `cap` most-hit candidates (the first stage orders them so) get the exact
    slide distance."""
    engine, cat = index.engine, index.catalog
    kept = engine._first_stage(q, "barcode", allowed, 5, engine.settings)[0][:cap]
    d = slide_distances(q, engine.tiles["barcode"](), cat.offsets, kept)
    return [int(s) for s in kept[np.lexsort((cat.id_rank[kept], d))[:5]]]


def stage_row(times: np.ndarray) -> dict:
    return {"stage1_ms": 1e3 * float(np.median(times[:, 0])), "stage2_ms": 1e3 * float(np.median(times[:, 1])),
            "candidates": float(np.median(times[:, 2])),
            "stage2_every_candidate_ms": 1e3 * float(np.median(times[:, 3]))}  # fmt: skip


def side_row(index: SlideIndex, qs: list[np.ndarray], allowed: np.ndarray) -> dict:
    engine = index.engine
    ivf = index.barcodes.index
    exact = [[s for s, _ in engine.rank(q, "barcode", 5, allowed, exhaustive=True)[0]] for q in qs]
    unf = np.array([stages(index, q, None) for q in qs])
    filt = np.array([stages(index, q, allowed) for q in qs])
    row = {
        "queries": len(qs),
        "unfiltered": stage_row(unf), "filtered": stage_row(filt),
        "smaller_scan": {}, "fewer_candidates": {},
    }  # fmt: skip
    nprobe = int(ivf.nprobe)
    for divisor in (1, *BUDGET_DIVISORS):
        ivf.nprobe = max(1, nprobe // divisor)
        try:
            timed = [clocked(lambda q=q: engine.rank(q, "barcode", 5, allowed)) for q in qs]
        finally:
            ivf.nprobe = nprobe
        same = np.mean([[s for s, _ in r[0]] == e for (_, r), e in zip(timed, exact, strict=True)])
        row["smaller_scan"][f"nprobe/{divisor}"] = {
            "filtered_ms": 1e3 * float(np.median([t for t, _ in timed])),
            "identical_top5": float(same),
        }
    for cap in CANDIDATE_CAPS:
        same = np.mean([capped_top5(index, q, allowed, cap) == e for q, e in zip(qs, exact, strict=True)])
        row["fewer_candidates"][str(cap)] = {"identical_top5": float(same)}
    return row


def print_table(report: dict) -> None:
    for side, row in report["sides"].items():
        u, f = row["unfiltered"], row["filtered"]
        print(
            f"\nquery {side} the filter {report['filter']!r} ({row['queries']} query slides, binary IVF, 1 thread)"
        )
        print(
            f"{'':<12} {'stage 1 ms':>11} {'stage 2 ms':>11} {'candidates':>11} {'stage 2, all measured':>22}"
        )
        for name, s in (("unfiltered", u), ("filtered", f)):
            print(
                f"{name:<12} {s['stage1_ms']:>11.2f} {s['stage2_ms']:>11.2f} {s['candidates']:>11.0f} "
                f"{s['stage2_every_candidate_ms']:>22.2f}"
            )
        print(f"{'scan budget':<12} {'filtered ms':>11} {'top-5 = exhaustive':>19}")
        for name, s in row["smaller_scan"].items():
            print(f"{name:<12} {s['filtered_ms']:>11.2f} {s['identical_top5']:>19.3f}")
        print(f"{'candidates':<12} {'':>11} {'top-5 = exhaustive':>19}")
        for name, s in row["fewer_candidates"].items():
            print(f"{'top ' + name:<12} {'':>11} {s['identical_top5']:>19.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="scripts/bench_grow.py's work folder (holds ivf/)")
    ap.add_argument("--filter", default="two labels (10 %)", choices=list(FILTERS))
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--slides", type=int, default=10000, help="as given to bench_grow.py")
    ap.add_argument("--add", type=int, default=100, help="as given to bench_grow.py")
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="as given to bench_grow.py (the indexed cohort)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_filter_outside.json")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    index = SlideIndex.open(Path(args.work) / "ivf", {"run": {"verify": "none"}})
    cohort = Cohort(args.slides + args.add, args.dim, args.classes, args.seed)
    allowed = index.catalog.allowed(None, FILTERS[args.filter])
    slides = np.arange(len(index.catalog))
    report = {"config": vars(args), "filter": args.filter, "allowed_slides": int(allowed.sum()), "sides": {}}
    for side, parents in (("inside", slides[allowed]), ("outside", slides[~allowed])):
        qs = [minmax_barcode(q) for q in cohort.queries(args.queries, args.tiles, parents)]
        report["sides"][side] = side_row(index, qs, allowed)
        print(f"{side}: {json.dumps(report['sides'][side])}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_table(report)


if __name__ == "__main__":
    main()
