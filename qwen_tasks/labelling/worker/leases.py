"""Leases and signals: what lets a worker be stopped or killed at any point without losing a job.

A job is held under a lease that `LeaseKeeper` extends while the job is worked on (so a lease can be
short and a dead worker's job is taken over quickly); SIGTERM raises `Terminated`, or with a `StopFlag`
(`work --follow`) asks the worker to finish its current job first (`signals_handled`). Whatever stops a
worker, the job in hand is given back without using an attempt (the loop and the stages do that).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs
from qwen_tasks.records import JobStatus

log = logging.getLogger(__name__)


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the work
    """SIGTERM (Airflow, `docker stop`, Kubernetes): stop now, give the job in hand back, exit 143."""


def why(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    return type(exc).__name__


def default_worker_id() -> str:
    """host:pid:random — unique per process, readable in `runs` and in pg_stat_activity investigations."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LeaseKeeper:
    """Heartbeat thread: extends a job's lease every lease/3 seconds while the job is processed.

    Lets the lease be short (a dead worker's job is taken over quickly) while a live worker can spend as
    long as it needs on a batch. `lost` becomes True when the lease was taken over; database errors in
    the heartbeat are logged and tried again at the next beat (the lease has slack for two misses).
    """

    def __init__(self, engine: Engine, job_id: int, worker_id: str, lease_seconds: float) -> None:
        self.engine, self.job_id, self.worker_id = engine, job_id, worker_id
        self.lease_seconds = lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def _beat(self) -> None:
        interval = max(self.lease_seconds / 3.0, 0.05)
        while not self._stop.wait(interval):
            if not self.beat():
                return

    def beat(self) -> bool:
        """Extend the lease once; False when there is nothing left to keep (lost, or finished by us)."""
        try:
            if jobs.extend_lease(self.engine, self.job_id, self.worker_id, self.lease_seconds):
                return True
            # Not running under our lease any more. Our own commit (done, or released after an error)
            # may have just won the race with this beat: that is no lost lease.
            state = jobs.job_state(self.engine, self.job_id)
            if state["lease_owner"] == self.worker_id and state["status"] != JobStatus.RUNNING:
                return False
            self.lost = True
            log.warning(
                "job %s: lease lost (taken over by %s)", self.job_id, state["lease_owner"] or "nobody"
            )
            return False
        except Exception as exc:  # keep beating; the write transaction re-checks the lease anyway
            log.warning("job %s: lease heartbeat failed: %s", self.job_id, jobs._short(exc))
            return True

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class StopFlag:
    """Set (by a SIGTERM handler, a test) to make a worker stop after the job in hand."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None


@contextmanager
def signals_handled(stop: StopFlag | None = None) -> Iterator[StopFlag]:
    """SIGTERM handling for a worker process (CLI only: inside Airflow, the task runner owns signals).

    Without `stop`, SIGTERM raises Terminated at once: the job in hand is given back (attempt not
    counted) and the command exits 143. With `stop` (`work --follow`), the first SIGTERM asks the worker
    to finish its current job and stop; a second one interrupts like the first case."""
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    def drain(signum: int, frame: Any) -> None:
        assert stop is not None
        stop.reason = "SIGTERM"
        log.warning("SIGTERM: finishing the current job, then stopping (send it again to stop now)")
        signal.signal(signal.SIGTERM, interrupt)

    signal.signal(signal.SIGTERM, drain if stop is not None else interrupt)
    try:
        yield stop if stop is not None else StopFlag()
    finally:
        signal.signal(signal.SIGTERM, previous)
