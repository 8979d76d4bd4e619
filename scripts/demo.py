"""`make demo`: the whole pipeline end to end on generated data, each stage a `histo` command printed as it runs.

Pathology: synthetic cohort -> `histo tile` -> `histo train` -> `histo index --evaluate` -> `histo search`.
Segmentation: synthetic BraTS-like cases -> `histo segment train` -> `predict` -> `eval`.
Finishes with a short report of the numbers and the paths of the pictures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HISTO = [str(Path(sys.executable).parent / "histo")]


def run(args: list[str], capture_json: bool = False) -> dict | None:
    """Print a stage's command as a user would type it, run it, and parse its --json output if asked."""
    shown = "histo " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(HISTO + args, stdout=subprocess.PIPE if capture_json else None, text=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if proc.returncode != 0:
        sys.exit(f"demo stopped: `{shown}` exited with {proc.returncode}")
    return json.loads(proc.stdout) if capture_json else None


STAIN_JITTER = 0.3  # every slide stained a little differently, as in a multi-lab archive


def make_pathology_data(out: Path, seed: int) -> tuple[Path, Path, list[Path]]:
    """Cohort to index (4 classes x 4 patients) and held-out query slides of new patients (one per class)."""
    from pathology.synthetic import make_cohort

    print("\n# generating a synthetic H&E cohort (4 classes x 4 patients) and 4 query slides", flush=True)
    labels = make_cohort(
        out / "slides", n_classes=4, patients_per_class=4, seed=seed, stain_jitter=STAIN_JITTER
    )
    make_cohort(
        out / "queries",
        n_classes=4,
        patients_per_class=1,
        seed=seed + 1000,
        stain_jitter=STAIN_JITTER,
        prefix="NEW",
    )
    queries = sorted(p for p in (out / "queries").iterdir() if p.suffix in (".svs", ".tiff", ".tif"))
    return out / "slides", labels, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo_cfg = REPO / "configs" / "demo"
    start = time.perf_counter()

    slides, labels, queries = make_pathology_data(out, args.seed)
    store = out / "tiles.zarr"
    tile = run(
        [
            "tile",
            str(slides),
            "--out",
            str(store),
            "--labels",
            str(labels),
            "--config",
            str(demo_cfg / "tile.yaml"),
            "--save-pixels",
            "--qc-dir",
            str(out / "qc"),
            "--json",
        ],
        capture_json=True,
    )
    ckpt = out / "kimianet.pt"
    train = run(
        [
            "train",
            "--tiles",
            str(store),
            "--out",
            str(ckpt),
            "--config",
            str(demo_cfg / "train.yaml"),
            "--json",
        ],
        capture_json=True,
    )
    index_dir = out / "index"
    index = run(
        [
            "index",
            "--tiles",
            str(store),
            "--model",
            str(ckpt),
            "--out",
            str(index_dir),
            "--evaluate",
            "--json",
        ],
        capture_json=True,
    )
    search = run(
        ["search", "--index", str(index_dir), *map(str, queries), "--k", "3", "--json"], capture_json=True
    )

    from segmentation.synthetic import make_cases

    print("\n# generating synthetic BraTS-like cases (4 modalities, labels 1/2/4)", flush=True)
    make_cases(out / "brats" / "train", n_cases=8, shape=(48, 48, 48), seed=args.seed)
    make_cases(out / "brats" / "test", n_cases=2, shape=(48, 48, 48), seed=args.seed + 1000)
    seg_ckpt = out / "unet.pt"
    run(
        [
            "segment",
            "train",
            "--data",
            str(out / "brats" / "train"),
            "--out",
            str(seg_ckpt),
            "--config",
            str(demo_cfg / "segment.yaml"),
        ]
    )
    test_cases = sorted(p for p in (out / "brats" / "test").iterdir() if p.is_dir())
    run(
        [
            "segment",
            "predict",
            "--model",
            str(seg_ckpt),
            *map(str, test_cases),
            "--out",
            str(out / "seg_pred"),
        ]
    )
    seg_eval = run(
        ["segment", "eval", "--pred", str(out / "seg_pred"), "--data", str(out / "brats" / "test"), "--json"],
        capture_json=True,
    )

    report(out, tile, train, index, search, seg_eval, time.perf_counter() - start)


def report(
    out: Path, tile: dict, train: dict, index: dict, search: dict, seg_eval: dict, seconds: float
) -> None:
    """Print the final summary a user reads first."""
    print("\n" + "=" * 72 + "\nhisto demo report\n" + "=" * 72)
    print("Tiles per slide (mosaic -> high-cellularity):")
    for s in tile["outcomes"]:
        d = s["detail"]
        print(f"  {s['id']:<28} {s['status']:<7} {d.get('n_mosaic', 0):>4} -> {d.get('n_selected', 0):>3}")
    print(f"KimiaNet training curve: {train['curve_png']}")
    print("Leave-one-patient-out search (majority vote of the top k; chance = 1 / number of classes):")
    print(f"  {'scope':<12} {'k':>3} {'queries':>8} {'accuracy':>9} {'macro-F1':>9}")
    for row in index["evaluation"]["rows"]:
        print(
            f"  {row['scope']:<12} {row['k']:>3} {row['n']:>8} {row['accuracy']:>9.3f} {row['macro_f1']:>9.3f}"
        )
    print("Example searches:")
    for q in search["queries"]:
        top = ", ".join(f"{r['slide_id']} ({r['label']}, {r['distance']:.3g})" for r in q["results"])
        print(f"  {Path(q['query']).name}: predicted {q['prediction']} <- {top}")
    print(f"U-Net training curve: {out / 'unet.curves.png'}")
    print(
        "Segmentation on held-out synthetic cases (means; legacy: BraTS 2018-2021, lesion-wise: BraTS 2023+):"
    )
    columns = ("legacy_dice", "lesionwise_dice", "legacy_hd95", "lesionwise_hd95")
    print("  region" + "".join(f"{c.replace('_', ' '):>17}" for c in columns))
    for region in seg_eval["labels"]["regions"]:
        means = [seg_eval["metrics"][f"{c}_{region}"]["mean"] for c in columns]
        print(f"  {region:<6}" + "".join(f"{v:>17.3f}" for v in means))
    pictures = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    print(f"QC pictures ({len(pictures)}) under {out}:")
    for p in pictures[:20]:
        print(f"  {p}")
    print(f"Total time: {seconds / 60:.1f} min")
    print(
        f"Search page: {shlex.join(['histo', 'serve', '--index', str(out / 'index'), '--slides-root', str(out / 'queries')])}"
    )


if __name__ == "__main__":
    main()
