"""How well the two cellularity scores rank real H&E tiles of known cellularity, read at 1 µm/px.

Tiles (all from ../shared/data, see its READMEs), each read at the pipeline's cellularity resolution
(`cellularity.mpp` = 1 µm/px, area resampling):
  - CMU-1-Small-Region.svs (skin, 0.499 µm/px): the 128 µm cells of a grid over the slide that are one tissue
    kind, labelled by eye on that grid (row, col): epidermis (dense), dermis (stroma), cornified keratin
    (tissue without nuclei) and glass; cells of mixed content are left out.
  - kather2.tif (tumour epithelium, dense) and kather1.tif (smooth muscle, stroma), 0.5 µm/px.
  - histolab's no-tissue, almost-white and red-pen tiles (no nuclei; scale not recorded, read as 0.5 µm/px).
Classes: 2 dense, 1 stroma, 0 no nuclei (keratin, glass, pen). No fat tile of known scale is in the shared
data, so "fat above empty" is not measured. For each score (`cellularity.score`) it reports the pairwise
concordance (share of tile pairs of different classes that the score orders as their classes, ties half),
per class pair, and Kendall's tau-b against the classes; prints a table and writes JSON:
  .venv/bin/python scripts/cellularity_ranking.py --out cellularity_ranking.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import kendalltau

from histo.config import load_config
from pathology.cellularity import SCORES, tile_scorer
from pathology.config import CellularityConfig, TileConfig
from pathology.slide import open_slide

DATA = Path(
    os.environ.get("HISTO_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data")
)
CELL_UM = 128  # side of a CMU grid cell (px at 1 µm/px)
CLASSES = {2: "dense", 1: "stroma", 0: "no nuclei"}
CMU_CELLS = {  # (row, col) of the 128 µm grid at 1 µm/px -> (class, what it shows)
    **{rc: (2, "epidermis") for rc in [(3, 4), (4, 4), (7, 4), (10, 2), (10, 6)]},
    **{rc: (1, "dermis") for rc in [(5, 3), (6, 3), (7, 3), (8, 6), (9, 3), (9, 5), (10, 4), (10, 5)]},
    **{rc: (0, "keratin") for rc in [(4, 5), (4, 6), (5, 5), (5, 6), (6, 5), (6, 6)]},
    **{rc: (0, "glass") for rc in [(0, 1), (1, 1), (2, 1), (2, 2), (5, 1), (6, 0), (8, 0), (9, 1)]},
}
PATCHES = {  # file under histology_patches/ -> (class, what it shows, µm/px)
    "kather2.tif": (2, "tumour epithelium", 0.5),
    "kather1.tif": (1, "smooth muscle", 0.5),
    "histolab_tiles/no-tissue.png": (0, "no tissue", 0.5),
    "histolab_tiles/almost-white-1.png": (0, "almost white", 0.5),
    "histolab_tiles/no-tissue-red-pen.png": (0, "red pen", 0.5),
}


def at_mpp(rgb: np.ndarray, mpp: float, target: float) -> np.ndarray:
    """An RGB tile at `mpp` µm/px resampled (area average) to `target` µm/px."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * mpp / target)), max(1, round(h * mpp / target)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def labelled_tiles(target: float) -> list[dict]:
    """Every tile of the study at `target` µm/px with its class and provenance."""
    tiles = []
    with open_slide(DATA / "wsi" / "CMU-1-Small-Region.svs") as slide:
        image = slide.read_at_mpp(target)
    side = round(CELL_UM / target)
    for (r, c), (cls, kind) in CMU_CELLS.items():
        rgb = image[r * side : (r + 1) * side, c * side : (c + 1) * side]
        tiles.append({"name": f"CMU-1-Small-Region[{r},{c}]", "kind": kind, "class": cls, "rgb": rgb})
    for name, (cls, kind, mpp) in PATCHES.items():
        rgb = np.asarray(Image.open(DATA / "histology_patches" / name).convert("RGB"))
        tiles.append({"name": name, "kind": kind, "class": cls, "rgb": at_mpp(rgb, mpp, target)})
    return tiles


def concordance(
    scores: np.ndarray, classes: np.ndarray, hi: int | None = None, lo: int | None = None
) -> float:
    """Share of tile pairs of different classes (or of classes hi > lo) that the scores order as their
    classes; a tie counts half."""
    good = total = 0.0
    for i, j in itertools.combinations(range(len(scores)), 2):
        a, b = (i, j) if classes[i] > classes[j] else (j, i)
        if classes[a] == classes[b] or (hi is not None and (classes[a], classes[b]) != (hi, lo)):
            continue
        total += 1
        good += 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
    return good / total


def evaluate(tiles: list[dict], cfg: CellularityConfig, mpp: float) -> dict:
    """Per score: the score of every tile, concordance overall and per class pair, Kendall's tau-b."""
    classes = np.array([t["class"] for t in tiles])
    out = {}
    for score in SCORES:
        scorer = tile_scorer(cfg.model_copy(update={"score": score}), mpp)
        values = np.array([scorer(t["rgb"]) for t in tiles])
        pairs = {
            f"{CLASSES[h]} > {CLASSES[lo]}": concordance(values, classes, h, lo)
            for h, lo in [(2, 1), (1, 0), (2, 0)]
        }
        out[score] = {
            "concordance": concordance(values, classes),
            "by_class_pair": pairs,
            "kendall_tau_b": float(kendalltau(values, classes).statistic),
            "scores": {t["name"]: float(v) for t, v in zip(tiles, values, strict=True)},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(TileConfig).cellularity
    mpp = cfg.mpp
    tiles = labelled_tiles(mpp)
    subsets = {"all tiles": tiles, "without keratin": [t for t in tiles if t["kind"] != "keratin"]}
    results = {}
    for subset, chosen in subsets.items():
        results[subset] = evaluate(chosen, cfg, mpp)
        counts = {CLASSES[c]: int(sum(t["class"] == c for t in chosen)) for c in CLASSES}
        print(f"{subset}: {len(chosen)} real tiles at {mpp} µm/px: {counts}")
        print(
            f"{'score':<16}{'concordance':>12}{'dense>stroma':>14}{'stroma>none':>13}{'dense>none':>12}{'tau-b':>8}"
        )
        for score, r in results[subset].items():
            p = list(r["by_class_pair"].values())
            print(
                f"{score:<16}{r['concordance']:>12.3f}{p[0]:>14.3f}{p[1]:>13.3f}{p[2]:>12.3f}{r['kendall_tau_b']:>8.3f}"
            )
    if args.out is not None:
        meta = [{k: t[k] for k in ("name", "kind", "class")} for t in tiles]
        args.out.write_text(json.dumps({"mpp": mpp, "tiles": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
