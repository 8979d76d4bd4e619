"""Compare fine-tuning variants of one encoder: what each trains, its wall time, and its retrieval accuracy
on an unseen cohort with a per-slide stain shift (bench_train / bench_stain machinery).

1. An init in the encoder's published layout. No released weights exist offline, so a stand-in is made: the
   entry trained from random weights on a source cohort C, written as the official KimiaNet file
   (`module.model.0.*`, as `KimiaNetPyTorchWeights.pth`) and read back through `--init` like the release.
2. Fine-tuning on cohort A (`histo train --encoder NAME --init FILE --variant V`) for each variant.
3. Leave-one-patient-out majority-vote nearest-neighbour slide accuracy on unseen cohort B, as generated
   and with one random HED stain change per slide (a staining-site effect), for the init alone
   ("untrained": no fine-tuning) and each fine-tuned checkpoint, averaged over fine-tuning seeds.
The defaults run in about 15 minutes on one CPU thread of a loaded machine (tiling the three cohorts included).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python scripts/finetune_compare.py --work /tmp/finetune_compare
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

VARIANTS = ("IV", "III", "norm_only", "norm_shift")


def loop_overrides(args: argparse.Namespace, seed: int) -> dict:
    """The training settings every run shares (only the variant, init, seed and epochs differ)."""
    return {
        "seed": seed, "model.input_px": args.px, "optim.batch_size": 16, "optim.lr": args.lr,
        "data.samples_per_epoch": args.samples, "run.workers": 1, "data.val_fraction": 0.34,
        "optim.patience": 0, "optim.warmup_epochs": 1.0,
    }  # fmt: skip


def stand_in_init(args: argparse.Namespace) -> tuple[Path, dict]:
    """The encoder trained from scratch on source cohort C, saved in the official KimiaNet layout."""
    from bench_train import make_store, train_config

    from histo import checkpoint
    from pathology.train import train_kimianet

    c = make_store(args.work, "C", seed=2, px=args.px, patients=args.patients, save_pixels=True)
    cfg = train_config(**loop_overrides(args, args.seeds[0]), **{"model.encoder": args.encoder,
                                                   "optim.epochs": args.pretrain_epochs})  # fmt: skip
    start = time.perf_counter()
    summary = train_kimianet(c, args.work / "source.pt", cfg)
    weights = checkpoint.load(args.work / "source.pt", "kimianet").weights
    state = {
        f"module.model.0.{k.removeprefix('features.')}": v
        for k, v in weights.items()
        if k.startswith("features.")
    }
    path = args.work / "KimiaNetPyTorchWeights.pth"
    torch.save(state, path)
    info = {"source_tiles": summary["n_train_tiles"], "epochs": args.pretrain_epochs,
            "seconds": time.perf_counter() - start}  # fmt: skip
    return path, info


def fine_tune(args: argparse.Namespace, a: Path, init: Path, variant: str, seed: int) -> tuple[Path, dict]:
    """Fine-tune `variant` from `init` on cohort A: (checkpoint, parameter counts and wall time)."""
    from bench_train import train_config

    from pathology.train import train_kimianet

    out = args.work / f"ft_{variant}_seed{seed}.pt"
    cfg = train_config(**loop_overrides(args, seed), **{
        "model.encoder": args.encoder, "model.variant": variant, "model.init": str(init),
        "optim.epochs": args.epochs, "run.overwrite": True,
    })  # fmt: skip
    start = time.perf_counter()
    summary = train_kimianet(a, out, cfg)
    seconds = time.perf_counter() - start
    return out, {"parameters": summary["parameters"], "train_seconds": seconds,
                 "val_macro_f1": summary["best"].get("val_macro_f1")}  # fmt: skip


def evaluate(extractor, tiles: dict, labels: dict, patients: dict) -> dict[str, float]:
    from bench_train import lopo_majority_accuracy

    return {
        key: lopo_majority_accuracy(
            {s: extractor.extract(t, 32) for s, t in by_slide.items()}, labels, patients
        )
        for key, by_slide in tiles.items()
    }


def compare(args: argparse.Namespace) -> dict:
    from bench_train import make_store, shift_stains

    from pathology.encoders import open_extractor
    from pathology.kimianet import FeatureExtractor, build_model
    from pathology.store import TileStore
    from pathology.variants import parameter_counts

    init, source = stand_in_init(args)
    a = make_store(args.work, "A", seed=0, px=args.px, patients=args.patients, save_pixels=True)
    b = TileStore.open(
        make_store(args.work, "B", seed=1, px=args.px, patients=args.patients, save_pixels=True)
    )
    ids = b.slide_ids()
    labels = {s: b.record(s).label for s in ids}
    patients = {s: b.record(s).patient for s in ids}
    clean = {s: b.read_selected(s) for s in ids}
    tiles = {
        "clean": clean,
        "stain_shift": {s: shift_stains(clean[s], k, args.sigma) for k, s in enumerate(ids)},
    }
    untrained_counts = parameter_counts(build_model(args.encoder, None, 4, "norm_shift"))
    rows = [{
        "variant": "untrained (init only)", "seed": None, "parameters": {**untrained_counts, "trainable": 0},
        "train_seconds": 0.0, "val_macro_f1": None,
        **evaluate(open_extractor(args.encoder, init, "cpu", input_px=args.px), tiles, labels, patients),
    }]  # fmt: skip
    for seed in args.seeds:
        for variant in args.variants:
            ckpt, info = fine_tune(args, a, init, variant, seed)
            fx = FeatureExtractor.from_checkpoint(ckpt, device="cpu")
            rows.append({"variant": variant, "seed": seed, **info, **evaluate(fx, tiles, labels, patients)})
            print(f"  {variant}, seed {seed}: {info['train_seconds']:.0f} s", flush=True)
    return {"encoder": args.encoder, "px": args.px, "epochs": args.epochs, "samples_per_epoch": args.samples,
            "lr": args.lr, "sigma": args.sigma, "seeds": args.seeds, "eval_slides": len(ids), "source": source,
            "rows": rows, "summary": summarize(rows)}  # fmt: skip


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: parameter counts, and the mean over seeds of wall time and accuracies (with each seed's)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        f1 = [r["val_macro_f1"] for r in mine if r["val_macro_f1"] is not None]
        out.append({
            "variant": variant, "parameters": mine[0]["parameters"], "runs": len(mine),
            "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
            "val_macro_f1": float(np.mean(f1)) if f1 else None,
            **{key: float(np.mean([r[key] for r in mine])) for key in ("clean", "stain_shift")},
            "stain_shift_per_seed": [r["stain_shift"] for r in mine],
        })  # fmt: skip
    return out


def table(result: dict) -> list[str]:
    lines = [
        f"{result['encoder']}: fine-tuned on cohort A ({result['epochs']} epochs x {result['samples_per_epoch']} "
        f"tiles, {result['px']} px, lr {result['lr']}, seeds {result['seeds']}); LOPO majority-vote slide "
        f"accuracy on unseen cohort B ({result['eval_slides']} slides), per-slide stain shift σ={result['sigma']}; "
        "means over seeds",
        f"{'variant':<22} {'trainable':>10} {'%':>7} {'train s':>8} {'val F1':>7} {'B clean':>8} {'B shift':>8}"
        "  B shift per seed",
    ]
    for r in result["summary"]:
        f1 = "-" if r["val_macro_f1"] is None else f"{r['val_macro_f1']:.3f}"
        p = r["parameters"]
        pct = 100.0 * p["trainable"] / p["total"]
        each = " ".join(f"{v:.3f}" for v in r["stain_shift_per_seed"])
        lines.append(f"{r['variant']:<22} {p['trainable']:>10,} {pct:>7.2f} {r['train_seconds']:>8.0f} "
                     f"{f1:>7} {r['clean']:>8.3f} {r['stain_shift']:>8.3f}  {each}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune_compare"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/finetune_compare.json")
    parser.add_argument("--encoder", default="kimianet", help="a DenseNet registry entry (the init's layout)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--px", type=int, default=64, help="tile side and network input")
    parser.add_argument("--patients", type=int, default=3, help="patients per class (4 classes) per cohort")
    parser.add_argument("--pretrain-epochs", type=int, default=6, help="the stand-in init's training on C")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs on A")
    parser.add_argument("--samples", type=int, default=96, help="training tiles drawn per epoch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sigma", type=float, default=0.1, help="per-slide HED stain shift of cohort B")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="fine-tuning seeds (the init is trained once, with the first)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "device": "cpu", **compare(args)}
    print()
    print("\n".join(table(result)))
    args.json = args.json or args.work / "finetune_compare.json"
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
