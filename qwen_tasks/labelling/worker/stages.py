"""One claimed job through its stages: read (audio, resampling, features), model, write.

`process_job` runs the stages of one job one after the other (`QWEN_TASKS_OVERLAP=0`); `Overlapped` runs
the read of job k+1, the model on job k and the write of job k-1 at once, each job keeping its own lease
from its claim to its write. A job-level error (model crash, storage missing) releases the job with the
error stored: pending again, or failed once its attempts are used up; SIGTERM / Ctrl-C give it back
without using an attempt. `check_backend` refuses a model or prompt other than the run was planned for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.worker import results
from qwen_tasks.labelling.worker.leases import LeaseKeeper, StopFlag, why
from qwen_tasks.labelling.worker.results import LeaseLost, Rows, WriteFailed, build_rows, load_clips
from qwen_tasks.labelling.worker.summary import JobOutcome
from qwen_tasks.records import AudioClip, JobOutcomeStatus, JobStatus, LabelRequest, ModelInfo, RunStatus

log = logging.getLogger(__name__)


def check_backend(run: jobs.RunInfo, backend: Backend) -> ModelInfo:
    """Refuse to label a run with another model or prompt than it was planned for (labels would lie)."""
    from qwen_tasks.labelling.backends import model_info

    info = model_info(backend, run.request)
    planned = (run.model, run.revision, run.prompt_version)
    if (info.model, info.revision, info.prompt_version) != planned:
        raise ModelError(
            f"run {run.id} was planned for model {run.model!r} revision {run.revision!r} prompt "
            f"{run.prompt_version!r}, but this worker has {info.model!r} revision {info.revision!r} "
            f"prompt {info.prompt_version!r}"
        )
    return info


def process_job(
    engine: Engine,
    job: jobs.Job,
    backend: Backend,
    *,
    worker_id: str,
    lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
) -> JobOutcome:
    """Label one job we hold end to end and return what happened; never raises for a bad clip or a model
    error. The run is checked against the backend (and started); a job-level error releases the job (see
    the module). Only `ModelError` for a wrong model, lost databases and interruptions propagate."""
    run = jobs.get_run(engine, job.run_id)
    info = check_backend(run, backend)
    if run.status == RunStatus.PLANNED:
        jobs.start_run(engine, run.id, info)
    flight = Flight(job, run.request, LeaseKeeper(engine, job.id, worker_id, lease_seconds))
    try:
        with flight.keeper:
            read_stage(engine, flight, backend)
            model_stage(flight, backend)
            outcome = write_stage(engine, flight, worker_id)
    except WriteFailed:
        raise  # released above, its attempt counted
    except BaseException as exc:  # Ctrl-C / SIGTERM: give the job back at once, attempt not counted
        jobs.give_back(engine, job, worker_id, f"worker interrupted ({why(exc)})")
        raise
    if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
        # after the commit: the last job to finish closes the run (see finish_run_if_complete)
        jobs.finish_run_if_complete(engine, run.id)
    return outcome


@dataclass
class Flight:
    """One claimed job on its way through the stages: read (audio, resampling, features), model, write.

    The serial path (`process_job`) runs the stages one after the other; the overlapped worker
    (`Overlapped`) runs the read of job k+1, the model on job k and the write of job k-1 at once. A
    stage that fails records its error here and the write stage releases the job with it."""

    job: jobs.Job
    request: LabelRequest
    keeper: LeaseKeeper
    start: float = field(default_factory=time.perf_counter)
    run: jobs.RunInfo | None = None
    items: list[jobs.JobItem] = field(default_factory=list)
    clips: list[AudioClip] = field(default_factory=list)
    load_failures: dict[int, str] = field(default_factory=dict)
    prepared: Any = None
    rows: Rows | None = None
    error: str | None = None


def read_stage(engine: Engine, flight: Flight, backend: Backend) -> None:
    """The job's items, its audio decoded and resampled, and (for a backend with `prepare`) its model
    inputs, log-mel features included, made ready on the model's device."""
    try:
        job = flight.job
        flight.items = jobs.retry_db(lambda: _items(engine, job.id), what=f"read job {job.id}")
        flight.clips, flight.load_failures = load_clips(flight.items)
        prepare = getattr(backend, "prepare", None)
        if flight.clips and callable(prepare) and callable(getattr(backend, "label_prepared", None)):
            flight.prepared = prepare(flight.clips, flight.request)
    except Exception as exc:
        flight.error = f"{type(exc).__name__}: {exc}"


def model_stage(flight: Flight, backend: Backend) -> None:
    """The model on the job's clips, and the results turned into rows."""
    if flight.error is not None:
        return
    try:
        clips, request = flight.clips, flight.request
        if flight.prepared is not None:
            results = backend.label_prepared(flight.prepared)  # type: ignore[attr-defined]
        else:
            results = backend.label(clips, request) if clips else []
        flight.prepared = None  # the features are not needed any more
        if len(results) != len(clips):
            raise ModelError(f"backend returned {len(results)} results for {len(clips)} clips")
        flight.rows = build_rows(flight.job, request, flight.items, clips, results, flight.load_failures)
        flight.clips = []
    except Exception as exc:
        flight.error = f"{type(exc).__name__}: {exc}"


def write_stage(engine: Engine, flight: Flight, worker_id: str) -> JobOutcome:
    """The job's one transaction (results + done mark, under the lease), or the job released with the
    error of an earlier stage; run while the job's lease is still kept."""
    job, start = flight.job, flight.start
    outcome = JobOutcome(
        job.id, job.run_id, JobOutcomeStatus.RETRY, claim_seconds=job.claim_seconds, attempt=job.attempts
    )
    if flight.error is not None or flight.rows is None:
        error = flight.error or "no results"
        log.warning("job %s attempt %d failed: %s", job.id, job.attempts, error)
        status = jobs.release_job(engine, job, worker_id, error)
        return _replace(outcome, status=_release_status(status), error=error, start=start)
    rows = flight.rows
    if flight.keeper.lost:
        return _replace(outcome, status=JobOutcomeStatus.LOST, error="lease taken over", start=start)
    elapsed = time.perf_counter() - start
    try:
        labelled, failed, seconds = jobs.retry_db(
            lambda: results.write_results(engine, job, worker_id, rows, elapsed),
            what=f"write job {job.id}",
            attempts=results.WRITE_ATTEMPTS,
        )
    except LeaseLost as exc:
        state = jobs.job_state(engine, job.id)
        if state["status"] == JobStatus.DONE and state["lease_owner"] == worker_id:
            # our commit went through but its acknowledgement was lost with the connection
            labelled_ids = {r["audio_id"] for r in (*rows.transcription, *rows.cry_answer)}
            return _replace(
                outcome,
                status=JobOutcomeStatus.DONE,
                labelled=len(labelled_ids),
                failed=len(rows.failure),
                audio_seconds=sum(rows.durations.get(a, 0.0) for a in labelled_ids),
                start=start,
            )
        return _replace(outcome, status=JobOutcomeStatus.LOST, error=str(exc), start=start)
    except Exception as exc:
        if jobs.is_connection_error(exc):
            # The database stayed away through every retry: this attempt is used up (counted,
            # like any job-level error), and the worker stops with the error.
            error = f"could not store results: database unreachable: {jobs._short(exc)}"
            log.warning("job %s attempt %d: %s", job.id, job.attempts, error)
            try:
                jobs.release_job(engine, job, worker_id, error)
            except Exception:  # still down: the lease runs out and the next claim counts it
                log.warning("job %s: could not release it either; its lease will run out", job.id)
            raise WriteFailed(f"job {job.id}: {error}") from exc
        error = f"could not store results: {type(exc).__name__}: {jobs._short(exc)}"
        log.warning("job %s attempt %d: %s", job.id, job.attempts, error)
        status = jobs.release_job(engine, job, worker_id, error)
        return _replace(outcome, status=_release_status(status), error=error, start=start)
    return _replace(
        outcome,
        status=JobOutcomeStatus.DONE,
        labelled=labelled,
        failed=failed,
        audio_seconds=seconds,
        start=start,
    )


def _items(engine: Engine, job_id: int) -> list[jobs.JobItem]:
    with engine.connect() as conn:
        return jobs.job_items(conn, job_id)


def _release_status(status: str | None) -> JobOutcomeStatus:
    """The outcome of a released job from its new label_job.status (None: it was not ours any more)."""
    outcome = {JobStatus.FAILED: JobOutcomeStatus.FAILED, JobStatus.PENDING: JobOutcomeStatus.RETRY}
    return JobOutcomeStatus.LOST if status is None else outcome.get(status, JobOutcomeStatus.RETRY)


def _replace(outcome: JobOutcome, *, start: float, **changes: Any) -> JobOutcome:
    return replace(outcome, process_seconds=time.perf_counter() - start, **changes)


class _Background:
    """`fn(*args)` in a daemon thread; `result()` waits for it (interruptible by SIGTERM in the main
    thread) and re-raises what it raised. Daemon: a worker stopping on SIGTERM does not wait for a batch
    still in the model (its job has been handed back already)."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._fn, self._args = fn, args
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> Any:
        while not self._done.wait(1.0):  # short waits: a signal handler runs between them at the latest
            pass
        if self._error is not None:
            raise self._error
        return self._value


class Overlapped:
    """The overlapped worker: while the model runs job k (a background thread), the next job k+1 is
    claimed, read, resampled and featurised (another thread) and the results of job k-1 are written (this
    thread, in their own transaction, as `process_job` writes them).

    The guarantees are those of the serial worker, job by job: each job keeps its own lease (heartbeat)
    from its claim to its write, and its results are written in the one transaction that checks the
    lease. At most one job is prefetched, and only when one is claimable now (a claim never waits), for
    the model already loaded; with `stop` set (first SIGTERM of `work --follow`) the prefetched job is
    handed back. On SIGTERM / Ctrl-C / a failed write every job held is given back (attempt not
    counted; a job released by a failed write keeps its counted attempt). Killed (SIGKILL), the leases
    run out and other workers take the jobs over, as for the serial worker."""

    def __init__(
        self,
        engine: Engine,
        backend: Backend,
        *,
        runs: jobs.RunSelector,
        model: tuple[str, str] | None,
        worker_id: str,
        lease_seconds: float,
        known: dict[int, jobs.RunInfo],
        record: Callable[[jobs.RunInfo, jobs.Job, JobOutcome], None],
        budget: int | None,
        stop: StopFlag | None,
    ) -> None:
        self.engine, self.backend, self.runs, self.model = engine, backend, runs, model
        self.worker_id, self.lease_seconds, self.known, self.record = worker_id, lease_seconds, known, record
        self.budget, self.stop = budget, stop
        self.held: list[Flight] = []
        self.opened = 0
        self.cancel = threading.Event()

    def _open(self, job: jobs.Job) -> Flight:
        """Start a claimed job: its run checked against the model (and started), its lease kept."""
        run = jobs.get_run(self.engine, job.run_id)
        info = check_backend(run, self.backend)
        if run.status == RunStatus.PLANNED:
            jobs.start_run(self.engine, run.id, info)
        self.known.setdefault(run.id, run)
        flight = Flight(
            job, run.request, LeaseKeeper(self.engine, job.id, self.worker_id, self.lease_seconds)
        )
        flight.run = run
        flight.keeper.__enter__()
        self.held.append(flight)
        self.opened += 1
        return flight

    def _prefetch(self) -> Flight | None:
        """Claim the next job if one is free now (never waiting), then read and featurise it."""
        if self.stop or self.cancel.is_set() or (self.budget is not None and self.opened >= self.budget):
            return None
        job = jobs.claim_job(self.engine, self.runs, self.worker_id, self.lease_seconds, model=self.model)
        if job is None:
            return None
        try:
            flight = self._open(job)
        except Exception as exc:  # the main loop claims it again and reports the problem (process_job)
            jobs.give_back(self.engine, job, self.worker_id, f"prefetch: {type(exc).__name__}: {exc}")
            return None
        if self.cancel.is_set():  # the worker is stopping: hand it back rather than read it
            return flight
        read_stage(self.engine, flight, self.backend)
        return flight

    def _finish(self, flight: Flight) -> None:
        """Write (or release) a job whose model stage is over, then stop its heartbeat."""
        try:
            outcome = write_stage(self.engine, flight, self.worker_id)
        finally:
            flight.keeper.__exit__(None, None, None)
        self.held.remove(flight)
        if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
            jobs.finish_run_if_complete(self.engine, flight.job.run_id)
        assert flight.run is not None
        self.record(flight.run, flight.job, outcome)

    def _hand_back(self, flight: Flight, reason: str) -> None:
        flight.keeper.__exit__(None, None, None)
        if flight in self.held:
            self.held.remove(flight)
        jobs.give_back(self.engine, flight.job, self.worker_id, reason)

    def run(self, first: jobs.Job) -> int:
        """Process `first` (claimed by the caller) and every job prefetched behind it; returns how many
        jobs were finished. Returns when no job could be prefetched (the caller claims or waits)."""
        done = 0
        prefetch: _Background | None = None
        try:
            current: Flight | None = self._open(first)
            assert current is not None
            read_stage(self.engine, current, self.backend)
            to_write: Flight | None = None
            while current is not None:
                model = _Background(f"model-{current.job.id}", model_stage, current, self.backend)
                prefetch = _Background("prefetch", self._prefetch)
                if to_write is not None:
                    self._finish(to_write)
                    done += 1
                    to_write = None
                model.result()
                to_write, current = current, prefetch.result()
                prefetch = None
                if current is not None and self.stop:
                    self._hand_back(current, f"worker stopping ({self.stop.reason})")
                    current = None
            if to_write is not None:
                self._finish(to_write)
                done += 1
        except BaseException as exc:
            self.cancel.set()
            if prefetch is not None and not prefetch.wait(60.0):  # mid-claim or mid-read: let it end
                log.warning("prefetch still busy; a job it claims now is taken over after its lease")
            for flight in list(self.held):
                self._hand_back(flight, f"worker stopped ({why(exc)})")
            raise
        return done
