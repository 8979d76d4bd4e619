"""Speed of `histo segment eval` against the official BraTS scorer on the same real 240x240x155 case, in one run.

The case is the shared TCGA-DU-7294 (BraTS space): one model's segmentation (SANet) scored against another's
(HNF-Net), labels 2018-2021, regions ET, TC, WT. Each side times one case from its two NIfTI files to all of
its metrics, `--repeats` times, and the medians are compared:
- histo: `segmentation.evaluate.score_files` (legacy, global and lesion-wise Dice and HD95, lesion counts);
  also the whole `evaluate_predictions` call (discovery, CSV and JSON included);
- official: `brats_evaluation.evaluate_single_exam` (global and lesion-wise Dice, NSD and HD95), run in the
  scorer's venv through scripts/brats_official.py in a subprocess started by this script.
Prints a table and a JSON line (also written to `--out`) with the ratio official / histo (> 1: histo faster).

    .venv/bin/python scripts/bench_brats_eval.py --repeats 5   # needs `make .venv-brats`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASE = REPO.parent / "shared" / "data" / "brats" / "TCGA-DU-7294"
if not CASE.is_dir():
    CASE = Path("/work/shared/data/brats/TCGA-DU-7294")
GROUPS = {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}


def official_seconds(oracle: Path, pred: Path, ref: Path, repeats: int) -> tuple[list[float], dict]:
    """Per-repeat seconds of the official scorer on one case, and its versions."""
    job = {
        "cases": [{"id": "case", "pred": str(pred), "ref": str(ref)}],
        "groups": GROUPS,
        "repeats": repeats,
    }
    done = subprocess.run(
        [str(oracle), str(REPO / "scripts" / "brats_official.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the official scorer failed:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return report["seconds"]["case"], report["versions"]


def histo_seconds(data: Path, pred_dir: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Per-repeat seconds of histo on one case: scoring its files, and the whole evaluate_predictions call."""
    from segmentation.data import find_case
    from segmentation.evaluate import evaluate_predictions, score_files

    case = find_case(data / CASE.name, labels="2021", images=False)
    score_files(pred_dir / f"{CASE.name}.nii.gz", case)  # warm-up: imports and first-call costs
    scoring, whole = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        score_files(pred_dir / f"{CASE.name}.nii.gz", case)
        scoring.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluate_predictions(pred_dir, data, config={"data": {"labels": "2021"}}, progress=False)
        whole.append(time.perf_counter() - start)
    return scoring, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--oracle", type=Path, default=REPO / ".venv-brats" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "brats_eval.json")
    args = parser.parse_args()
    if not args.oracle.exists():
        raise SystemExit(f"{args.oracle}: the official scorer's venv is missing; run `make .venv-brats`")
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data" / CASE.name).mkdir(parents=True)
        (tmp / "pred").mkdir()
        ref = shutil.copy(
            CASE / "seg_hnfnetv1-20.nii.gz", tmp / "data" / CASE.name / f"{CASE.name}_seg.nii.gz"
        )
        pred = shutil.copy(CASE / "seg_sanet0-20.nii.gz", tmp / "pred" / f"{CASE.name}.nii.gz")
        theirs, versions = official_seconds(args.oracle, Path(pred), Path(ref), args.repeats)
        scoring, whole = histo_seconds(tmp / "data", tmp / "pred", args.repeats)
    rows = {
        "official evaluate_single_exam": statistics.median(theirs),
        "histo score_files": statistics.median(scoring),
        "histo evaluate_predictions": statistics.median(whole),
    }
    result = {
        "case": f"{CASE.name} (240x240x155, SANet vs HNF-Net, scheme 2021)",
        "repeats": args.repeats,
        "median_seconds": rows,
        "ratio_official_over_histo": rows["official evaluate_single_exam"] / rows["histo score_files"],
        "ratio_official_over_histo_whole_call": rows["official evaluate_single_exam"]
        / rows["histo evaluate_predictions"],
        "official_versions": versions,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(f"{'one case, median of ' + str(args.repeats):34s} seconds")
    for name, seconds in rows.items():
        print(f"{name:34s} {seconds:7.3f}")
    print(f"{'ratio official / histo':34s} {result['ratio_official_over_histo']:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
