"""scripts/bench_search.py runs end to end at a tiny scale and reports what the search issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_search_tiny_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--slides", "60", "--tiles", "12", "--dim", "64", "--classes", "4", "--queries", "4",
            "--loop-queries", "1", "--types", "flat,ivf", "--threads", "1", "--stage1-tiles", "4,12",
            "--out", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench_search.py"), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-5 identical" in proc.stdout and "exact flat" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["barcodes"]) == {"flat", "ivf"}
    assert set(report["slide_search"]) == {f"barcode/{i}/{m}" for i in ("flat", "ivf") for m in (4, 12)}
    for row in report["slide_search"].values():
        assert row["speedup"] > 0 and 0.0 <= row["identical_top5_fraction"] <= 1.0 and row["tile_k"] == 18
    assert report["slide_search"]["barcode/flat/12"]["identical_top5_fraction"] == 1.0  # exact kNN, all tiles
    assert report["float_indexes"]["flat"]["recall_at_10"] == 1.0
    assert report["float_indexes"]["ivf"]["params"]["nlist"] >= 1
