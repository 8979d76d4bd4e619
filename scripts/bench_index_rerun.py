"""Benchmark of a `histo index` re-run's done check (issue 19): the quick check (each stored slide's record
and its array files' size, mtime and inode against their stamp) against the full one (`--verify`: every
slide's features decoded, each chunk's crc32c verified), side by side on the same stored features. Prints a
table and writes JSON.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python scripts/bench_index_rerun.py --slides 2000 --tiles 100 \
        --out bench_index_rerun.json

The features (random float32, D-dimensional) are written with `search.features.write_slide`, so stamped,
into --work (a temporary folder by default, deleted). `--existing INDEX_DIR` also times both checks' reads
on an index's stored features without writing there (stamps or not: the quick check's stat and record
reads against a decode of every slide). The page cache is as the run leaves it: the full check decodes
features just written (warm); on a cold disk it also waits for every byte to be read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search import features as feats_io

GIB = 2**30


def write_features(work: Path, slides: int, tiles: int, dim: int, seed: int) -> Path:
    """`slides` stored slides of `tiles` random `dim`-d features each; returns the features root."""
    model = {"hash": "bench", "feature_definition": "random", "feature_dim": dim}
    root = feats_io.open_features(work, model, {"tile": "synthetic"})
    rng = np.random.default_rng(seed)
    for s in range(slides):
        record = {"slide_id": f"s{s:06d}", "label": "x", "patient": f"p{s}", "site": None, "n_tiles": tiles}
        feats = rng.standard_normal((tiles, dim), dtype=np.float32)
        feats_io.write_slide(root, record, feats, np.zeros((tiles, 2), np.int64))
    return root


def stored_bytes(root: Path, ids: list[str]) -> int:
    """Bytes of the slides' stored files (records, stamps, arrays)."""
    return sum(
        p.stat().st_size for sid in ids for p in (root / feats_io.SLIDES / sid).rglob("*") if p.is_file()
    )


def timed(check: Callable[[str], object], ids: list[str]) -> float:
    started = time.perf_counter()
    for sid in ids:
        check(sid)
    return time.perf_counter() - started


def generated_row(root: Path) -> dict:
    """The re-run's done check itself (`verified_record`), quick then full, on stamped slides."""
    ids = feats_io.done_slides(root)
    quick = timed(lambda sid: feats_io.verified_record(root, sid, "quick"), ids)
    full = timed(lambda sid: feats_io.verified_record(root, sid, "full"), ids)
    return row("generated (verified_record)", root, ids, quick, full)


def existing_row(index_dir: Path) -> dict:
    """The two checks' reads on an index's stored features, writing nothing: the stamp check and the
    record (a slide without a stamp skips the stat of its files), or a decode of every slide."""
    root = index_dir / feats_io.FEATURES_DIR
    ids = feats_io.done_slides(root)
    stamped = sum(feats_io.stamp_matches(root, sid) for sid in ids)

    def quick(sid: str) -> None:
        feats_io.stamp_matches(root, sid)
        assert feats_io.read_record(root, sid) is not None

    quick_s, full_s = timed(quick, ids), timed(lambda sid: feats_io.read_slide(root, sid), ids)
    return row(f"existing {index_dir} ({stamped} stamped; reads only)", root, ids, quick_s, full_s)


def row(name: str, root: Path, ids: list[str], quick: float, full: float) -> dict:
    attrs = feats_io.read_attrs(root)["model"]
    tiles = sum(int(feats_io.read_record(root, sid)["n_tiles"]) for sid in ids)
    return {
        "features": name,
        "slides": len(ids),
        "tiles": tiles,
        "feature_dim": int(attrs["feature_dim"]),
        "features_gib": round(tiles * int(attrs["feature_dim"]) * 4 / GIB, 3),
        "stored_gib": round(stored_bytes(root, ids) / GIB, 3),
        "quick_s": round(quick, 6),
        "full_s": round(full, 6),
        "full_over_quick": round(full / quick, 1),
        "quick_ms_per_slide": round(1000 * quick / len(ids), 3),
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'slides':>7} {'features GiB':>12} {'stored GiB':>10} {'quick s':>8} {'full s':>8} {'full/quick':>10}"
    )
    for r in rows:
        print(
            f"{r['slides']:>7} {r['features_gib']:>12.2f} {r['stored_gib']:>10.2f} {r['quick_s']:>8.2f} "
            f"{r['full_s']:>8.2f} {r['full_over_quick']:>10.1f}  {r['features']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=2000)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the generated features (default: temporary)")
    ap.add_argument("--existing", default=None, help="an index dir whose stored features are also timed")
    ap.add_argument("--out", default="bench_index_rerun.json")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_index_rerun_"))
    try:
        started = time.perf_counter()
        root = write_features(work, args.slides, args.tiles, args.dim, args.seed)
        written = time.perf_counter() - started
        rows = [generated_row(root) | {"write_s": round(written, 1)}]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.existing:
        rows.append(existing_row(Path(args.existing)))
    Path(args.out).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
