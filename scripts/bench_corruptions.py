"""Throughput of every corruption: H&E tiles/s at 224 and 1000 px, MRI volumes/s at 4 x 128^3.

Side by side with the model work it precedes, so the table shows whether corrupting dominates an
evaluation: KimiaNet (DenseNet-121) feature extraction of 224 px tiles, and one 128^3 sliding window of
the default UNet3D. Prints a table and writes JSON. Modest defaults for a shared CPU:
  .venv/bin/python scripts/bench_corruptions.py --out bench_corruptions.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from histo.io import atomic_write_json
from pathology import corruptions as he
from segmentation import corruptions as mri


def _rate(fn, items: int, repeats: int) -> float:
    """Items per second (best of `repeats` timed calls, after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def he_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """H&E-like tiles: pink stroma, purple nuclei, texture."""
    rng = np.random.default_rng(seed)
    tiles = np.array([232, 168, 200]) + rng.normal(0, 8, size=(n, size, size, 3))
    nuclei = rng.random((n, size, size)) < 0.08
    tiles[nuclei] = [85, 55, 150]
    return np.clip(tiles, 0, 255).astype(np.uint8)


def mri_volume(size: int, seed: int = 0) -> np.ndarray:
    """A (4, size^3) raw 'brain' ellipsoid (positive magnitudes, as acquired) with a zero background."""
    rng = np.random.default_rng(seed)
    g = np.linspace(-1, 1, size)
    mask = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) < 0.8
    vol = 500.0 + 100.0 * rng.normal(size=(4, size, size, size))
    return np.where(mask, np.clip(vol, 1.0, None), 0).astype(np.float32)


def bench_he(sizes: dict[int, int], repeats: int, severity: int) -> list[dict]:
    rows = []
    for size, n in sizes.items():
        tiles = he_tiles(n, size)
        for name in he.CORRUPTIONS:
            rate = _rate(lambda t=tiles, nm=name: he.corrupt_tiles(t, nm, severity, seed=0), n, repeats)
            rows.append({"domain": "he", "corruption": name, "size": size, "items_per_s": rate})
            print(f"  he {name:20s} {size:5d} px  {rate:8.1f} tiles/s", flush=True)
    return rows


def bench_mri(size: int, repeats: int, severity: int) -> list[dict]:
    vol = mri_volume(size)
    rows = []
    for name in mri.CORRUPTIONS:
        rate = _rate(lambda nm=name: mri.corrupt_volume(vol, nm, severity, seed=0), 1, repeats)
        rows.append({"domain": "mri", "corruption": name, "size": size, "items_per_s": rate})
        print(f"  mri {name:20s} {size}^3  {rate:8.3f} volumes/s", flush=True)
    return rows


def bench_models(repeats: int) -> dict[str, float]:
    """Baselines: DenseNet-121 features of 224 px tiles (tiles/s) and one 128^3 UNet3D window (volumes/s)."""
    from pathology.kimianet import build_model
    from segmentation.unet import UNet3D

    net = build_model("kimianet", "batch", num_classes=0, variant="scratch").eval()
    x = torch.rand(16, 3, 224, 224)
    with torch.inference_mode():
        kimianet = _rate(lambda: net.features(x), 16, repeats)
        unet = UNet3D().eval()
        v = torch.rand(1, 4, 128, 128, 128)
        window = _rate(lambda: unet(v), 1, 1)
    return {"kimianet_224_tiles_per_s": kimianet, "unet3d_128_windows_per_s": window}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_corruptions.json")
    parser.add_argument("--tiles-224", type=int, default=16, help="Tiles per call at 224 px.")
    parser.add_argument("--tiles-1000", type=int, default=2, help="Tiles per call at 1000 px.")
    parser.add_argument("--mri-size", type=int, default=128)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-models", action="store_true", help="Skip the model baselines.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("H&E corruptions", flush=True)
    rows = bench_he({224: args.tiles_224, 1000: args.tiles_1000}, args.repeats, args.severity)
    print("MRI corruptions", flush=True)
    rows += bench_mri(args.mri_size, args.repeats, args.severity)
    models = {} if args.no_models else bench_models(args.repeats)

    base_tile = models.get("kimianet_224_tiles_per_s")
    base_vol = models.get("unet3d_128_windows_per_s")
    print(f"\n{'domain':6s} {'corruption':20s} {'size':>6s} {'items/s':>10s} {'x model':>8s}")
    for r in rows:
        base = base_tile if r["domain"] == "he" else base_vol
        # how many times faster corrupting is than the model's forward pass on the same items
        r["ratio_to_model"] = r["items_per_s"] / base if base else None
        ratio = f"{r['ratio_to_model']:8.2f}" if base else "       -"
        print(f"{r['domain']:6s} {r['corruption']:20s} {r['size']:6d} {r['items_per_s']:10.2f} {ratio}")
    for k, v in models.items():
        print(f"{k}: {v:.3f}")
    info = {"threads": args.threads, "severity": args.severity, "device": "cpu", "torch": torch.__version__}
    atomic_write_json(Path(args.out), {"settings": info, "models": models, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
