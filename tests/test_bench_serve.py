"""scripts/bench_serve.py runs end to end on the small demo index and reports what the serve issue asks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def test_bench_serve_compares_the_page_to_histo_search(demo: dict, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = ["--index", str(demo["index"]), "--k", "3", "--repeat", "1", "--clients", "4", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench_serve.py"), *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "page / histo search (cold, warm)" in proc.stdout and "4 concurrent page loads" in proc.stdout
    report = json.loads(out.read_text())
    assert report["slides"] == 6 and report["k"] == 3 and report["images_on_page"] > 3
    assert report["concurrent"]["failures"] == 0 and report["concurrent"]["clients"] == 4
    for key in ("histo_search_s", "in_process_search_s", "page_cold_s", "page_warm_s"):
        assert report[key] > 0
    assert report["page_warm_over_histo_search"] == pytest.approx(
        report["page_warm_s"] / report["histo_search_s"]
    )
    assert report["page_warm_s"] <= report["page_cold_s"]
