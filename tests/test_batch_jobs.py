"""Batch jobs as a GPU node runs them: tiling shards as separate concurrent processes into one store,
and the SLURM / torchrun scripts are valid shell that call existing histo commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pathology.store import TileStore
from pathology.synthetic import make_cohort

HISTO = [sys.executable, "-m", "histo.cli"]
SCRIPTS = [*sorted((REPO / "scripts").glob("slurm/*.sbatch")), REPO / "scripts" / "torchrun_local.sh"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cohort")
    labels = make_cohort(root / "slides", n_classes=2, patients_per_class=2, size=(2048, 1536), seed=3)
    return root / "slides", labels


def _tile_args(slides: Path, labels: Path, out: Path) -> list[str]:
    return ["tile", str(slides), "--labels", str(labels), "--out", str(out), "--tile-px", "128", "--json"]


def _content(store_path: Path) -> dict:
    store = TileStore.open(store_path)
    return {
        s: (
            store.record(s).to_dict() | {"source_path": None},
            store.coords(s).tolist(),
            store.selected(s).tolist(),
        )
        for s in store.slide_ids()
    }


def test_two_shard_processes_into_one_store_equal_one_run(cohort, tmp_path):
    slides, labels = cohort
    shared = tmp_path / "shared.zarr"
    procs = [
        subprocess.Popen(HISTO + _tile_args(slides, labels, shared) + ["--shard", f"{i}/2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outputs]
    ids = [{s["id"] for s in json.loads(out)["outcomes"]} for out, _ in outputs]
    assert ids[0] and ids[1] and ids[0].isdisjoint(ids[1]), "each shard takes its own, non-empty share"

    single = tmp_path / "single.zarr"
    one = subprocess.run(HISTO + _tile_args(slides, labels, single), capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 0, one.stderr[-500:]
    union, whole = _content(shared), _content(single)
    assert sorted(union) == sorted(whole) == sorted(ids[0] | ids[1])
    assert union == whole
    assert all(np.count_nonzero(sel) > 0 for _, _, sel in union.values())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_batch_scripts_are_valid_shell_calling_real_options(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")  # join continued lines
    calls = [
        line[line.index("histo ") :] for line in text.splitlines() if "histo " in line and "#" not in line
    ]
    for call in calls:
        command = call.split()[1]
        help_text = subprocess.run([*HISTO, command, "--help"], capture_output=True, text=True, cwd=REPO)
        assert help_text.returncode == 0, f"{script.name}: histo {command}: {help_text.stderr}"
        for flag in (w for w in call.split() if w.startswith("--")):
            assert flag in help_text.stdout, f"{script.name}: histo {command} has no option {flag}"
