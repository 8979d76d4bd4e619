"""The built wheel, installed without `-e` and away from the source tree, runs and finds its defaults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import histo
from histo.cli import COMMANDS
from histo.config import flatten
from pathology.store import TileStore
from pathology.synthetic import write_synthetic_slide

# What a clean checkout lacks (.gitignore) or a wheel never holds: not copied into the build tree.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo_out", "bench_out"
)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built offline (no build isolation: the venv's setuptools) from a copy of the tree, so
    the checkout gets no build/ or egg-info and stale build output cannot leak into it."""
    src = tmp_path_factory.mktemp("src") / "histo"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheels")
    pip_wheel = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(out)]
    _run([sys.executable, "-m", "pip", *pip_wheel])
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed with `pip install --target` (not editable): its packages and `bin/histo`."""
    target = tmp_path_factory.mktemp("site")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ]
    )
    return target


def _env(target: Path) -> dict[str, str]:
    """Only the installed copy is importable (the dependencies come from this venv's site-packages)."""
    return {**os.environ, "PYTHONPATH": str(target)}


def test_wheel_carries_every_default_config(wheel):
    configs = REPO / "histo" / "configs"
    expected = sorted(p.relative_to(REPO).as_posix() for p in configs.rglob("*.yaml"))
    assert "histo/configs/tile.yaml" in expected and "histo/configs/demo/tile.yaml" in expected
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert [n for n in expected if n not in names] == []
        for name in expected:
            assert z.read(name) == (REPO / name).read_bytes(), f"{name} differs from the source tree"
        entry_points = z.read(f"histo-{histo.__version__}.dist-info/entry_points.txt").decode()
    assert f"histo-{histo.__version__}-" in wheel.name
    assert "histo = histo.cli:main" in entry_points


def test_installed_copy_is_the_one_imported(installed, tmp_path):
    code = "import histo, pathology, search, segmentation, histo.config as c; print(histo.__file__); "
    code += (
        "print(pathology.__file__); print(search.__file__); print(segmentation.__file__); print(c.CONFIG_DIR)"
    )
    proc = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed))
    paths = [Path(line) for line in proc.stdout.splitlines()]
    assert len(paths) == 5
    for p in paths:
        assert p.is_relative_to(installed), f"{p} is not from the installed wheel"
    assert sorted(f.name for f in paths[-1].glob("*.yaml")) == sorted(
        f.name for f in (REPO / "histo" / "configs").glob("*.yaml")
    )


def test_console_script_help_and_version(installed, tmp_path):
    histo_bin = installed / "bin" / "histo"
    assert histo_bin.is_file()
    version = _run([str(histo_bin), "--version"], cwd=tmp_path, env=_env(installed))
    assert version.stdout == f"histo, version {histo.__version__}\n"
    helped = _run([str(histo_bin), "--help"], cwd=tmp_path, env=_env(installed)).stdout
    for word in [*COMMANDS, "--verbose", "--quiet", "--log-file", "--version"]:
        assert word in helped


def test_console_script_tiles_a_slide_with_the_packaged_defaults(installed, tmp_path):
    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "syn.svs", 1500, 1000, 0, seed=0)
    (tmp_path / "tiny.yaml").write_text("tile:\n  px: 224\n")  # every other key from the packaged defaults
    cmd = [str(installed / "bin" / "histo"), "tile", "slides", "--out", "store.zarr", "--config", "tiny.yaml"]
    summary = json.loads(_run([*cmd, "--json"], cwd=tmp_path, env=_env(installed)).stdout)
    assert summary["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    store = TileStore.open(tmp_path / "store.zarr")
    assert store.slide_ids() == ["syn"] and store.record("syn").n_selected >= 1
    defaults = yaml.safe_load((installed / "histo" / "configs" / "tile.yaml").read_text())
    recorded = flatten(store.params)
    assert recorded["tile.px"] == 224 and defaults["tile"]["px"] != 224
    for key, value in flatten(defaults).items():
        if key != "tile.px" and not key.startswith("run."):  # run options are not recorded
            assert recorded[key] == value, key
