"""Benchmark `histo train`: throughput, data-pipeline efficiency and a learning sanity check (CPU-sized).

1. Model-only tiles/s of DenseNet-121 training steps and feature extraction at 224 and 1000 px
   (1000 px: a couple of small batches).
2. End-to-end training throughput (the real training loop: tiles read from slides in DataLoader workers,
   decoded, augmented) against model-only steps of the same model at the same batch size; target >= 0.9x.
3. Learning: train on a synthetic cohort (4 classes, several patients), then leave-one-patient-out
   majority-vote nearest-neighbour slide accuracy on the features of a second, unseen cohort, for the
   trained and the untrained network: on the tiles as generated (the synthetic classes differ so much in
   colour that random features already separate them) and after a per-slide HED stain shift (a
   staining-site effect), where features must describe tissue rather than the exact stain colour.

    .venv/bin/python scripts/bench_train.py --work /tmp/bench_train --json bench_train.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def model_only(arch: str, px: int, batch: int, steps: int, train: bool) -> float:
    """Tiles/s of training steps (AdamW) or inference on random input, after one warm-up batch."""
    from pathology.kimianet import build_model

    model = build_model(arch, "batch", num_classes=4, variant="scratch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, px, px), torch.randint(0, 4, (batch,))
    model.train(train)
    elapsed = 0.0
    for i in range(steps + 1):
        start = time.perf_counter()
        if train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.inference_mode():
                model.features(x)
        if i > 0:
            elapsed += time.perf_counter() - start
    return batch * steps / elapsed


def make_store(work: Path, name: str, seed: int, px: int, patients: int, save_pixels: bool) -> Path:
    """A synthetic cohort (4 classes) tiled into a store with `px`-pixel tiles at 20x."""
    from histo.config import load_config
    from pathology import tile_slides
    from pathology.config import TileConfig
    from pathology.synthetic import make_cohort

    slides = work / f"cohort_{name}"
    labels = slides / "labels.csv"
    if not labels.is_file():
        labels = make_cohort(slides, n_classes=4, patients_per_class=patients, size=(3072, 2048), seed=seed)
    cfg = load_config(
        TileConfig, overrides={"tile.px": px, "mosaic.percent": 40.0, "cellularity.top_fraction": 0.5}
    )
    digest = hashlib.sha256(json.dumps(cfg.recorded(), sort_keys=True).encode()).hexdigest()[
        :8
    ]  # tiling defaults may change
    store = work / f"{name}_{px}px{'_pixels' if save_pixels else ''}_{digest}.zarr"
    tile_slides([slides], store, cfg, labels_csv=labels, save_pixels=save_pixels, progress=False)
    return store


def train_config(**overrides):
    from histo.config import load_config
    from pathology.config import TrainConfig

    return load_config(TrainConfig, overrides={"run.device": "cpu", "model.variant": "scratch", **overrides})


def end_to_end(store: Path, work: Path, px: int, batch: int, steps: int, workers: int) -> dict:
    """Real training-loop epochs (second epoch timed) against model-only steps, same model and batch size."""
    from histo.devices import DistInfo
    from histo.training import Run
    from pathology.train import KimiaNetTask

    cfg = train_config(**{
        "model.input_px": px, "optim.batch_size": batch, "data.samples_per_epoch": batch * steps,
        "run.workers": workers, "data.val_fraction": 0.34, "optim.epochs": 2,
    })  # fmt: skip
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer = Run(KimiaNetTask(store, cfg, cpu), work / "e2e.pt", cpu)
    trainer.train_epoch(0)  # starts the persistent workers, warms up
    start = time.perf_counter()
    trainer.train_epoch(1)
    e2e = batch * steps / (time.perf_counter() - start)
    only = model_only("kimianet", px, batch, steps, train=True)
    return {"px": px, "batch": batch, "steps": steps, "workers": workers, "end_to_end_tiles_s": e2e,
            "model_only_tiles_s": only, "ratio": e2e / only}  # fmt: skip


def lopo_majority_accuracy(
    features: dict[str, np.ndarray], label: dict[str, str], patient: dict[str, str]
) -> float:
    """Each slide's tiles vote with the label of their nearest tile among other patients' slides."""
    from histo.classification import vote

    ids = sorted(features)
    all_f = np.concatenate([features[s] for s in ids])
    owner = np.concatenate([[s] * len(features[s]) for s in ids])
    correct = 0
    for s in ids:
        others = np.array([patient[o] != patient[s] for o in owner])
        d = ((features[s][:, None, :] - all_f[None, others, :]) ** 2).sum(-1)
        correct += vote([label[o] for o in owner[others][d.argmin(1)]]) == label[s]
    return correct / len(ids)


def shift_stains(tiles: np.ndarray, seed: int, sigma: float) -> np.ndarray:
    """One random HED stain change for a whole slide (a staining-site effect): s * U(1±σ) + U(±0.3σ)."""
    from pathology.augment import hed_jitter, to_tensor

    g = torch.Generator().manual_seed(seed)
    alpha = 1 + (torch.rand(3, generator=g) * 2 - 1) * sigma
    beta = (torch.rand(3, generator=g) * 2 - 1) * sigma * 0.3
    out = torch.stack([hed_jitter(x, alpha, beta) for x in to_tensor(tiles)])
    return (out.movedim(1, -1).numpy() * 255).round().astype(np.uint8)


def search_accuracy(checkpoint: Path, store_path: Path, stain_sigma: float) -> dict[str, float]:
    """LOPO accuracy on the store's slides as they are and with a per-slide stain shift of `stain_sigma`."""
    from pathology.kimianet import FeatureExtractor
    from pathology.store import TileStore

    store = TileStore.open(store_path)
    fx = FeatureExtractor.from_checkpoint(checkpoint, device="cpu")
    ids = store.slide_ids()
    records = {s: store.record(s) for s in ids}
    labels = {s: r.label for s, r in records.items()}
    patients = {s: r.patient for s, r in records.items()}
    clean = {s: fx.extract_store(store, s, batch_size=16) for s in ids}
    shifted = {s: fx.extract(shift_stains(store.read_selected(s), k, stain_sigma)) for k, s in enumerate(ids)}
    return {
        "clean": lopo_majority_accuracy(clean, labels, patients),
        "stain_shift": lopo_majority_accuracy(shifted, labels, patients),
    }


def learning_models(work: Path, px: int, epochs: int, patients: int) -> tuple[dict[str, Path], dict]:
    """Train on cohort A: ({"untrained": checkpoint, "trained": checkpoint}, training facts)."""
    from pathology.kimianet import random_init_checkpoint
    from pathology.train import train_kimianet

    a = make_store(work, "A", seed=0, px=px, patients=patients, save_pixels=True)
    cfg = train_config(**{
        "seed": 0, "model.input_px": px, "optim.epochs": epochs, "optim.batch_size": 16, "optim.lr": 1e-3,
        "run.workers": 1, "data.val_fraction": 0.34, "optim.patience": 0, "optim.warmup_epochs": 1.0,
    })  # fmt: skip
    start = time.perf_counter()
    summary = train_kimianet(a, work / "learned.pt", cfg)
    minutes = (time.perf_counter() - start) / 60
    untrained = random_init_checkpoint(work / "untrained.pt", input_px=px, seed=0)
    info = {"train_tiles": summary["n_train_tiles"], "epochs": epochs, "train_minutes": minutes,
            "best_val_macro_f1": summary["best"].get("val_macro_f1")}  # fmt: skip
    return {"untrained": untrained, "trained": work / "learned.pt"}, info


def learning(work: Path, px: int, epochs: int, patients: int, stain_sigma: float = 0.1) -> dict:
    """Train on cohort A; LOPO search accuracy on unseen cohort B for untrained vs trained features."""
    from pathology.store import TileStore

    models, info = learning_models(work, px, epochs, patients)
    b = make_store(work, "B", seed=1, px=px, patients=patients, save_pixels=True)
    return {
        **info, "stain_sigma": stain_sigma,
        "untrained": search_accuracy(models["untrained"], b, stain_sigma),
        "trained": search_accuracy(models["trained"], b, stain_sigma),
        "eval_slides": len(TileStore.open(b).slide_ids()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train"))
    parser.add_argument("--json", type=Path, default=None, help="default: WORK/bench_train.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--epochs", type=int, default=8, help="learning check: training epochs")
    parser.add_argument("--patients", type=int, default=3, help="learning check: patients per class")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "e2e", "learning"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"threads": args.threads, "device": "cpu"}

    if "throughput" not in args.skip:
        rows = []
        for px, batch, steps in ((224, 8, 3), (1000, 2, 2)):
            rows.append({"px": px, "batch": batch,
                         "train_tiles_s": model_only("kimianet", px, batch, steps, train=True),
                         "extract_tiles_s": model_only("kimianet", px, batch * 2, steps, train=False)})  # fmt: skip
        result["throughput"] = rows
        print("\nDenseNet-121 model-only throughput (CPU)")
        print(f"{'px':>6} {'batch':>6} {'train tiles/s':>14} {'extract tiles/s':>16}")
        for r in rows:
            print(f"{r['px']:>6} {r['batch']:>6} {r['train_tiles_s']:>14.2f} {r['extract_tiles_s']:>16.2f}")

    if "e2e" not in args.skip:
        store = make_store(args.work, "A", seed=0, px=224, patients=args.patients, save_pixels=False)
        e2e = end_to_end(store, args.work, px=224, batch=8, steps=4, workers=1)
        result["end_to_end"] = e2e
        print("\nEnd-to-end (tiles read from slides in 1 worker, augmented) vs model-only, DenseNet-121")
        print(f"  {e2e['px']} px, batch {e2e['batch']}: end-to-end {e2e['end_to_end_tiles_s']:.2f} tiles/s, "
              f"model-only {e2e['model_only_tiles_s']:.2f} tiles/s, ratio {e2e['ratio']:.2f} (target >= 0.9)")  # fmt: skip

    if "learning" not in args.skip:
        learn = learning(args.work, px=96, epochs=args.epochs, patients=args.patients)
        result["learning"] = learn
        print(
            "\nLearning sanity: LOPO majority-vote NN slide accuracy, unseen synthetic cohort "
            f"({learn['eval_slides']} slides); trained {learn['epochs']} epochs, {learn['train_minutes']:.1f} min"
        )
        print(f"{'eval tiles':<34} {'untrained':>10} {'trained':>10}")
        for key, name in (
            ("clean", "as generated"),
            ("stain_shift", f"per-slide stain shift σ={learn['stain_sigma']}"),
        ):
            print(f"{name:<34} {learn['untrained'][key]:>10.3f} {learn['trained'][key]:>10.3f}")

    args.json = args.json or args.work / "bench_train.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
