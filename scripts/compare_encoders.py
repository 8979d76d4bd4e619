"""Compare encoders on one tile store: leave-one-patient-out slide search, one row per encoder.

For each `--encoder NAME=WEIGHTS` an index is built in OUT/NAME (resumable: a re-run reuses the extracted
features) and evaluated leave-one-patient-out (search/evaluate.py: majority vote of the top k slides,
the query's patient excluded); one table prints accuracy and macro-F1 per k for the horizontal scope
(and vertical, when the store has sites). `NAME` without `=WEIGHTS` runs with random weights, the
baseline that shows what pre-training adds. JSON with every row goes to OUT/compare_encoders.json.

    .venv/bin/python scripts/compare_encoders.py --tiles tiles.zarr --out cmp \\
        --encoder kimianet=KimiaNetPyTorchWeights.pth --encoder densenet121-imagenet=densenet121.pth
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_encoder(spec: str) -> tuple[str, Path | None]:
    """'name=weights' -> (name, Path); 'name' -> (name, None) for random weights."""
    name, _, weights = spec.partition("=")
    return name, Path(weights) if weights else None


def evaluate_one(store, name: str, weights: Path | None, out: Path, args) -> dict:
    """Build (or resume) the index of one encoder and evaluate it leave-one-patient-out."""
    from pathology.encoders import open_extractor
    from search.slide_index import SlideIndex

    rule = {"tile_rule": args.tile_rule, "grid": args.grid, "input_px": args.input_px}
    start = time.perf_counter()
    config = {"run": {"device": args.device}}
    if weights is None:
        model = open_extractor(name, None, args.device, tiling=store.params, **rule)
        idx = SlideIndex.build(store, model, out, config, progress=False)
    else:
        config |= {"encoder": name, "weights": str(weights), **rule}
        idx = SlideIndex.build(store, None, out, config, progress=False)
    seconds = time.perf_counter() - start
    ev = idx.evaluate(k=args.k, mode=args.mode, out_dir=out / "evaluation")
    return {
        "encoder": name,
        "weights": str(weights) if weights else "random",
        "feature_dim": idx.manifest["model"]["feature_dim"],
        "tiles": idx.manifest["counts"]["tiles"],
        "slides": idx.manifest["counts"]["slides"],
        "index_seconds": seconds,
        "rows": ev.summary_rows(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=Path, required=True, help="tile store (histo tile)")
    parser.add_argument("--encoder", action="append", required=True, help="NAME=WEIGHTS, or NAME (random)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--k", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 3, 5))
    parser.add_argument("--mode", choices=["barcode", "float"], default="barcode")
    parser.add_argument("--tile-rule", choices=["resize", "grid"], default="resize")
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--input-px", type=int, default=None, help="CNN encoders: another input size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from pathology.store import TileStore

    torch.set_num_threads(args.threads)
    store = TileStore.open(args.tiles)
    results = [
        evaluate_one(store, name, weights, args.out / name, args)
        for name, weights in map(parse_encoder, args.encoder)
    ]
    scopes = sorted({r["scope"] for res in results for r in res["rows"]})
    print(f"\nLeave-one-patient-out slide search on {args.tiles} ({args.mode}, majority vote of the top k)")
    header = f"{'encoder':<21} {'weights':<12} {'dim':>5} {'tiles':>6}"
    cols = [(s, k) for s in scopes for k in args.k]
    print(header + "".join(f" {s[:4]} acc@{k} F1@{k}" for s, k in cols))
    for res in results:
        by = {(r["scope"], r["k"]): r for r in res["rows"]}
        cells = "".join(
            f" {by[c]['accuracy']:>9.3f} {by[c]['macro_f1']:>5.3f}" if c in by else " " * 16 for c in cols
        )
        weights = "random" if res["weights"] == "random" else Path(res["weights"]).name[:12]
        print(f"{res['encoder']:<21} {weights:<12} {res['feature_dim']:>5} {res['tiles']:>6}{cells}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_encoders.json").write_text(
        json.dumps({"store": str(args.tiles), "results": results}, indent=2)
    )
    print(f"JSON: {args.out / 'compare_encoders.json'}")


if __name__ == "__main__":
    main()
