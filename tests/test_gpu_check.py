"""scripts/gpu_check.py runs end to end (on CPU with --allow-cpu --quick) and refuses silently-CPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--allow-cpu", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 7 and all(r["check"] in run.stdout for r in rows)
    assert all(r["seconds"] > 0 for r in rows if "seconds" in r)


def test_gpu_check_without_gpu_says_so(tmp_path):
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the machine has
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        env=hidden,
    )
    assert run.returncode != 0 and "has not run on a GPU" in run.stderr
