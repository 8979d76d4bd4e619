"""Where log records go when `histo` runs: the terminal (stderr, one line, beside the progress bars) and,
with `--log-file`, every record from DEBUG up with timestamps and tracebacks.

Library modules only call `logging.getLogger(__name__)`; the CLI calls `setup_logging` once per run.
"""

from __future__ import annotations

import logging
import os
import sys

from histo.errors import HistoError

PACKAGES = ("histo", "pathology", "search", "segmentation")  # the project's top-level loggers
VERBOSITY = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # --quiet, default, --verbose
FILE_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"
PREFIX = {logging.DEBUG: "debug: ", logging.INFO: "", logging.WARNING: "warning: "}  # above: "error: "

_handlers: list[logging.Handler] = []
_settings: tuple[int, str | None] | None = None


class TerminalFormatter(logging.Formatter):
    """`warning: message` (the level as a prefix, the logger's name for debug records); the traceback
    of a record only when the user asked for debug output."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        prefix = PREFIX.get(record.levelno, "error: " if record.levelno > logging.WARNING else "")
        name = f"{record.name}: " if record.levelno <= logging.DEBUG else ""
        text = f"{prefix}{name}{record.getMessage()}"
        if self.tracebacks and record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class TqdmHandler(logging.Handler):
    """Writes to the current stderr through `tqdm.write`, which lifts open progress bars above the line
    and redraws them below it, so bars and messages never share a line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(verbosity: int = 0, log_file: str | os.PathLike | None = None) -> None:
    """Send the project's records of level `VERBOSITY[verbosity]` and up to the terminal, and all of them
    (DEBUG up) appended to `log_file`; replaces any earlier setup. Other libraries' warnings go to both."""
    if verbosity not in VERBOSITY:
        raise ValueError(f"verbosity must be one of {sorted(VERBOSITY)}, got {verbosity!r}")
    close_logging()
    terminal = TqdmHandler(VERBOSITY[verbosity])
    terminal.setFormatter(TerminalFormatter(tracebacks=verbosity > 0))
    _install(terminal)  # first: a log file that cannot be opened is then reported like any other error
    if log_file is not None:
        try:
            file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as e:
            raise HistoError(f"{log_file}: cannot open the log file ({e.strerror or e})") from None
        file.setLevel(logging.DEBUG)
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        _install(file)
    level = logging.DEBUG if log_file is not None else VERBOSITY[verbosity]
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    global _settings
    _settings = (verbosity, None if log_file is None else os.fspath(log_file))


def _install(handler: logging.Handler) -> None:
    logging.getLogger().addHandler(handler)
    _handlers.append(handler)


def close_logging() -> None:
    """Remove and close the handlers `setup_logging` installed (the log file is flushed and closed)."""
    global _settings
    root = logging.getLogger()
    while _handlers:
        handler = _handlers.pop()
        root.removeHandler(handler)
        handler.close()
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.NOTSET)
    _settings = None


def worker_settings() -> tuple[int, str | None] | None:
    """The arguments of the active `setup_logging` call (None without one), to hand to a worker process."""
    return _settings


def init_worker(settings: tuple[int, str | None] | None) -> None:
    """Route a spawned worker's records like its parent's: `ProcessPoolExecutor(initializer=init_worker,
    initargs=(worker_settings(),))`; does nothing when the parent set up no logging."""
    if settings is not None:
        setup_logging(*settings)
