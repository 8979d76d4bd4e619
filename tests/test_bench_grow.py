"""scripts/bench_grow.py runs end to end at a tiny scale, reports what the growth issue asks for, and a
rerun on the same --work measures nothing again (every piece was saved)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _run(work: Path, out: Path) -> subprocess.CompletedProcess:
    args = ["--slides", "90", "--add", "6", "--tiles", "12", "--dim", "64", "--classes", "3", "--queries", "6",
            "--filter-queries", "2", "--barcode-scales", "6000", "--threads", "1", "--work", str(work),
            "--out", str(out)]  # fmt: skip
    return subprocess.run([sys.executable, str(REPO / "scripts/bench_grow.py"), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_bench_grow_tiny_run_writes_the_report_and_resumes(tmp_path: Path) -> None:
    first = _run(tmp_path / "work", tmp_path / "a.json")
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((tmp_path / "a.json").read_text())
    flat, ivf = report["growth"]["flat"], report["growth"]["ivf"]
    assert flat["added_slides"] == ivf["added_slides"] == 6 and flat["add_vs_build"] > 0
    assert flat["results_equal_fresh_build"] is True and flat["arrays_equal_fresh_build"] is True
    assert 0.0 <= ivf["recall_at_10_after_add"] <= 1.0 and report["ivf_grown_50"]["added_slides"] == 30
    assert len(report["filtered"]["flat"]) == len(report["filtered"]["ivf"]) == 12  # 3 filters x 2 sides x 2
    assert (
        report["filtered"]["flat"]["float|site (10 %)|inside"]["identical_top5_to_exhaustive_in_subset"]
        == 1.0
    )
    assert {"ivf_flat_1m", "ivf_hnsw_1m"} <= set(report) and report["barcodes_scale"]["6000"][
        "codes_bytes"
    ] == 6000 * 8
    assert "add/build" in first.stdout and "recall@10" in first.stdout
    outside = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_filter_outside.py"), "--work", str(tmp_path / "work"),
         "--slides", "90", "--add", "6", "--tiles", "12", "--dim", "64", "--classes", "3", "--queries", "3",
         "--threads", "1", "--out", str(tmp_path / "outside.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert outside.returncode == 0, outside.stderr[-2000:]
    sides = json.loads((tmp_path / "outside.json").read_text())["sides"]
    assert (
        set(sides) == {"inside", "outside"}
        and sides["outside"]["smaller_scan"]["nprobe/1"]["identical_top5"] == 1.0
    )
    assert "stage 2, all measured" in outside.stdout
    again = _run(tmp_path / "work", tmp_path / "b.json")
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((tmp_path / "b.json").read_text())
    assert {k: v for k, v in rerun.items() if k != "config"} == {
        k: v for k, v in report.items() if k != "config"
    }
