"""The `histo` entry point: help lists every command fast; errors are one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
import time

from click.testing import CliRunner

from histo import __version__
from histo.cli import COMMANDS, main

EXPECTED = [
    "tile",
    "train",
    "index",
    "search",
    "segment",
    "robustness",
    "serve",
    "export",
    "features",
    "encoders",
]


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in EXPECTED:
        assert f"  {name} " in result.output
    assert list(COMMANDS) == EXPECTED


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.perf_counter(); from histo.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "heavy=[m for m in ('torch','zarr','faiss','monai','openslide','matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy, time.perf_counter()-t)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    assert "HEAVY []" in out, out
    assert elapsed < 1.0, f"histo --help took {elapsed:.2f} s"


def test_bad_config_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\n")
    result = CliRunner().invoke(
        main, ["tile", str(tmp_path), "--out", str(tmp_path / "s.zarr"), "--config", str(bad)]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(
        f"error: {bad}: no_such_key: unknown key (known here: cellularity, from_coords, mosaic, roi, run,"
    )
    assert str(bad) in lines[-1]
    assert "Traceback" not in result.output
