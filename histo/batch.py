"""One outcome record and one runner for every batch command: tile, index feature extraction, segment
predict, segment eval and robustness cells.

Vocabulary. Every item of a batch ends as exactly one `Outcome`, whose status is
    done      processed in this run;
    skipped   not processed: complete from an earlier run (reason "already done"), or nothing to do for
              it (the reason says why, e.g. a case without a label map in `segment eval`);
    failed    a fault in the item's data (reason: what, in one line).
`Outcome.to_dict()` is the one JSON shape, `{"id", "path", "status", "reason", "detail"}`, where `detail`
holds the command's own fields. `BatchSummary` adds the counts, the summary line
`12 done, 1 skipped, 2 failed -> OUT` and the exit code: 0 when every item is done or skipped, 1 when
any failed. A user mistake found before any work (bad option or config, no input found) is a
`histo.errors.HistoError`, which the CLI prints as one line with exit code 2.

The runner, `run_batch`:
- shard (i, n) keeps the items at positions k with k % n == i of the list as given; callers pass a
  sorted list, so a shard's share depends only on the inputs, never on what earlier runs finished;
- resume: `is_done(item)` returns the detail of an item complete from an earlier run (reported as
  skipped, "already done", and not processed) or None (processed);
- progress: a tqdm bar on stderr over the items to process;
- workers > 1 processes items in spawned processes (`process` and the items must pickle); a worker
  that dies (a crash in a C library, out of memory) fails only its own item.

Exception policy: what is a bad item, and what is a bug.
- An exception of `ITEM_ERRORS` raised by `process(item)` is a fault of that item's data. The item is
  recorded `failed` with the exception's one-line message (`reason_of`), a warning names it, its
  traceback goes to this module's logger at DEBUG (the log file, `--verbose`), and the batch goes on.
  `ITEM_ERRORS` is:
    `histo.errors.HistoError` (InputFileError, ConfigError, ...): the domain readers turn the read
      errors of their libraries into InputFileError naming the file (OpenSlide in pathology/slide.py,
      nibabel in segmentation/data.py, zarr in search/features.py);
    `OSError`: the file system refused a read or a write (a vanished or unreadable file, a permission,
      a full disk).
  An unreadable input (a permission, a vanished file) is such a fault.
- What is wrong with the environment rather than with one item stops the batch: an OSError for a full
  disk or quota (ENOSPC, EDQUOT) or a read-only file system (EROFS) anywhere, one refusing a write
  under the run's `outputs` (EACCES, EPERM, ENOTDIR: `--out` or `--qc-dir` not writable), or an
  `EnvironmentFault` raised by `process`. No outcome is recorded for the item (it is not at fault),
  no other item starts, and `BatchStopped` is raised carrying the summary of what finished (its extra:
  `stopped`, the reason, and `not_processed`); the CLI prints that summary (and its JSON under --json),
  then the one-line reason, and exits 3. Items still running in other workers finish, and a re-run
  after the fix resumes.
- Anything else (TypeError, AttributeError, KeyError, AssertionError, ValueError, ...) is a bug. It is
  re-raised at once with its traceback and no outcome is recorded for the item; `process` writes its
  outputs atomically, so nothing half-written remains, items finished before keep their outputs, and
  re-running after the fix resumes. KeyboardInterrupt stops the batch the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

from histo.errors import HistoError, InputFileError

log = logging.getLogger(__name__)

Status = Literal["done", "skipped", "failed"]
STATUSES: tuple[Status, ...] = ("done", "skipped", "failed")
ALREADY_DONE = "already done"
ITEM_ERRORS: tuple[type[BaseException], ...] = (HistoError, OSError)
WORKER_DIED = "the worker process died while processing it (a crash or out of memory)"
MAX_REASON = 500  # characters of a reason; the full message stays in the debug log
ANYWHERE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # the environment wherever they happen
OUTPUT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR})  # the environment under the outputs


@dataclass(frozen=True)
class Outcome:
    """What became of one item: its id and path, status, reason (skipped and failed) and detail."""

    id: str
    path: str | None
    status: Status
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "done" and self.reason is not None:
            raise ValueError(f"a done item has no reason, got {self.reason!r}")
        if self.status != "done" and not (isinstance(self.reason, str) and self.reason.strip()):
            raise ValueError(f"a {self.status} item needs a reason")
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))

    @classmethod
    def done(cls, id: str, path: str | os.PathLike | None, **detail: Any) -> Outcome:
        return cls(id, path, "done", None, detail)  # type: ignore[arg-type]

    @classmethod
    def skipped(cls, id: str, path: str | os.PathLike | None, reason: str, **detail: Any) -> Outcome:
        return cls(id, path, "skipped", reason, detail)  # type: ignore[arg-type]

    @classmethod
    def failed(cls, id: str, path: str | os.PathLike | None, reason: str, **detail: Any) -> Outcome:
        return cls(id, path, "failed", reason, detail)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The one JSON shape of an item, the same in every command."""
        return {
            "id": self.id,
            "path": self.path,
            "status": self.status,
            "reason": self.reason,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class BatchSummary:
    """The outcomes of one run with where they went (`out`), the shard, and the command's extras."""

    outcomes: tuple[Outcome, ...]
    out: str | None = None
    shard: tuple[int, int] = (0, 1)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = set(self.extra) & {"out", "shard", "counts", "outcomes"}
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would hide the batch's own")
        object.__setattr__(self, "outcomes", tuple(self.outcomes))
        if self.out is not None:
            object.__setattr__(self, "out", os.fspath(self.out))

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(o.status == s for o in self.outcomes) for s in STATUSES}

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def summary_line(self) -> str:
        """`12 done, 1 skipped, 2 failed -> OUT`: the last line every batch command prints."""
        c = self.counts
        line = f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
        return line if self.out is None else f"{line} -> {self.out}"

    def exit_code(self) -> int:
        """0 when every item is done or skipped, 1 when any failed."""
        return 1 if self.counts["failed"] else 0

    def with_extra(self, **extra: Any) -> BatchSummary:
        return replace(self, extra={**self.extra, **extra})

    def to_dict(self) -> dict[str, Any]:
        """`{"out", "shard", "counts", ...extras, "outcomes": [Outcome.to_dict()]}`."""
        return {
            "out": self.out,
            "shard": list(self.shard),
            "counts": self.counts,
            **self.extra,
            "outcomes": [o.to_dict() for o in self.outcomes],
        }


class EnvironmentFault(HistoError):
    """Something wrong with where the batch runs, not with an item (disk full, output not writable)."""


class BatchStopped(HistoError):
    """A batch stopped by its environment: `reason` in one line and the `summary` of what finished."""

    def __init__(self, reason: str, summary: BatchSummary) -> None:
        done = summary.counts["done"]
        super().__init__(
            f"{reason}; the run stopped ({done} done and kept, {summary.extra['not_processed']} not "
            "processed; re-run to resume after fixing it)"
        )
        self.reason = reason
        self.summary = summary


def _under(path: str | os.PathLike, folders: Sequence[str | os.PathLike]) -> bool:
    p = os.path.abspath(path)
    return any(os.path.commonpath([p, os.path.abspath(f)]) == os.path.abspath(f) for f in folders)


def environment_fault(exc: BaseException, outputs: Sequence[str | os.PathLike] = ()) -> str | None:
    """The one-line reason when `exc` is the environment's fault rather than an item's, else None."""
    if isinstance(exc, EnvironmentFault):
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    where = exc.filename if isinstance(exc.filename, (str, os.PathLike)) else None
    anywhere = exc.errno in ANYWHERE_ERRNOS
    if not anywhere and not (exc.errno in OUTPUT_ERRNOS and where is not None and _under(where, outputs)):
        return None
    text = exc.strerror or str(exc)
    return f"{os.fspath(where)}: {text}" if where is not None else text


class Item(Protocol):
    """What the runner needs of an item: an id and the path of its input (None when it has none)."""

    @property
    def id(self) -> str: ...

    @property
    def path(self) -> str | os.PathLike | None: ...


T = TypeVar("T", bound=Item)


def select_shard(items: Sequence[T], shard: tuple[int, int]) -> list[T]:
    """The share (i, n) of `items`: those at positions k with k % n == i."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise HistoError(f"shard {index}/{count}: need 0 <= I < N")
    return [item for k, item in enumerate(items) if k % count == index]


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def reason_of(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """The one-line reason of an item's fault; the item's own path is not repeated."""
    if isinstance(exc, InputFileError) and path is not None and _same_path(exc.path, path):
        text = exc.reason
    else:
        text = str(exc)
    if not isinstance(exc, HistoError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:MAX_REASON]


def _attempt(
    process: Callable[[T], Outcome], item: T, outputs: Sequence[str | os.PathLike] = ()
) -> tuple[Outcome, str | None]:
    """process(item), or its fault as a failed outcome with the traceback text (runs in a worker too);
    a fault of the environment is re-raised."""
    try:
        outcome = process(item)
    except ITEM_ERRORS as e:
        if environment_fault(e, outputs) is not None:
            raise
        return Outcome.failed(item.id, item.path, reason_of(e, item.path)), traceback.format_exc()
    if not isinstance(outcome, Outcome):
        raise TypeError(f"process must return an Outcome, got {type(outcome).__name__}")
    return outcome, None


def run_batch(
    items: Sequence[T],
    process: Callable[[T], Outcome],
    *,
    shard: tuple[int, int] = (0, 1),
    is_done: Callable[[T], Mapping[str, Any] | None] | None = None,
    on_outcome: Callable[[T, Outcome], None] | None = None,
    workers: int = 1,
    desc: str = "batch",
    unit: str = "item",
    progress: bool = True,
    outputs: Sequence[str | os.PathLike | None] = (),
) -> list[Outcome]:
    """Run `process` over the shard's items; one Outcome per item, in the items' order.

    `is_done(item)`: the detail of an item complete from an earlier run (skipped, "already done") or
    None. `on_outcome(item, outcome)` runs in this process after each item (skipped ones first), e.g.
    to save progress. `outputs`: the folders the batch writes (the first is its `out`; None entries are
    ignored), where a refused write is the environment's fault. See the module docstring for the
    exception policy (BatchStopped).
    """
    from tqdm import tqdm

    mine = select_shard(items, shard)
    outcomes: list[Outcome | None] = [None] * len(mine)
    folders = [os.fspath(f) for f in outputs if f is not None]
    attempt = partial(_attempt, process, outputs=folders)

    def record(k: int, outcome: Outcome, trace: str | None) -> None:
        if trace is not None:
            log.debug("%s %s failed:\n%s", desc, mine[k].id, trace)
        if outcome.status == "failed":
            log.warning("%s: %s failed: %s", desc, outcome.id, outcome.reason)
        outcomes[k] = outcome
        if on_outcome is not None:
            on_outcome(mine[k], outcome)

    try:
        todo = []
        for k, item in enumerate(mine):
            detail = is_done(item) if is_done is not None else None
            if detail is None:
                todo.append(k)
            else:
                record(k, Outcome.skipped(item.id, item.path, ALREADY_DONE, **detail), None)
        with tqdm(total=len(todo), desc=desc, unit=unit, disable=not progress) as bar:
            if workers <= 1 or len(todo) <= 1:
                for k in todo:
                    bar.set_postfix_str(mine[k].id, refresh=False)
                    record(k, *attempt(mine[k]))
                    bar.update()
            else:
                _in_pool(todo, workers, mine, attempt, record, bar)
                # A dead worker breaks the whole pool: retry the rest one process each, so only the item
                # that kills its own process is failed.
                for k in [k for k in todo if outcomes[k] is None]:
                    _in_pool([k], 1, mine, attempt, record, bar)
                    if outcomes[k] is None:
                        record(k, Outcome.failed(mine[k].id, mine[k].path, WORKER_DIED), None)
                        bar.update()
    except ITEM_ERRORS as e:
        reason = environment_fault(e, folders)
        if reason is None:
            raise
        finished = tuple(o for o in outcomes if o is not None)
        extra = {"stopped": reason, "not_processed": len(mine) - len(finished)}
        summary = BatchSummary(finished, out=folders[0] if folders else None, shard=shard, extra=extra)
        raise BatchStopped(reason, summary) from e
    return [o for o in outcomes if o is not None]


def _in_pool(
    todo: list[int],
    workers: int,
    items: Sequence[T],
    attempt: Callable[[T], tuple[Outcome, str | None]],
    record: Callable[[int, Outcome, str | None], None],
    bar: Any,
) -> None:
    """Run the items `todo` in a spawned process pool; stops quietly when a worker dies (those items
    stay unrecorded); a bug in a worker cancels the items not started and is re-raised here; a fault
    of the environment cancels them too, records the items still running as they end, then is re-raised."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    from histo.log import worker_settings

    # Workers log like the parent (terminal level and --log-file), so their records are not lost, and
    # end when it does.
    context = get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(), worker_settings())
    ) as pool:
        futures = {pool.submit(attempt, items[k]): k for k in todo}
        fault: BaseException | None = None
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    outcome, trace = future.result()
                except BrokenProcessPool:
                    continue
                except ITEM_ERRORS as e:  # `attempt` re-raises only the environment's faults
                    fault = fault or e
                    for other in futures:
                        other.cancel()
                    continue
                record(futures[future], outcome, trace)
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if fault is not None:
        raise fault


def _init_worker(parent: int, log_settings: tuple[int, str | None] | None) -> None:
    """Set up a spawned worker: log like its parent, and end with it (histo.log, `end_with_parent`)."""
    from histo.log import init_worker

    end_with_parent(parent)
    init_worker(log_settings)


def end_with_parent(parent: int) -> None:
    """Make this process end when `parent` does, even when it is killed with SIGKILL: on Linux the
    kernel sends SIGTERM (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread checks every half second."""
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
