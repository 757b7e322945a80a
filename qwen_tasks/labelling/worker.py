"""Process labelling jobs: load a job's audio, ask the model, write results and the done mark together.

The one rule that makes workers crash-safe: a job's results, its failures, its "done" mark and the run's
counters are written in ONE transaction that first checks the lease is still ours. A worker killed at any
point therefore leaves either everything or nothing; the job's lease runs out and another worker redoes
it. Unique keys plus `ON CONFLICT DO NOTHING` make a replay harmless on top of that. A lost database
connection is retried with a fresh one (the model's output is kept in memory, not recomputed).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks.errors import (
    AudioError,
    ConfigError,
    DatabaseUnavailable,
    ModelError,
    QwenTasksError,
    StorageUnavailable,
    WrongEnvironment,
)
from qwen_tasks.labelling import jobs, planning
from qwen_tasks.labelling.answers import normalize_yes_no
from qwen_tasks.labelling.backends import check_environment
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.records import (
    FINISHED_JOB,
    UNFINISHED_JOB,
    AudioClip,
    ClipResult,
    JobOutcomeStatus,
    JobStatus,
    LabelRequest,
    ModelInfo,
    RunStatus,
)
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import cry_answer, label_failure, label_job, label_run, transcription

log = logging.getLogger(__name__)

# Tries of a job's result transaction when the connection drops (about 18 s of back-off in all).
WRITE_ATTEMPTS = 8


class AudioStorageUnavailable(QwenTasksError):
    """None of a job's files exists: storage is probably not mounted. Job-level, so the job is retried."""


class LeaseLost(QwenTasksError):
    """Our lease on a job ended and another worker took the job over; our results are discarded."""


class WriteFailed(DatabaseUnavailable):
    """A job's results could not be stored through every retry; the job was released (attempt counted)."""


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the work
    """SIGTERM (Airflow, `docker stop`, Kubernetes): stop now, give the job in hand back, exit 143."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    return type(exc).__name__


def real_time_factor(wall_seconds: float, audio_seconds: float) -> float | None:
    """Wall seconds per second of audio labelled (lower is faster); None before any audio is done."""
    return wall_seconds / audio_seconds if audio_seconds > 0 else None


@dataclass(frozen=True)
class JobOutcome:
    """What happened to one job (see JobOutcomeStatus: done, retry, failed, lost or skipped)."""

    job_id: int
    run_id: int
    status: JobOutcomeStatus
    labelled: int = 0
    failed: int = 0
    audio_seconds: float = 0.0  # audio seconds of the clips labelled
    process_seconds: float = 0.0
    claim_seconds: float = 0.0
    attempt: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkSummary:
    """What one worker did on one run (`qwen-tasks work --json` prints this)."""

    worker_id: str
    run_id: int | None  # the run worked on (None: several runs, see run_ids)
    run_ids: list[int] = field(default_factory=list)
    jobs_done: int = 0
    jobs_retried: int = 0
    jobs_failed: int = 0
    jobs_lost: int = 0
    labelled: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_load_seconds: float = 0.0
    model_loads: int = 0  # a worker loads each model it needs once (several only if its runs differ)
    claim_seconds: float = 0.0
    process_seconds: float = 0.0
    run_status: str | None = None
    errors: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)  # jobs this worker finished or failed, in order
    stopped: str | None = None  # why the worker stopped early (SIGTERM), None when it ran out of work

    @property
    def rtf(self) -> float | None:
        return real_time_factor(self.wall_seconds, self.audio_seconds)

    def add(self, outcome: JobOutcome) -> None:
        if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
            self.job_ids.append(outcome.job_id)
        if outcome.run_id not in self.run_ids:
            self.run_ids.append(outcome.run_id)
        counter = {
            JobOutcomeStatus.DONE: "jobs_done",
            JobOutcomeStatus.RETRY: "jobs_retried",
            JobOutcomeStatus.FAILED: "jobs_failed",
            JobOutcomeStatus.LOST: "jobs_lost",
        }
        if outcome.status in counter:
            setattr(self, counter[outcome.status], getattr(self, counter[outcome.status]) + 1)
        self.labelled += outcome.labelled
        self.failed += outcome.failed
        self.audio_seconds += outcome.audio_seconds
        self.claim_seconds += outcome.claim_seconds
        self.process_seconds += outcome.process_seconds
        if outcome.error and outcome.status in (JobOutcomeStatus.RETRY, JobOutcomeStatus.FAILED):
            self.errors.append(f"job {outcome.job_id}: {outcome.error}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rtf"] = self.rtf
        return out


# --- small pieces ----------------------------------------------------------------------------------------


def default_worker_id() -> str:
    """host:pid:random — unique per process, readable in `runs` and in pg_stat_activity investigations."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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


def load_clips(items: Sequence[jobs.JobItem]) -> tuple[list[AudioClip], dict[int, str]]:
    """Decode a job's audio; returns the clips and, per audio id that could not be read, why.

    Each audio is tried at each of its ok paths (the same bytes may live at several). A file that is no
    longer what ingest recorded (size, mtime, real location under its allowed root: audio_files.load_ingested)
    is not used (its label would describe other audio, or audio that may not be read). When no file of
    the job exists at all, storage is most likely missing (unmounted disk): that is raised as
    AudioStorageUnavailable so the job is retried rather than every clip marked failed.
    """
    # imported here: the audio decoders load only in a process that decodes audio, not for every CLI command
    from qwen_tasks.ingest.audio_files import load_ingested

    clips: list[AudioClip] = []
    failures: dict[int, str] = {}
    missing_only = 0
    for item in items:
        reasons: list[str] = []
        missing = 0
        for recorded in item.paths:
            try:
                waveform = load_ingested(recorded)  # refuses a file that is no longer what ingest admitted
            except StorageUnavailable as exc:  # the bucket cannot be reached: retry the job, fail no clip
                raise AudioStorageUnavailable(str(exc)) from None
            except FileNotFoundError:
                missing += 1
                reasons.append(f"{recorded.path}: file not found (deleted or storage not mounted?)")
                continue
            except AudioError as exc:
                reasons.append(str(exc))
                continue
            clips.append(AudioClip(audio_id=item.audio_id, path=recorded.path, waveform=waveform))
            break
        else:
            if not item.paths:
                reasons.append(
                    f"audio {item.audio_id}: no readable path left (all paths quarantined or missing)"
                )
            failures[item.audio_id] = "; ".join(reasons)
            if item.paths and missing == len(item.paths):
                missing_only += 1
    if items and missing_only == len(items):
        first = next(iter(failures.values()))
        raise AudioStorageUnavailable(f"none of the {len(items)} file(s) of this job exists ({first})")
    return clips, failures


def clean_text(text: str | None) -> str | None:
    """PostgreSQL text and jsonb cannot hold NUL characters, which a random or broken model can emit;
    they are replaced (U+FFFD) so one odd answer does not sink its batch's transaction."""
    return None if text is None else text.replace("\x00", "\ufffd")


def _windows(result: ClipResult) -> list[dict[str, Any]]:
    return [{**asdict(w), "text": clean_text(w.text)} for w in result.windows]


@dataclass
class _Rows:
    transcription: list[dict[str, Any]] = field(default_factory=list)
    cry_answer: list[dict[str, Any]] = field(default_factory=list)
    failure: list[dict[str, Any]] = field(default_factory=list)
    durations: dict[int, float] = field(default_factory=dict)


def build_rows(
    job: jobs.Job,
    request: LabelRequest,
    items: Sequence[jobs.JobItem],
    clips: Sequence[AudioClip],
    results: Sequence[ClipResult],
    load_failures: dict[int, str],
) -> _Rows:
    """Turn model results into table rows; a result that is unusable becomes a failure row, not a crash."""
    rows = _Rows()
    durations = {it.audio_id: it.duration_s for it in items}
    base = {"run_id": job.run_id, "job_id": job.id}
    for audio_id, error in load_failures.items():
        rows.failure.append({**base, "audio_id": audio_id, "error": error[:4000]})
    for clip, result in zip(clips, results, strict=True):
        if result.audio_id != clip.audio_id:
            raise ModelError(
                f"backend returned results out of order (audio {result.audio_id} for {clip.audio_id})"
            )
        problem = result.error
        if problem is None and request.task == "asr" and result.text is None:
            problem = "model returned no transcript"
        if problem is None and request.task == "cry":
            if "generate" in request.methods and result.text is None:
                problem = "model returned no answer"
            if "score" in request.methods and not _valid_p(result.p_yes):
                problem = f"model returned no usable p_yes ({result.p_yes!r})"
        if problem is not None:
            # A backend's error names the clip already (backends report to callers with no row to put
            # it in); the checks above do not. Either way the path appears once.
            named = problem if problem.startswith(f"{clip.path}: ") else f"{clip.path}: {problem}"
            rows.failure.append({**base, "audio_id": clip.audio_id, "error": named[:4000]})
            continue
        rows.durations[clip.audio_id] = durations.get(clip.audio_id, clip.duration_s)
        windows = _windows(result)
        if request.task == "asr":
            rows.transcription.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "text": clean_text(result.text),
                    "language": request.language,
                    "windows": windows,
                    "truncated": result.truncated,
                    "mean_logprob": result.mean_logprob,
                }
            )
            continue
        p_yes = result.p_yes if _valid_p(result.p_yes) else None
        if "score" in request.methods:
            decision = request.decide(p_yes)
            rows.cry_answer.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "method": "score",
                    "raw_answer": None,
                    "p_yes": p_yes,
                    "label": decision.label,
                    "threshold": decision.threshold,
                    "calibration_id": decision.calibration_id,
                    "p_calibrated": decision.p_calibrated,
                    "windows": windows,
                    "truncated": False,  # one forward pass, nothing generated
                }
            )
        if "generate" in request.methods:
            rows.cry_answer.append(
                {
                    **base,
                    "audio_id": clip.audio_id,
                    "method": "generate",
                    "raw_answer": clean_text(result.text),
                    "p_yes": p_yes,
                    "label": normalize_yes_no(result.text or ""),
                    "threshold": None,
                    "calibration_id": None,
                    "p_calibrated": None,
                    "windows": windows,
                    "truncated": result.truncated,
                }
            )
    return rows


def _valid_p(p: float | None) -> bool:
    return p is not None and math.isfinite(p) and 0.0 <= p <= 1.0


def write_results(
    engine: Engine, job: jobs.Job, worker_id: str, rows: _Rows, process_seconds: float
) -> tuple[int, int, float]:
    """The one transaction: lease check + done mark, results, failures, run counters.

    Returns (labelled, failed, audio_seconds) as actually inserted. Raises LeaseLost (nothing written)
    when the job is no longer ours.
    """
    with db.transaction(engine) as conn:
        mine = conn.execute(
            label_job.update()
            .where(jobs.held_by(job.id, worker_id))
            .values(
                status=JobStatus.DONE,
                finished_at=sa.func.now(),
                lease_expires_at=None,
                claim_seconds=job.claim_seconds,
                process_seconds=process_seconds,
            )
            .returning(label_job.c.id)
        ).one_or_none()
        if mine is None:
            raise LeaseLost(f"job {job.id}: lease is no longer held by {worker_id}")
        labelled_ids: set[int] = set()
        for table, payload in ((transcription, rows.transcription), (cry_answer, rows.cry_answer)):
            if payload:
                stmt = pg_insert(table).on_conflict_do_nothing().returning(table.c.audio_id)
                labelled_ids.update(conn.execute(stmt, payload).scalars())
        n_failed = 0
        if rows.failure:
            stmt = pg_insert(label_failure).on_conflict_do_nothing().returning(label_failure.c.audio_id)
            n_failed = len(list(conn.execute(stmt, rows.failure).scalars()))
        seconds = sum(rows.durations.get(a, 0.0) for a in labelled_ids)
        conn.execute(
            label_run.update()
            .where(label_run.c.id == job.run_id)
            .values(
                n_labelled=label_run.c.n_labelled + len(labelled_ids),
                n_failed=label_run.c.n_failed + n_failed,
                audio_seconds=label_run.c.audio_seconds + seconds,
            )
        )
    return len(labelled_ids), n_failed, seconds


# --- one job ---------------------------------------------------------------------------------------------


def _acquire(
    engine: Engine, job_id: int, run_id: int, worker_id: str, lease_seconds: float, max_wait: float | None
) -> jobs.Job | JobOutcome:
    """Claim a given job, waiting for another worker's lease to end; an outcome when nothing is left to do."""
    deadline = None if max_wait is None else time.monotonic() + max_wait
    while True:
        job = jobs.claim_job_id(engine, job_id, worker_id, lease_seconds)
        if job is not None:
            return job
        state = jobs.job_state(engine, job_id)
        if state["status"] in FINISHED_JOB or (
            state["status"] == JobStatus.PENDING and state["attempts"] >= state["max_attempts"]
        ):
            skipped = JobOutcomeStatus.SKIPPED
            return JobOutcome(job_id, run_id, skipped, attempt=state["attempts"], error=state["last_error"])
        if deadline is not None and time.monotonic() > deadline:
            raise ConfigError(
                f"job {job_id} is held by {state['lease_owner']} (lease {state['lease_left']:.0f} s left)"
            )
        time.sleep(min(max(float(state["lease_left"] or 0.0) + 0.05, 0.05), 5.0))


def process_job(
    engine: Engine,
    job_id: int,
    backend: Backend,
    *,
    worker_id: str,
    lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
    job: jobs.Job | None = None,
    max_wait: float | None = None,
) -> JobOutcome:
    """Label one job end to end and return what happened; never raises for a bad clip or a model error.

    `job` is the claim when the caller already holds it (`work`); otherwise the job is claimed here,
    waiting for a live worker's lease to end if needed (an Airflow retry of a mapped task). A job-level
    error (model crash, storage missing) releases the job with the error stored: pending again, or failed
    once its attempts are used up. Only `ModelError` for a wrong model and lost databases propagate.
    """
    run_id = job.run_id if job is not None else jobs.run_of_job(engine, job_id)
    run = jobs.get_run(engine, run_id)
    info = check_backend(run, backend)
    if job is None or job.id != job_id:
        got = _acquire(engine, job_id, run_id, worker_id, lease_seconds, max_wait)
        if isinstance(got, JobOutcome):
            jobs.finish_run_if_complete(engine, run_id)
            return got
        job = got
    if run.status == RunStatus.PLANNED:
        jobs.start_run(engine, run_id, info)
    outcome = _process_claimed(engine, job, run.request, backend, worker_id, lease_seconds)
    if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
        # after the commit: the last job to finish closes the run (see finish_run_if_complete)
        jobs.finish_run_if_complete(engine, run_id)
    return outcome


def _process_claimed(
    engine: Engine,
    job: jobs.Job,
    request: LabelRequest,
    backend: Backend,
    worker_id: str,
    lease_seconds: float,
) -> JobOutcome:
    """Load, label, write for a job we hold; job-level errors release it (see process_job)."""
    flight = _Flight(job, request, LeaseKeeper(engine, job.id, worker_id, lease_seconds))
    try:
        with flight.keeper:
            _read_stage(engine, flight, backend)
            _model_stage(flight, backend)
            return _write_stage(engine, flight, worker_id)
    except WriteFailed:
        raise  # released above, its attempt counted
    except BaseException as exc:  # Ctrl-C / SIGTERM: give the job back at once, attempt not counted
        jobs.give_back(engine, job, worker_id, f"worker interrupted ({_why(exc)})")
        raise


@dataclass
class _Flight:
    """One claimed job on its way through the stages: read (audio, resampling, features), model, write.

    The serial path (`process_job`) runs the stages one after the other; the overlapped worker
    (`_Overlapped`) runs the read of job k+1, the model on job k and the write of job k-1 at once. A
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
    rows: _Rows | None = None
    error: str | None = None


def _read_stage(engine: Engine, flight: _Flight, backend: Backend) -> None:
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


def _model_stage(flight: _Flight, backend: Backend) -> None:
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


def _write_stage(engine: Engine, flight: _Flight, worker_id: str) -> JobOutcome:
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
            lambda: write_results(engine, job, worker_id, rows, elapsed),
            what=f"write job {job.id}",
            attempts=WRITE_ATTEMPTS,
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
    from dataclasses import replace

    return replace(outcome, process_seconds=time.perf_counter() - start, **changes)


# --- a worker --------------------------------------------------------------------------------------------


class Until(StrEnum):
    """When a worker stops on its own: `idle` (nothing claimable now), `drained` (its runs have no
    pending or running job left: it also waits for other workers' jobs and takes over any whose lease
    runs out), `stopped` (never: `work --follow` serves new runs until SIGTERM)."""

    IDLE = "idle"
    DRAINED = "drained"
    STOPPED = "stopped"


@dataclass
class StopFlag:
    """Set (by a SIGTERM handler, a test) to make a worker stop after the job in hand."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None


BackendFactory = Callable[[jobs.RunInfo], Backend]


def backend_for_run(device: str | None = None, dtype: str | None = None) -> BackendFactory:
    """The usual factory: the run's own model (base checkpoint at its revision, plus the adapter of a
    fine-tuned version: RunInfo.load_args), on `device`/`dtype` or what the run was planned with."""

    def load(run: jobs.RunInfo) -> Backend:
        from qwen_tasks.config import get_settings
        from qwen_tasks.labelling.backends import get_backend

        planned_device = run.params.get("device") or get_settings().device
        planned_dtype = run.params.get("dtype")
        return get_backend(**run.load_args, device=device or planned_device, dtype=dtype or planned_dtype)

    return load


def _model_key(run: jobs.RunInfo) -> tuple[str, str]:
    """Runs with the same key are served by one loaded model (the revision names an adapter too)."""
    return (run.model, run.revision)


def work(
    engine: Engine,
    runs: jobs.RunSelector,
    backend_factory: BackendFactory,
    *,
    worker_id: str | None = None,
    lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
    until: Until | str = Until.DRAINED,
    model: tuple[str, str] | None = None,
    progress: Callable[[JobOutcome], None] | None = None,
    max_jobs: int | None = None,
    stop: StopFlag | None = None,
    poll_seconds: float = 5.0,
    backend: Backend | None = None,
    overlap: bool | None = None,
) -> WorkSummary:
    """The one worker loop (CLI `label`/`work`, the DAG's label_batch, `work --follow`): claim a job of
    `runs` (run ids; or every unfinished run of `model` = (model, revision) when runs is None), label it,
    commit, repeat; see `Until` for when it stops. Free jobs are always taken before the worker waits
    for a lease held by someone else, so a retry never sits out a dead worker's lease while work is free.

    The model is loaded (`backend_factory(run)`) when the first job is claimed (or pass a loaded
    `backend`); once loaded, jobs of runs with the same model are claimed first, so a worker whose runs
    use different models (a promoted fine-tuned version for cry, the base for ASR) loads each of them
    once. A model that needs another Python environment is refused before any job is claimed, so the
    refusal uses up no attempt. SIGTERM/Ctrl-C while a job is in hand give it back without using one.

    `overlap` (default: QWEN_TASKS_OVERLAP, on) reads and featurises the next job while the model runs
    this one and writes the previous one meanwhile (`_Overlapped`); off, one job after the other.
    """
    until = Until(until)
    overlap = overlap_from_env() if overlap is None else overlap
    worker_id = worker_id or default_worker_id()
    single = runs if isinstance(runs, int) else None
    summary = WorkSummary(worker_id=worker_id, run_id=single)
    if runs is not None:
        summary.run_ids = [runs] if isinstance(runs, int) else [int(r) for r in runs]
    known: dict[int, jobs.RunInfo] = {r: jobs.get_run(engine, r) for r in summary.run_ids}
    for run_id, info in known.items():
        check_environment(info.model, run_id=run_id)
    if model is not None:
        check_environment(model[0])
    started = time.perf_counter()

    def record(run: jobs.RunInfo, job: jobs.Job, outcome: JobOutcome) -> None:
        summary.add(outcome)
        _log_outcome(engine, run, job, outcome)
        if progress is not None:
            progress(outcome)

    waiting_for: tuple[Any, ...] | None = None
    loaded: tuple[str, str] | None = None
    n_jobs = 0
    while (max_jobs is None or n_jobs < max_jobs) and not stop:
        job = None
        if loaded is not None and model is None:  # keep the loaded model busy before switching
            job = jobs.claim_job(engine, runs, worker_id, lease_seconds, model=loaded)
        if job is None:
            job = jobs.claim_job(engine, runs, worker_id, lease_seconds, model=model)
        if job is None:
            for run_id in summary.run_ids:
                jobs.finish_run_if_complete(engine, run_id)
            if until == Until.IDLE or stop:
                break
            counts = jobs.open_job_counts(engine, runs, model=model)
            if until == Until.DRAINED and not counts["pending"] and not counts["running"]:
                break
            state = (counts["pending"], counts["running"], tuple(counts["holders"]))
            if state != waiting_for:
                waiting_for = state
                if counts["running"]:
                    log.info(
                        "no free job: %d job(s) held by %s (next lease ends in %.0f s); waiting to take "
                        "over any whose worker is gone",
                        counts["running"], ", ".join(counts["holders"]) or "?",
                        max(float(counts["next_expiry"] or 0.0), 0.0),
                    )  # fmt: skip
                elif until == Until.STOPPED:
                    log.info("idle: waiting for new jobs for model %s", model[0] if model else "?")
            nap = min(max(float(counts["next_expiry"] or poll_seconds) + 0.05, 0.1), poll_seconds)
            if until == Until.STOPPED:
                jobs.wait_for_new_jobs(engine, nap)
            else:
                time.sleep(nap)
            continue
        waiting_for = None
        try:
            run = known.get(job.run_id) or known.setdefault(job.run_id, jobs.get_run(engine, job.run_id))
            if job.run_id not in summary.run_ids:
                summary.run_ids.append(job.run_id)
            if backend is None or (loaded is not None and _model_key(run) != loaded):
                check_environment(run.model, run_id=run.id)
                backend = _load_backend(engine, run, job, worker_id, lease_seconds, backend_factory, summary)
                loaded = _model_key(run)
            if overlap:
                n_jobs += _Overlapped(
                    engine, backend, runs=runs, model=loaded or model, worker_id=worker_id,
                    lease_seconds=lease_seconds, known=known, record=record, stop=stop,
                    budget=None if max_jobs is None else max_jobs - n_jobs,
                ).run(job)  # fmt: skip
                continue
            outcome = process_job(
                engine, job.id, backend, worker_id=worker_id, lease_seconds=lease_seconds, job=job
            )
        except WriteFailed:
            raise  # the job was released with its attempt counted (or its lease will run out)
        except BaseException as exc:
            # anything between the claim and the job's own handling: do not keep the job hostage
            jobs.give_back(engine, job, worker_id, f"worker stopped ({_why(exc)})")
            raise
        n_jobs += 1
        record(run, job, outcome)
    if stop:
        summary.stopped = stop.reason
    if summary.run_id is not None:
        summary.run_status = jobs.get_run(engine, summary.run_id).status
    summary.wall_seconds = time.perf_counter() - started
    return summary


def overlap_from_env() -> bool:
    """`QWEN_TASKS_OVERLAP`: 1 (default) runs a worker's stages overlapped, 0 one job after the other."""
    value = os.environ.get("QWEN_TASKS_OVERLAP", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"QWEN_TASKS_OVERLAP must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes", "on")


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


class _Overlapped:
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
        self.held: list[_Flight] = []
        self.opened = 0
        self.cancel = threading.Event()

    def _open(self, job: jobs.Job) -> _Flight:
        """Start a claimed job: its run checked against the model (and started), its lease kept."""
        run = jobs.get_run(self.engine, job.run_id)
        info = check_backend(run, self.backend)
        if run.status == RunStatus.PLANNED:
            jobs.start_run(self.engine, run.id, info)
        self.known.setdefault(run.id, run)
        flight = _Flight(
            job, run.request, LeaseKeeper(self.engine, job.id, self.worker_id, self.lease_seconds)
        )
        flight.run = run
        flight.keeper.__enter__()
        self.held.append(flight)
        self.opened += 1
        return flight

    def _prefetch(self) -> _Flight | None:
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
        _read_stage(self.engine, flight, self.backend)
        return flight

    def _finish(self, flight: _Flight) -> None:
        """Write (or release) a job whose model stage is over, then stop its heartbeat."""
        try:
            outcome = _write_stage(self.engine, flight, self.worker_id)
        finally:
            flight.keeper.__exit__(None, None, None)
        self.held.remove(flight)
        if outcome.status in (JobOutcomeStatus.DONE, JobOutcomeStatus.FAILED):
            jobs.finish_run_if_complete(self.engine, flight.job.run_id)
        assert flight.run is not None
        self.record(flight.run, flight.job, outcome)

    def _hand_back(self, flight: _Flight, reason: str) -> None:
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
            current: _Flight | None = self._open(first)
            assert current is not None
            _read_stage(self.engine, current, self.backend)
            to_write: _Flight | None = None
            while current is not None:
                model = _Background(f"model-{current.job.id}", _model_stage, current, self.backend)
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
                self._hand_back(flight, f"worker stopped ({_why(exc)})")
            raise
        return done


def _log_outcome(engine: Engine, run: jobs.RunInfo, job: jobs.Job, outcome: JobOutcome) -> None:
    """Per-job progress in the worker's log (the Airflow task log for label_batch)."""
    counts = jobs.run_status_counts(engine, [run.id]).get(run.id) or {}
    finished = sum(int(counts.get(s, 0)) for s in FINISHED_JOB)  # run_status_counts: keyed by JobStatus
    total = finished + sum(int(counts.get(s, 0)) for s in UNFINISHED_JOB)
    detail = f": {outcome.error}" if outcome.error and outcome.status != JobOutcomeStatus.DONE else ""
    log.info(
        "job %d (%s run %d batch %d, %d clips, %.0f s audio) attempt %d: %s in %.1f s, %d labelled, "
        "%d failed%s; run %d: %d/%d jobs finished",
        job.id, run.task, run.id, job.seq, job.n_items, job.audio_seconds, outcome.attempt, outcome.status,
        outcome.process_seconds, outcome.labelled, outcome.failed, detail, run.id, finished, total,
    )  # fmt: skip


def _load_backend(
    engine: Engine,
    run: jobs.RunInfo,
    job: jobs.Job,
    worker_id: str,
    lease_seconds: float,
    backend_factory: BackendFactory,
    summary: WorkSummary,
) -> Backend:
    """Load the model while holding the first job's lease (loading a 7B model takes a while).

    Any failure gives the job back (no attempt used) and becomes one ModelError line naming the model:
    corrupt weights or a missing file must not end in a library traceback."""
    t0 = time.perf_counter()
    log.info("loading model %s (revision %s) for job %d ...", run.model, run.revision or "default", job.id)
    try:
        with LeaseKeeper(engine, job.id, worker_id, lease_seconds):
            try:
                backend = backend_factory(run)
            except QwenTasksError:
                raise
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ModelError(f"could not load model {run.model}: {type(exc).__name__}: {first}") from exc
            info = check_backend(run, backend)
    except BaseException as exc:
        jobs.give_back(engine, job, worker_id, f"worker could not load the model: {exc or _why(exc)}")
        raise
    seconds = time.perf_counter() - t0
    summary.model_load_seconds += seconds
    summary.model_loads += 1
    log.info(
        "model %s (revision %s) loaded in %.1f s (device %s, dtype %s)", run.model, run.revision or "default",
        seconds, info.device, info.dtype,
    )  # fmt: skip
    jobs.start_run(engine, run.id, info)
    return backend


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


# --- plan + work in one process ------------------------------------------------------------------------


@dataclass
class LabelSummary:
    """`qwen-tasks label --json`: the plan (resumed and new jobs) and what this process labelled."""

    run_id: int | None  # the newest run worked on (a new run, else the resumed one); None: nothing to do
    planned: int
    jobs: int
    left_over: int
    run_ids: list[int] = field(default_factory=list)
    resumed_jobs: int = 0
    labelled: int = 0
    failed: int = 0
    jobs_failed: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_load_seconds: float = 0.0
    model_loads: int = 0  # a worker loads each model it needs once (several only if its runs differ)
    process_seconds: float = 0.0
    status: str | None = None
    errors: list[str] = field(default_factory=list)
    reason: str | None = None  # nothing planned: why (planning's per-task reason)
    in_flight_run_ids: list[int] = field(default_factory=list)  # nothing planned: runs others are labelling

    @property
    def rtf(self) -> float | None:
        return real_time_factor(self.wall_seconds, self.audio_seconds)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rtf"] = self.rtf
        return out


def label(
    engine: Engine,
    options: Any,
    *,
    max_jobs: int | None = None,
    lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
    plan_only: bool = False,
    on_plan: Callable[[Any], None] | None = None,
    progress: Callable[[JobOutcome], None] | None = None,
    backend_factory: BackendFactory | None = None,
    stop: StopFlag | None = None,
) -> LabelSummary:
    """`qwen-tasks label`: the DAG's planning step (resume unfinished jobs of this model and prompt, then
    plan a run over what has no label yet) and the worker loop, in this process, until the runs are done.

    `options` is a `qwen_tasks.labelling.options.LabelOptions` with one task. A model that will not load
    leaves no run behind: the run planned by this call is discarded (resumed runs stay for the next try)."""
    started = time.perf_counter()
    planned = planning.plan(engine, options, max_jobs=max_jobs)
    if on_plan is not None:
        on_plan(planned)
    summary = LabelSummary(
        run_id=planned.run_ids[-1] if planned.run_ids else None,
        planned=planned.items,
        jobs=len(planned.job_ids),
        left_over=planned.left_over,
        run_ids=list(planned.run_ids),
        resumed_jobs=planned.resumed_jobs,
    )
    if not planned.run_ids:
        entry = planned.per_task.get(options.tasks[0]) or {}
        summary.reason = entry.get("reason")
        summary.in_flight_run_ids = list(entry.get("in_flight_run_ids") or [])
    if not planned.run_ids or plan_only:
        summary.status = RunStatus.PLANNED if planned.run_ids else None
        summary.wall_seconds = time.perf_counter() - started
        return summary
    if backend_factory is None:
        backend_factory = backend_for_run(options.device, options.dtype_arg)

    try:
        done = work(
            engine, planned.run_ids, backend_factory, lease_seconds=lease_seconds, until=Until.DRAINED,
            progress=progress, stop=stop,
        )  # fmt: skip
    except WrongEnvironment:
        raise  # the plan is right, only this interpreter cannot run it: keep it for `work --run`
    except ModelError:
        for run_id in planned.new_run_ids:
            if jobs.discard_untouched_run(engine, run_id):
                log.warning("run %d discarded: the model could not be loaded, nothing was labelled", run_id)
        raise
    summary.labelled, summary.failed = done.labelled, done.failed
    summary.jobs_failed = done.jobs_failed
    summary.audio_seconds = done.audio_seconds
    summary.model_load_seconds = done.model_load_seconds
    summary.model_loads = done.model_loads
    summary.process_seconds = done.process_seconds
    summary.status = jobs.get_run(engine, summary.run_id).status if summary.run_id is not None else None
    summary.errors = done.errors
    summary.wall_seconds = time.perf_counter() - started
    return summary
