"""Run the official BraTS scorer (`brats-evaluation`, on panoptica) on prediction/reference pairs: the oracle
that tests/test_seg_official.py and scripts/bench_brats_eval.py compare histo with.

Runs in the scorer's own venv (`make .venv-brats`), never imports histo. Reads a JSON job on stdin:
    {"cases": [{"id": "a", "pred": "p.nii.gz", "ref": "r.nii.gz"}, ...],
     "config": "gli" | null,              # a bundled task config, or
     "groups": {"ET": [4], "TC": [1, 4]},  # label groups for a config built like the bundled ones
     "parser": "seg" | "mets", "repeats": 1}
and prints {"cases": {id: {region: {"global_dice", "global_hd95", "lesionwise_dice", "lesionwise_hd95",
"tp", "fp", "fn"}}}, "seconds": {id: [per repeat]}, "groups": {region: [values]}, "versions": {...}}.
Each case goes through `evaluate_single_exam` (the function the package's CLI calls per case), and the
results through the package's parser of the task (`parse_seg_results` or `parse_mets_results`), so the
numbers are the ones the package reports. The seconds time `evaluate_single_exam` (NIfTI reading included).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import pandas as pd
from brats_evaluation import config_path, evaluate_single_exam, parse_mets_results, parse_seg_results
from panoptica import Panoptica_Evaluator


def custom_config(groups: dict[str, list[int]], out: Path) -> Path:
    """A config equal to the bundled glioma one except for its label groups (one value: a LabelGroup, several:
    a LabelMergeGroup, as the bundled configs write them)."""
    text = config_path("gli").read_text()
    head, tail = text.index("segmentation_class_groups:"), text.index("verbose:")
    lines = ["segmentation_class_groups: !SegmentationClassGroups", "  groups:"]
    for name, values in groups.items():
        kind = "LabelGroup" if len(values) == 1 else "LabelMergeGroup"
        lines += [
            f"    {name.lower()}: !{kind}",
            "      single_instance: false",
            f"      value_labels: {values}",
        ]
    out.write_text(text[:head] + "\n".join(lines) + "\n" + text[tail:])
    return out


def config_groups(evaluator: Panoptica_Evaluator) -> dict[str, list[int]]:
    """{group name: label values} of a loaded config."""
    groups = evaluator._Panoptica_Evaluator__segmentation_class_groups  # no public accessor in panoptica
    return {name: sorted(int(v) for v in group.value_labels) for name, group in groups.items()}


def number(value) -> float | None:
    """A JSON-able float (None for NaN; inf stays a string for the caller to see)."""
    value = float(value)
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def parsed(results: list[dict], parser: str, tmp: Path) -> pd.DataFrame:
    """The package's parser output for `results` (one row per case, the summary rows dropped)."""
    src, dst = tmp / "results.json", tmp / "parsed.csv"
    src.write_text(json.dumps({"metrics": results, "missings": []}, default=float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns on the std of a single case
        if parser == "mets":
            parse_mets_results(str(src), 20.0, 0.1, str(dst))
        else:
            parse_seg_results(str(src), str(dst))
    table = pd.read_csv(dst)
    return table[~table["subject_id"].isin(["mean", "std", "median"])].set_index("subject_id")


def main() -> None:
    job = json.load(sys.stdin)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the package and panoptica print notices on stdout
        report = score(job)
    json.dump(report, stdout)


def score(job: dict) -> dict:
    """The official numbers of every case of `job` (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = (
            config_path(job["config"]) if job.get("config") else custom_config(job["groups"], tmp / "c.yaml")
        )
        evaluator = Panoptica_Evaluator.load_from_config(str(path))
        results, seconds = [], {}
        for case in job["cases"]:
            times = []
            for _ in range(int(job.get("repeats", 1))):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = evaluate_single_exam(case["pred"], case["ref"], case["id"], evaluator)
                times.append(time.perf_counter() - start)
            if "error" in result:
                raise SystemExit(f"official scorer failed on {case['id']}: {result['error']}")
            results.append(result)
            seconds[case["id"]] = times
        table = parsed(results, job.get("parser", "seg"), tmp)
    groups = config_groups(evaluator)
    out = {}
    for case in job["cases"]:
        row = table.loc[case["id"]]
        out[case["id"]] = {
            name.upper(): {
                "global_dice": number(row[f"global_dsc_{name}"]),
                "global_hd95": number(row[f"global_hd95_{name}"]),
                "lesionwise_dice": number(row[f"lesionwise_dsc_mean_{name}"]),
                "lesionwise_hd95": number(row[f"lesionwise_hd95_mean_{name}"]),
                "tp": number(row[f"all_instance_tp_{name}"]),
                "fp": number(row[f"all_instance_fp_{name}"]),
                "fn": number(row[f"all_instance_fn_{name}"]),
            }
            for name in groups
        }
    versions = {p: version(p) for p in ("brats-evaluation", "panoptica", "numpy", "scipy")}
    groups = {name.upper(): values for name, values in groups.items()}
    return {"cases": out, "seconds": seconds, "groups": groups, "versions": versions}


if __name__ == "__main__":
    main()
