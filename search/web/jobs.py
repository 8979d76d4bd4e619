"""Queries run in the background, one at a time, with progress the page shows while it waits.

One worker thread runs the queries in order (the index, its feature extractor and FAISS are used by one
query at a time); a page polls its job and shows the results when it is done. Finished jobs are kept in
memory (the most recent `keep`), never on disk: a query leaves nothing behind in the index or elsewhere.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histo.errors import HistoError

log = logging.getLogger("histo.serve")


@dataclass
class QuerySource:
    """What is searched: an indexed slide, a --slides-root file, or an uploaded patch."""

    kind: str  # "slide" | "file" | "patch"
    name: str  # slide ID, file key, or the upload's file name
    path: Path | None = None  # the slide file (slide, file)
    mpp: float | None = None  # the scale an indexed slide was tiled with (used when its file has none)
    rgb: np.ndarray | None = None  # the patch (patch), dropped once searched
    png: bytes | None = None  # the patch as the page shows it (long side at most DISPLAY_PX)
    size: tuple[int, int] | None = None  # the patch's width, height as uploaded


@dataclass
class QueryTiles:
    """The tiled query slide: level-0 x, y of its searched tiles and their side in level-0 pixels."""

    path: Path
    mpp: float
    coords: np.ndarray
    side: float


@dataclass
class Job:
    """One query, its progress and its outcome (`result` in the `histo search --json` shape)."""

    source: QuerySource
    k: int
    mode: str
    exclude_same_patient: bool = False
    exhaustive: bool = False
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"  # queued | running | done | failed
    stage: str = "waiting for the previous query"
    steps: tuple[int, int] = (0, 0)  # (done, total) of the current stage, when it counts
    result: dict[str, Any] | None = None
    error: str | None = None
    error_status: int | None = None  # HTTP status of a failure: 4xx for the query's input, 500 for a bug
    warnings: list[str] = field(default_factory=list)
    tiles: QueryTiles | None = None
    created: float = field(default_factory=time.time)
    seconds: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def progress(self, stage: str, steps: tuple[int, int] = (0, 0)) -> None:
        self.stage, self.steps = stage, steps

    def status(self) -> dict[str, Any]:
        """The job as `GET /api/jobs/{id}` reports it."""
        return {
            "id": self.id,
            "state": self.state,
            "stage": self.stage,
            "steps": list(self.steps),
            "query": self.source.name,
            "kind": self.source.kind,
            "error": self.error,
            "seconds": self.seconds,
        }


class JobQueue:
    """Runs jobs with `run(job)` on one worker thread; keeps the most recent `keep` jobs by ID.

    A HistoError ends a job with its message passed through `public` (which hides server paths).
    """

    def __init__(self, run: Callable[[Job], None], public: Callable[[str], str], keep: int = 200) -> None:
        self._run = run
        self._public = public
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="histo-query")

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                self._jobs.popitem(last=False)
        self._pool.submit(self._execute, job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def ahead_of(self, job: Job) -> int:
        """How many queued or running jobs were submitted before `job`."""
        with self._lock:
            before = []
            for other in self._jobs.values():
                if other is job:
                    break
                before.append(other)
        return sum(o.state in ("queued", "running") for o in before)

    def _execute(self, job: Job) -> None:
        start = time.perf_counter()
        job.state = "running"
        try:
            self._run(job)
            job.state = "done"
        except HistoError as e:
            job.state, job.error, job.error_status = "failed", self._public(str(e)), getattr(e, "status", 422)
        except Exception:  # a bug, not the user's input: the page gets one line, the log the traceback
            log.exception("query %s failed", job.id)
            job.state, job.error_status = "failed", 500
            job.error = "internal error while searching (the server log has the details)"
        finally:
            job.seconds = time.perf_counter() - start
            job.progress("done" if job.state == "done" else "failed")
            job.done.set()

    def close(self) -> None:
        """Drop queued jobs and let a running one finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)
