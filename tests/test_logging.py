"""`histo -v/-q/--log-file`: what reaches the terminal and what the log file keeps."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import REPO

import histo
from histo.cli import main
from histo.errors import HistoError
from histo.log import close_logging, init_worker, setup_logging, worker_settings
from pathology.synthetic import write_synthetic_slide

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
logger = logging.getLogger("pathology.probe")  # a library logger, as the batch runner's


@click.command("probe")
@click.option("--fail", is_flag=True, help="Raise a HistoError after logging.")
def probe(fail: bool) -> None:
    """Log one record per level and a failed item the way a batch loop does, under a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=2, desc="probe", unit="item")
    logger.debug("debug detail")
    logger.info("info message")
    try:
        raise ValueError("pixels unreadable")
    except ValueError as e:
        logger.debug("item slide7 failed", exc_info=True)  # the traceback: for the log
        click.echo(f"slide7 failed: {e}")  # the one-line reason: the human output
    bar.update()
    logger.warning("warning message")
    bar.update()
    bar.close()
    if fail:
        raise HistoError("probe.yaml: key 'x': must be positive")


@pytest.fixture(autouse=True)
def probe_command(monkeypatch):
    monkeypatch.setitem(sys.modules["histo.cli"].COMMANDS, "probe", f"{__name__}:probe")
    yield
    close_logging()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_default_shows_info_and_warnings_but_no_debug():
    r = invoke("probe")
    assert r.exit_code == 0, r.output
    lines = re.split(r"[\r\n]", r.stderr)
    assert "info message" in lines and "warning: warning message" in lines
    assert "debug detail" not in r.stderr and "Traceback" not in r.output
    assert r.stdout == "slide7 failed: pixels unreadable\n"


def test_quiet_shows_only_warnings():
    r = invoke("-q", "probe")
    assert r.exit_code == 0, r.output
    assert "warning: warning message" in r.stderr
    assert "info message" not in r.stderr and "debug detail" not in r.stderr


def test_verbose_shows_debug_with_the_traceback():
    r = invoke("--verbose", "probe")
    assert r.exit_code == 0, r.output
    assert "debug: pathology.probe: debug detail" in r.stderr and "info message" in r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: pixels unreadable" in r.stderr


def test_verbose_and_quiet_exclude_each_other():
    r = invoke("-v", "-q", "probe")
    assert r.exit_code == 2 and "--verbose and --quiet exclude each other" in r.stderr


def test_log_file_keeps_every_record_with_timestamps_and_the_traceback(tmp_path):
    log = tmp_path / "run.log"
    r = invoke("-q", "--log-file", str(log), "probe")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "debug detail" not in r.stderr  # the terminal stays quiet
    text = log.read_text()
    for level, message in [
        ("DEBUG", "debug detail"),
        ("INFO", "info message"),
        ("WARNING", "warning message"),
    ]:
        assert re.search(rf"^{STAMP} {level} +\[\d+\] pathology\.probe: {message}$", text, re.M), message
    assert re.search(
        rf"^{STAMP} DEBUG +\[\d+\] pathology\.probe: item slide7 failed\nTraceback \(most recent call last\):\n"
        r"(.*\n)+ValueError: pixels unreadable$",
        text,
        re.M,
    )
    assert re.search(
        rf"^{STAMP} DEBUG +\[\d+\] histo\.cli: histo {re.escape(histo.__version__)} in ", text, re.M
    )
    assert "\r" not in text and "%|" not in text  # no progress bar in the file


def test_log_file_is_appended(tmp_path):
    log = tmp_path / "run.log"
    for _ in range(2):
        assert invoke("--log-file", str(log), "probe").exit_code == 0
    assert log.read_text().count("pathology.probe: info message") == 2


def test_messages_never_share_a_line_with_the_progress_bar():
    r = invoke("probe")
    # tqdm.write lifts the bar: the message is a line of its own, not appended to the bar's text
    segments = re.split(r"[\r\n]", r.stderr)
    assert "warning: warning message" in segments and "info message" in segments
    assert any(s.startswith("probe: ") for s in segments)  # the bar was drawn on the same stream


def test_histo_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path):
    log = tmp_path / "run.log"
    r = invoke("-q", "--log-file", str(log), "probe", "--fail")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1] == "error: probe.yaml: key 'x': must be positive"
    assert "Traceback" not in r.output
    text = log.read_text()
    assert re.search(
        rf"^{STAMP} ERROR +\[\d+\] histo\.cli: probe\.yaml: key 'x': must be positive$", text, re.M
    )
    assert "histo.errors.HistoError: probe.yaml: key 'x': must be positive" in text


def test_a_log_file_that_cannot_be_opened_is_a_one_line_error(tmp_path):
    bad = tmp_path / "missing-dir" / "run.log"
    r = invoke("--log-file", str(bad), "probe")
    assert (
        r.exit_code == 2
        and r.stderr == f"error: {bad}: cannot open the log file (No such file or directory)\n"
    )


def test_setup_replaces_the_previous_handlers_and_close_removes_them(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    setup_logging(0, tmp_path / "a.log")
    setup_logging(1, tmp_path / "b.log")
    assert len(root.handlers) == len(before) + 2
    logger.debug("only in b")
    close_logging()
    assert root.handlers == before and logging.getLogger("pathology").level == logging.NOTSET
    assert "only in b" not in (tmp_path / "a.log").read_text()
    assert "only in b" in (tmp_path / "b.log").read_text()
    with pytest.raises(ValueError, match="verbosity"):
        setup_logging(2)


def test_a_spawned_worker_logs_to_the_same_file(tmp_path):
    log = tmp_path / "run.log"
    setup_logging(-1, log)
    settings = worker_settings()
    assert settings == (-1, str(log))
    with ProcessPoolExecutor(
        1, mp_context=get_context("spawn"), initializer=init_worker, initargs=(settings,)
    ) as pool:
        pool.submit(logging.getLogger("segmentation.worker").debug, "from the worker").result()
    close_logging()
    assert worker_settings() is None
    assert re.search(
        rf"^{STAMP} DEBUG +\[\d+\] segmentation\.worker: from the worker$", log.read_text(), re.M
    )


def _corrupt_copy(good: Path, bad: Path) -> None:
    """`bad`: `good` with two level-0 JPEG tiles overwritten by noise (opens, fails while reading)."""
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        page = tif.pages[0]
        tiles = list(zip(page.dataoffsets[:2], page.databytecounts[:2], strict=True))
    rng = np.random.default_rng(0)
    for offset, size in tiles:
        data[offset : offset + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    bad.write_bytes(bytes(data))


def test_tile_with_a_corrupt_slide_shows_its_reason_and_no_traceback(tmp_path):
    slides = tmp_path / "slides"
    good = write_synthetic_slide(slides / "good.svs", 1500, 1000, 0, seed=0)
    _corrupt_copy(good, slides / "corrupt.svs")
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "histo.cli", "--log-file", str(log), "tile", str(slides)]
    cmd += ["--out", str(tmp_path / "s.zarr"), "--tile-px", "224"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:-1]}
    assert rows["good"].split()[1] == "done"
    assert rows["corrupt"].split()[1] == "failed" and "read error" in rows["corrupt"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert re.search(rf"^{STAMP} DEBUG +\[\d+\] histo\.cli: histo .* tile ", log.read_text(), re.M)
