"""Benchmark stain normalization: its cost per tile and its effect on retrieval under a per-slide stain shift.

1. Cost: milliseconds to normalize one tile (224 and 1000 px crops of the shared TCGA H&E crop) with each
   method, fitted to that crop; the fit itself is done once per store.
2. Effect: bench_train's learning check (train on synthetic cohort A; leave-one-patient-out majority-vote
   nearest-neighbour slide accuracy on unseen cohort B) with each slide of B given one random HED stain
   change (a staining-site effect), then normalized per tile to a target fitted on B's unshifted tiles
   (an archive fit, as `--stain-target STORE`), for the untrained and the trained encoder.

    .venv/bin/python scripts/bench_stain.py --work /tmp/bench_stain --json bench_stain.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

METHODS = ("macenko", "vahadane", "reinhard")
TARGET = REPO.parent / "shared" / "data" / "histology_patches" / "TCGA-HE-7130-01Z-00-DX1.png"


def stain_config(method: str, target: str):
    from histo.config import load_config
    from pathology.config import TileConfig

    return load_config(TileConfig, overrides={"stain.method": method, "stain.target": target}).stain


def fitted(method: str, rgb: np.ndarray, source: str):
    from pathology.stain import fit_image

    cfg = stain_config(method, source)
    return cfg.model_copy(update={"fit": fit_image(rgb, cfg, source)})


def cost(repeats: int) -> list[dict]:
    """Median ms per tile of each method at 224 and 1000 px."""
    from PIL import Image

    from pathology.stain import normalize

    crop = np.asarray(Image.open(TARGET).convert("RGB"))
    rows = []
    for px in (224, 1000):
        tile = np.ascontiguousarray(crop[:px, :px])
        for method in METHODS:
            cfg = fitted(method, crop, str(TARGET))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                normalize(tile, cfg)
                times.append(time.perf_counter() - start)
            rows.append({"px": px, "method": method, "ms_per_tile": 1000 * float(np.median(times))})
    return rows


def effect(work: Path, px: int, epochs: int, patients: int, sigma: float) -> dict:
    """LOPO accuracy on cohort B: as generated, stain-shifted, and shifted then normalized."""
    from bench_train import learning_models, lopo_majority_accuracy, make_store, shift_stains

    from pathology.kimianet import FeatureExtractor
    from pathology.stain import fit_image, normalize_tiles, store_montage
    from pathology.store import TileStore

    b = make_store(work, "B", seed=1, px=px, patients=patients, save_pixels=True)
    store = TileStore.open(b)
    ids = store.slide_ids()
    labels = {s: store.record(s).label for s in ids}
    patients_of = {s: store.record(s).patient for s in ids}
    clean = {s: store.read_selected(s) for s in ids}
    shifted = {s: shift_stains(clean[s], k, sigma) for k, s in enumerate(ids)}
    montage = store_montage(b)
    variants = {"clean": clean, "stain_shift": shifted}
    for method in METHODS:
        cfg = stain_config(method, str(b))
        cfg = cfg.model_copy(update={"fit": fit_image(montage, cfg, str(b))})
        variants[f"shift+{method}"] = {s: normalize_tiles(t, cfg, s) for s, t in shifted.items()}
    models, info = learning_models(work, px, epochs, patients)
    out: dict = {"sigma": sigma, "eval_slides": len(ids), **info}
    for name, checkpoint in models.items():
        fx = FeatureExtractor.from_checkpoint(checkpoint, device="cpu")
        out[name] = {
            key: lopo_majority_accuracy({s: fx.extract(t) for s, t in tiles.items()}, labels, patients_of)
            for key, tiles in variants.items()
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_stain"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/bench_stain.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--px", type=int, default=96, help="effect: tile side (as bench_train's learning check)"
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.1, help="per-slide HED stain shift")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cost", "effect"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"threads": args.threads, "device": "cpu"}
    if "cost" not in args.skip:
        result["cost"] = cost(args.repeats)
        print(f"\n{'px':>6} {'method':<10} {'ms/tile':>8}")
        for r in result["cost"]:
            print(f"{r['px']:>6} {r['method']:<10} {r['ms_per_tile']:>8.1f}")
    if "effect" not in args.skip:
        e = effect(args.work, args.px, args.epochs, args.patients, args.sigma)
        result["effect"] = e
        print(f"\nLOPO slide accuracy, unseen cohort ({e['eval_slides']} slides), stain shift σ={e['sigma']}")
        print(f"{'eval tiles':<22} {'untrained':>10} {'trained':>10}")
        for key in e["untrained"]:
            print(f"{key:<22} {e['untrained'][key]:>10.3f} {e['trained'][key]:>10.3f}")
    args.json = args.json or args.work / "bench_stain.json"
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
