"""Benchmark the encoder registry: tiles/s of every encoder, model-only and end-to-end from a tile store.

model-only   the network alone on ready (batch, 3, px, px) inputs already on the device, at the encoder's
             own input size, in the chosen precision, after warm-up batches (CUDA synchronised).
end-to-end   `FeatureExtractor.extract_store` over a tile store saved with pixels: zarr read and decode
             (prefetched one batch ahead), upload, resize, normalise, forward, copy back. The ratio
             end-to-end / model-only is the data pipeline's efficiency (target >= 0.9).
Each is measured `--repeats` times, alternating, and the best of each is kept (the CPU here is shared:
the best run is the one least disturbed). Weights are random (speed does not depend on them); networks
are built directly on the device. Encoders
whose packages are missing here (timm, lane 2) are listed as skipped with the reason.

    .venv/bin/python scripts/bench_encoders.py --encoders kimianet,resnet50-trunc --tiles 32
    .venv-full/bin/python scripts/bench_encoders.py --device cuda --precision bfloat16 --tiles 2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_store(work: Path, tile_px: int, min_tiles: int) -> Path:
    """A synthetic cohort tiled at `tile_px` px, 0.5 µm/px, every tissue tile kept, pixels saved."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.store import TileStore
    from pathology.synthetic import make_cohort

    cfg = load_config(
        TileConfig,
        overrides={
            "tile.px": tile_px,
            "tile.mpp": 0.5,
            "mosaic.percent": 100.0,
            "cellularity.top_fraction": 1.0,
        },
    )
    # 4 slides at 0.25 µm/px with ~40 % tissue: about a quarter of the grid tiles are kept
    side = max(1024, int(4 * tile_px * (min_tiles / 4) ** 0.5))
    key = hashlib.sha256(json.dumps([cfg.recorded(), side], sort_keys=True).encode()).hexdigest()[:8]
    store = work / f"bench_{tile_px}px_{key}.zarr"
    if not store.exists():
        csv = make_cohort(
            work / f"slides_{key}", n_classes=2, patients_per_class=2, size=(side, side), seed=0
        )
        tile_slides([work / f"slides_{key}"], store, cfg, labels_csv=csv, save_pixels=True, progress=False)
    opened = TileStore.open(store)
    if not sum(opened.record(s).n_selected for s in opened.slide_ids()):
        raise SystemExit(f"{store}: the synthetic cohort gave no tiles")
    return store


def build_extractor(name: str, device: torch.device, precision: str, tiling: dict):
    """A FeatureExtractor of `name` with random weights, built on `device` (no slow CPU init)."""
    from pathology import encoders

    enc = encoders.get_encoder(name)
    enc.check_usable()
    with device:
        network = enc.network()
    pre = encoders.encoder_preprocess(enc, tiling=tiling)
    definition = encoders.encoder_definition(enc, pre, precision)
    return encoders.FeatureExtractor(
        network, pre, definition, enc.feature_dim, device, model_hash="random", precision=precision
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def model_only(fx, batch: int, steps: int) -> float:
    """Tiles/s of the network alone on ready inputs at its input size."""
    px = fx.preprocess.input_px
    x = torch.randn(batch, 3, px, px, device=fx.device).contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # warm-up: kernels chosen, memory allocated
        with fx.autocast():
            fx.network(x)
    sync(fx.device)
    start = time.perf_counter()
    for _ in range(steps):
        with fx.autocast():
            fx.network(x)
    sync(fx.device)
    return batch * steps / (time.perf_counter() - start)


def end_to_end(fx, store, batch: int) -> tuple[float, int]:
    """Tiles/s of extract_store over every slide of the store (one warm-up batch first)."""
    ids = store.slide_ids()
    fx.extract(store.read_selected(ids[0], np.arange(min(batch, store.record(ids[0]).n_selected))), batch)
    sync(fx.device)
    start = time.perf_counter()
    n = sum(len(fx.extract_store(store, sid, batch)) for sid in ids)
    sync(fx.device)
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--encoders", default=None, help="comma-separated names (default: every registered one)"
    )
    parser.add_argument("--store", type=Path, default=None, help="an existing tile store saved with pixels")
    parser.add_argument("--tiles", type=int, default=64, help="about this many tiles in the synthetic store")
    parser.add_argument("--tile-px", type=int, default=256, help="store tile size (0.5 µm/px)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed model-only batches")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements; the best is kept")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encoders"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/bench_encoders.json")
    args = parser.parse_args()

    from histo.devices import resolve_device
    from pathology import encoders
    from pathology.store import TileStore

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    args.work.mkdir(parents=True, exist_ok=True)
    store = TileStore.open(args.store or make_store(args.work, args.tile_px, args.tiles))
    tile_px = store.params["resolved"]["tile_px"]
    names = args.encoders.split(",") if args.encoders else encoders.names()
    rows, skipped = [], {}
    for name in names:
        enc = encoders.get_encoder(name)
        problem = enc.refused or (f"needs {', '.join(enc.missing())}" if enc.missing() else None)
        if problem:
            skipped[name] = problem
            continue
        fx = build_extractor(name, device, precision, store.params)
        mo = e2e = 0.0
        for _ in range(args.repeats):
            mo = max(mo, model_only(fx, args.batch, args.steps))
            rate, n = end_to_end(fx, store, args.batch)
            e2e = max(e2e, rate)
        rows.append({"encoder": name, "input_px": fx.preprocess.input_px, "feature_dim": fx.feature_dim,
                     "params_m": sum(p.numel() for p in fx.network.parameters()) / 1e6,
                     "model_only_tiles_s": mo, "end_to_end_tiles_s": e2e, "ratio": e2e / mo, "tiles": n})  # fmt: skip
        del fx
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {mo:.2f} / {e2e:.2f} tiles/s", file=sys.stderr)

    print(f"\nEncoders on {device} ({precision}, batch {args.batch}, store tiles {tile_px} px, resize rule)")
    print(
        f"{'encoder':<21} {'input':>6} {'dim':>5} {'params M':>9} {'model tiles/s':>14} {'e2e tiles/s':>12} {'e2e/model':>9}"
    )
    for r in rows:
        print(f"{r['encoder']:<21} {r['input_px']:>6} {r['feature_dim']:>5} {r['params_m']:>9.1f} "
              f"{r['model_only_tiles_s']:>14.2f} {r['end_to_end_tiles_s']:>12.2f} {r['ratio']:>9.2f}")  # fmt: skip
    for name, why in skipped.items():
        print(f"{name:<21} skipped: {why}")
    report = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_threads": args.threads,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "precision": precision,
        "batch": args.batch,
        "repeats": args.repeats,
        "store": {"path": str(store.path), "tile_px": tile_px, "mpp": store.params["resolved"]["target_mpp"]},
        "rows": rows,
        "skipped": skipped,
    }
    out = args.json or args.work / "bench_encoders.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
