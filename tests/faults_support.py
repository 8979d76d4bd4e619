"""Helpers of the fault tests (tests/test_faults_*.py): small slides, a writer paused mid-run, and
running a command as an unprivileged user (permission faults cannot happen to root)."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TILE = ["--tile-px", "64"]
TILE_CONFIG = {"tile": {"px": 64}}
NOBODY = 65534

# Runs `histo ARGS...` with a tile store whose writer finds the disk full after the first slide it writes.
DISK_FULL = """
import errno, sys
import pathology.store as st
original, written = st.TileStore.write_slide, []
def write(self, record, *args, **kwargs):
    written.append(record.slide_id)
    if len(written) > 1:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "slides" / record.slide_id))
    original(self, record, *args, **kwargs)
st.TileStore.write_slide = write
from histo.cli import main
main(sys.argv[1:])
"""

# Runs `histo ARGS...` with `MODULE.FUNCTION` paused until the file GATE.go exists (GATE.started says
# it has been reached), so a test can start a second writer while the first is mid-run.
PAUSED = """
import sys, time, importlib, pathlib
gate, target, args = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
module_name, name = target.rsplit(".", 1)
module = importlib.import_module(module_name)
original = getattr(module, name)
def paused(*a, **k):
    gate.with_suffix(".started").touch()
    while not gate.with_suffix(".go").exists():
        time.sleep(0.05)
    return original(*a, **k)
setattr(module, name, paused)
from histo.cli import main
main(args)
"""


def write_slides(
    folder: Path, n: int, size: tuple[int, int] = (1600, 1200), first_seed: int = 0
) -> list[Path]:
    """n small synthetic Aperio slides s<k>.svs (label k % 2) that tile in a fraction of a second."""
    from pathology.synthetic import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    return [write_synthetic_slide(folder / f"s{k}.svs", *size, k % 2, seed=first_seed + k) for k in range(n)]


@contextmanager
def paused_run(gate: Path, target: str, args: list[str]) -> Iterator[subprocess.Popen]:
    """A `histo` subprocess paused in `target` (module.function) until the block ends; then it finishes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(gate), target, *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not gate.with_suffix(".started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the paused run never reached its pause"
            time.sleep(0.05)
        yield proc
    finally:
        gate.with_suffix(".go").touch()
        proc.wait(timeout=300)


def shared_tmp() -> Path:
    """A world-writable temporary folder (another user can work in it)."""
    path = Path(tempfile.mkdtemp(prefix="histo-faults-"))
    path.chmod(0o777)
    return path


def _without_file_override() -> None:
    """In a child of root, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set, so the program run is refused unreadable files like any user (prctl PR_CAPBSET_DROP)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m histo.cli ARGS` subject to file permissions (root's override dropped when the tests
    run as root; permission faults cannot happen to root otherwise)."""
    return subprocess.run(
        [sys.executable, "-m", "histo.cli", *args], cwd=ROOT, capture_output=True, text=True,
        preexec_fn=_without_file_override if os.geteuid() == 0 else None,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, **kwargs,
    )  # fmt: skip


def as_nobody() -> None:
    """preexec_fn: run the child as the user `nobody` (a colleague without our files' ownership)."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@dataclass(frozen=True)
class Job:
    """A batch item of the worker tests (module level: a spawned worker unpickles it)."""

    id: str
    path: str


def sleepy(item: Job) -> object:
    """A batch item that records its worker's PID in item.path and then sleeps (module level: a
    spawned worker imports it)."""
    from histo.batch import Outcome

    Path(item.path).write_text(str(os.getpid()))
    time.sleep(120)
    return Outcome.done(item.id, item.path)


def image_declaring(path: Path, rgb, w: int, h: int) -> Path:
    """A small PNG, JPEG or TIFF (by `path`'s suffix) of `rgb` whose header declares w x h px: a
    decompression bomb as a reader meets it, without the gigabytes."""
    writer = {".png": _png_declaring, ".jpg": _jpeg_declaring, ".tif": _tiff_declaring}[path.suffix]
    writer(path, rgb, w, h)
    return path


def _png_declaring(path: Path, rgb, w: int, h: int) -> None:
    """A valid PNG whose header (IHDR, checksum rewritten) declares w x h px; its data stays tiny."""
    data = bytearray(_encoded(rgb, "PNG"))
    chunk = b"IHDR" + struct.pack(">II", w, h) + bytes(data[24:29])
    data[12:29], data[29:33] = chunk, struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))


def _jpeg_declaring(path: Path, rgb, w: int, h: int) -> None:
    """A JPEG whose frame header (SOF0) declares w x h px."""
    data = bytearray(_encoded(rgb, "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))


def _tiff_declaring(path: Path, rgb, w: int, h: int) -> None:
    """A plain TIFF whose ImageWidth / ImageLength tags declare w x h px (one strip, as RowsPerStrip says)."""
    import tifffile

    tifffile.imwrite(path, rgb, photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        where = [
            (tags[name].valueoffset, tags[name].dtype, v)
            for name, v in (("ImageWidth", w), ("ImageLength", h), ("RowsPerStrip", h))
        ]
    data = bytearray(path.read_bytes())
    for offset, dtype, value in where:
        fmt = "<H" if int(dtype) == 3 else "<I"
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))


def _encoded(rgb, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()
