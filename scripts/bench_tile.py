"""Benchmark `histo tile` on a synthetic 40x slide of about 60,000 x 40,000 px (~30 % tissue).

Each variant runs in its own subprocess (wall time includes Python start-up and imports; peak RSS from
os.wait4's rusage of that child):
  tile            `histo tile SLIDE` with the defaults
  tile+pixels     the same with --save-pixels (reads and stores the selected tiles at 20x)
  floor           the pure I/O floor: the tissue thumbnail plus the selected tiles at level 0, nothing else
  floor(mosaic)   the thumbnail plus every mosaic tile at level 0 (what a Yottixel run reads)
  naive-l0        the pipeline with colour features from one level-0 read_region per candidate tile
  naive-level     one read per candidate at the pyramid level for ~5x (Yottixel's way, level by downsample)
Then slides/min of `histo tile --workers 1` vs `--workers 2` on several smaller slides.
Prints a table and writes bench_out/bench_tile.json.

    .venv/bin/python scripts/bench_tile.py [--out bench_out] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTO = [sys.executable, "-c", "import sys; from histo.cli import main; sys.exit(main())"]


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`, return wall seconds, peak RSS (MB) of that child, exit code and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "rc": proc.returncode,
        "stdout": out.decode(),
    }


def ensure_slide(path: Path, width: int, height: int, class_id: int, seed: int, fraction: float) -> Path:
    """Write the synthetic slide once (cached under bench_out/)."""
    if not path.exists():
        from pathology.synthetic import write_synthetic_slide

        t0 = time.perf_counter()
        write_synthetic_slide(path, width, height, class_id, seed, tissue_fraction=fraction)
        print(f"wrote {path} ({width}x{height}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


# ---- child modes (run in a subprocess by the parent) ----------------------------------------------


def child_floor(slide_path: str, store_path: str, which: str) -> None:
    """Read only what the result needs: the tissue thumbnail and the chosen tiles at level 0."""
    import numpy as np
    import openslide

    from pathology.slide import open_slide
    from pathology.store import TileStore

    store = TileStore.open(store_path)
    sid = store.slide_ids()[0]
    rec = store.record(sid)
    coords = store.coords(sid)
    if which == "selected":
        coords = coords[store.selected(sid)]
    size = round(rec.tile_size_level0)
    with open_slide(slide_path) as s:
        s.read_at_mpp(store.params["tissue"]["mpp"])
    osr = openslide.OpenSlide(slide_path)
    total = sum(
        float(np.asarray(osr.read_region((int(x), int(y)), 0, (size, size))).mean()) for x, y in coords
    )
    print(json.dumps({"tiles": len(coords), "checksum": total}))


def child_naive(slide_path: str, store_path: str, how: str) -> None:
    """The pipeline with per-candidate read_region colour features (level 0, or the ~5x level)."""
    import numpy as np

    from histo.config import load_config
    from pathology import tiler
    from pathology.config import TileConfig

    def per_candidate(slide, origins, grid, mpp):
        size = round(grid.size)
        level = 0 if how == "l0" else slide.best_level(2.0 / slide.mpp)
        ds = slide.level_downsamples[level]
        side = round(size / ds)
        return np.array(
            [slide.read_region(level, x, y, side, side).reshape(-1, 3).mean(0) for x, y in origins]
        )

    config = load_config(TileConfig, overrides={"mosaic.colour_mpp": 2.0})  # through colour_features
    tiler.colour_features = per_candidate
    summary = tiler.tile_slides([slide_path], store_path, config, progress=False)
    print(json.dumps(summary.counts))


# ---- parent -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--size", type=int, nargs=2, default=(60000, 40000))
    ap.add_argument("--skip-naive", action="store_true", help="Skip the slow per-candidate level-0 variant.")
    ap.add_argument("--scaling-slides", type=int, default=6)
    ap.add_argument("--scaling-size", type=int, nargs=2, default=(30000, 20000))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        {"floor": child_floor, "naive": child_naive}[mode](*rest)
        return

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    w, h = args.size
    slide = ensure_slide(out / f"bench_{w}x{h}_40x.svs", w, h, class_id=2, seed=0, fraction=0.3)
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    results: dict[str, dict] = {}

    def store(name: str) -> str:
        path = out / f"{name}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        return str(path)

    tile_store = store("tile")
    runs = [
        ("tile", [*HISTO, "tile", str(slide), "--out", tile_store, "--json"]),
        ("tile+pixels", [*HISTO, "tile", str(slide), "--out", store("tile_pixels"), "--save-pixels"]),
        ("floor", [*me, "floor", str(slide), tile_store, "selected"]),
        ("floor(mosaic)", [*me, "floor", str(slide), tile_store, "mosaic"]),
        ("naive-level", [*me, "naive", str(slide), store("naive_level"), "level"]),
    ]
    if not args.skip_naive:
        runs.append(("naive-l0", [*me, "naive", str(slide), store("naive_l0"), "l0"]))
    for name, cmd in runs:
        r = run_measured(cmd, env)
        if r["rc"] != 0:
            raise SystemExit(f"{name} failed with exit code {r['rc']}")
        results[name] = r
        print(f"{name:<14} {r['wall_s']:7.2f} s  {r['peak_rss_mb']:7.0f} MB", file=sys.stderr)
    summary = json.loads(results["tile"]["stdout"])["outcomes"][0]["detail"]

    # Slides per minute with 1 and 2 worker processes.
    sw, sh = args.scaling_size
    sdir = out / f"scaling_{sw}x{sh}"  # the cache is keyed by size
    sdir.mkdir(exist_ok=True)
    for k in range(args.scaling_slides):
        ensure_slide(sdir / f"s{k}.svs", sw, sh, class_id=k % 4, seed=100 + k, fraction=0.35)
    scaling = {}
    for workers in (1, 2):
        r = run_measured(
            [*HISTO, "tile", str(sdir), "--out", store(f"scaling_w{workers}"), "--workers", str(workers)], env
        )
        scaling[workers] = {**r, "slides_per_min": 60 * args.scaling_slides / r["wall_s"]}

    floor = results["floor"]["wall_s"]
    tile = results["tile"]["wall_s"]
    rows = []
    for name, r in results.items():
        rows.append({"variant": name, "wall_s": round(r["wall_s"], 3), "peak_rss_mb": round(r["peak_rss_mb"]),
                     "x_floor": round(r["wall_s"] / floor, 2), "x_tile": round(r["wall_s"] / tile, 2)})  # fmt: skip
    report = {
        "slide": {"path": str(slide), "width": w, "height": h, "mpp": summary["mpp"]},
        "n_mosaic": summary["n_mosaic"],
        "n_selected": summary["n_selected"],
        "rows": rows,
        "targets": {
            "total_over_floor": round(tile / floor, 2),
            "total_under_3x_floor": tile < 3 * floor,
            "peak_rss_under_1_5_gb": results["tile"]["peak_rss_mb"] < 1536,
            "speedup_vs_naive_l0": round(results["naive-l0"]["wall_s"] / tile, 2)
            if "naive-l0" in results
            else None,
            "speedup_vs_naive_level": round(results["naive-level"]["wall_s"] / tile, 2),
        },
        "scaling": {
            "slides": args.scaling_slides,
            "size": [sw, sh],
            "workers_1_slides_per_min": round(scaling[1]["slides_per_min"], 2),
            "workers_2_slides_per_min": round(scaling[2]["slides_per_min"], 2),
            "speedup": round(scaling[2]["slides_per_min"] / scaling[1]["slides_per_min"], 2),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
        },
    }
    print(f"\nslide {w}x{h} px at 40x: {summary['n_mosaic']} mosaic tiles, {summary['n_selected']} selected")
    print(f"{'variant':<14} {'wall s':>8} {'peak MB':>8} {'x floor':>8} {'x tile':>8}")
    for r in rows:
        print(
            f"{r['variant']:<14} {r['wall_s']:>8.2f} {r['peak_rss_mb']:>8} {r['x_floor']:>8.2f} {r['x_tile']:>8.2f}"
        )
    s = report["scaling"]
    print(f"\n{s['slides']} slides of {sw}x{sh}: workers 1 {s['workers_1_slides_per_min']:.1f} slides/min, "
          f"workers 2 {s['workers_2_slides_per_min']:.1f} slides/min (x{s['speedup']}); "
          f"{s['cpu_count']} CPUs, load {s['load_avg_1min']:.1f}")  # fmt: skip
    print(json.dumps(report["targets"]))
    from histo.io import atomic_write_json

    atomic_write_json(out / "bench_tile.json", report)


if __name__ == "__main__":
    main()
