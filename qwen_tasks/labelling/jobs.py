"""Labelling runs and their jobs in PostgreSQL: plan, claim with a lease, extend, release, finish.

A run is one (task, model, revision, prompt version). Planning splits the audio that still needs a label
into jobs (batches sized by a clip count and an audio-seconds budget) and writes run, jobs and job items
in one transaction. Workers claim jobs with `FOR UPDATE SKIP LOCKED` and a lease kept in the database
(database time, so worker clocks do not matter): a job whose worker died is taken over once its lease runs
out, and a job that used up its attempts is failed with its error. Results are written by `worker`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.config import Settings
from qwen_tasks.errors import ConfigError, DatabaseUnavailable
from qwen_tasks.ingest.datasets import members as dataset_members
from qwen_tasks.records import (
    UNFINISHED_JOB,
    UNFINISHED_RUN,
    AudioStatus,
    JobStatus,
    LabelRequest,
    ModelInfo,
    RecordedPath,
    RunStatus,
)
from qwen_tasks.store import database as db
from qwen_tasks.store.schema import (
    audio,
    audio_file,
    cry_answer,
    dataset_audio,
    label_job,
    label_job_item,
    label_run,
    run_dataset,
    run_progress,
    transcription,
)

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = Settings.lease_seconds  # declared once, in config (QWEN_TASKS_LEASE_SECONDS)
# Attempts per job, the same for every planner (CLI, DAG): a job-level error releases the job and any
# worker may claim it again; after this many claims it fails for good with its last error.
DEFAULT_MAX_ATTEMPTS = 3
# Planning sends NOTIFY on this channel (payload: the model); `work --follow` LISTENs for new jobs.
JOBS_CHANNEL = "qwen_tasks_jobs"

T = TypeVar("T")


@dataclass(frozen=True)
class PlanResult:
    """What `plan_run` created. `run_id` is None when no audio needed labelling (no empty run is made)."""

    run_id: int | None
    job_ids: list[int]
    n_items: int
    n_left_over: int  # audio that needs a label but did not fit under max_jobs; the next plan takes it

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "jobs": len(self.job_ids),
            "job_ids": list(self.job_ids),
            "items": self.n_items,
            "left_over": self.n_left_over,
        }


@dataclass(frozen=True)
class Job:
    """A job as claimed by one worker (the lease is held until `lease_expires_at`, database time)."""

    id: int
    run_id: int
    seq: int
    n_items: int
    audio_seconds: float
    attempts: int
    max_attempts: int
    lease_owner: str
    lease_expires_at: datetime
    claim_seconds: float = 0.0  # time spent in the claim query (for the claim-overhead figure)


@dataclass(frozen=True)
class JobItem:
    """One audio of a job with the paths it can be read from (ok paths, oldest first)."""

    audio_id: int
    duration_s: float
    paths: tuple[RecordedPath, ...]  # what ingest recorded of each path (labelling checks it again)


@dataclass(frozen=True)
class RunInfo:
    """A run as stored: what to ask the model (request) and which model must answer."""

    id: int
    task: str
    model: str
    revision: str
    prompt_version: str
    status: str
    dtype: str | None
    device: str | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def load_args(self) -> dict[str, Any]:
        """How a worker loads this run's model: the base checkpoint at its own revision, plus the LoRA
        adapter of a fine-tuned version (whose digest is part of the recorded revision)."""
        adapter = self.params.get("adapter")
        revision = self.params.get("base_revision", self.revision) if adapter else self.revision
        return {"model": self.model, "revision": revision, "adapter": adapter}

    @property
    def request(self) -> LabelRequest:
        raw = dict(self.params.get("request") or {"task": self.task})
        if "methods" in raw:
            raw["methods"] = tuple(raw["methods"])
        return LabelRequest(**raw)


# --- helpers -------------------------------------------------------------------------------------------


def is_connection_error(exc: BaseException) -> bool:
    """True for errors where a fresh connection may succeed (server restart, killed backend, network)."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)


def retry_db(
    fn: Callable[[], T], *, what: str, attempts: int = 8, first_delay: float = 0.25, max_delay: float = 5.0
) -> T:
    """Run `fn` again (new transaction, new connection from the pool) when the connection is lost.

    Only connection errors are retried; anything else (a constraint, a bug) propagates at once. The pool
    discards a connection that died, so the next attempt gets a fresh one.
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_connection_error(exc) or attempt == attempts:
                raise
            log.warning(
                "%s: database connection lost (%s); retry %d/%d", what, _short(exc), attempt, attempts
            )
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _interval(seconds: float) -> sa.ColumnElement:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.literal(float(seconds), sa.Float))


def make_batches(
    items: Sequence[tuple[int, float]], batch_size: int, max_batch_seconds: float
) -> list[list[tuple[int, float]]]:
    """Group (audio_id, duration) pairs, sorted by duration, into batches under both budgets.

    Sorting keeps clips of similar length together (less padding, so less wasted compute). A batch closes
    when adding the next clip would exceed `batch_size` clips or `max_batch_seconds` of audio; a single clip
    longer than the budget becomes a batch of its own rather than being dropped.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not max_batch_seconds > 0:
        raise ConfigError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
    batches: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    seconds = 0.0
    for audio_id, duration in sorted(items, key=lambda it: (it[1], it[0])):
        if current and (len(current) >= batch_size or seconds + duration > max_batch_seconds):
            batches.append(current)
            current, seconds = [], 0.0
        current.append((audio_id, duration))
        seconds += duration
    if current:
        batches.append(current)
    return batches


# --- planning ------------------------------------------------------------------------------------------


def _same_key_runs(
    task: str, info: ModelInfo, *, unfinished: bool = False, purpose: str | None = None
) -> sa.Select:
    q = sa.select(label_run.c.id).where(
        label_run.c.task == task,
        label_run.c.model == info.model,
        label_run.c.revision == info.revision,
        label_run.c.prompt_version == info.prompt_version,
    )
    if purpose is not None:
        q = q.where(label_run.c.purpose == purpose)
    return q.where(label_run.c.status.in_(UNFINISHED_RUN)) if unfinished else q


def _has_label(task: str, info: ModelInfo, request: LabelRequest) -> sa.ColumnElement[bool]:
    """SQL condition: this audio already has a production label for the run key (every requested method,
    for cry). Labels of evaluation runs (a fine-tune's held-out check) do not count: once that version
    is promoted, the nightly run labels the held-out audio like any other."""
    runs = _same_key_runs(task, info, purpose="label")
    if task == "asr":
        return sa.exists().where(transcription.c.audio_id == audio.c.id, transcription.c.run_id.in_(runs))
    return sa.and_(
        *(
            sa.exists().where(
                cry_answer.c.audio_id == audio.c.id,
                cry_answer.c.method == method,
                cry_answer.c.run_id.in_(runs),
            )
            for method in request.methods
        )
    )


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What `plan_run` is asked to plan: one run of `task` with `model_info` asking `request`.

    Needs a label: audio with at least one ok path and no label for the same (task, model, revision,
    prompt_version) — unless `relabel`, which labels it again in a new run and keeps the old labels.
    `limit` caps the audio taken (oldest first); `max_jobs` caps the jobs (Airflow's max_map_length), the
    remaining audio is reported as left over and planned next time. `audio_ids` restricts the run to
    those audio (a fine-tune's held-out split); `purpose` 'evaluation' marks such a run (see 0004).
    `dataset_ids` restricts it to the members of those datasets and `where` adds a condition on
    `audio.c.id` (the clips of one question). `params` are stored on the run beside the planning options.
    Checked when made (ConfigError), so a request that exists can be planned without touching the
    database first.
    """

    task: str
    model_info: ModelInfo
    request: LabelRequest
    batch_size: int
    max_batch_seconds: float
    limit: int | None = None
    relabel: bool = False
    max_jobs: int | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    params: Mapping[str, Any] = field(default_factory=dict)
    audio_ids: Sequence[int] | None = None
    purpose: str = "label"
    dataset_ids: Sequence[int] | None = None
    where: sa.ColumnElement[bool] | None = field(default=None, compare=False)  # SQL: no `==` of its own

    def __post_init__(self) -> None:
        if self.purpose not in ("label", "evaluation"):
            raise ConfigError(f"purpose must be 'label' or 'evaluation', got {self.purpose!r}")
        if self.task != self.request.task:
            raise ConfigError(f"task {self.task!r} does not match the request's task {self.request.task!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ConfigError(f"max_jobs must be >= 1, got {self.max_jobs}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        make_batches([], self.batch_size, self.max_batch_seconds)  # validates the budgets

    @property
    def lock_key(self) -> str:
        """The advisory lock that serialises plans of the same run key (task, model, revision, prompt)."""
        info = self.model_info
        return f"qwen_tasks.plan:{self.task}:{info.model}:{info.revision}:{info.prompt_version}"

    def stored_params(self) -> dict[str, Any]:
        """label_run.params: the request and the planning options, then the caller's `params`."""
        return {
            "request": _request_dict(self.request),
            "batch_size": self.batch_size,
            "max_batch_seconds": self.max_batch_seconds,
            "limit": self.limit,
            "relabel": self.relabel,
            "max_jobs": self.max_jobs,
            "max_attempts": self.max_attempts,
            **self.params,
        }


def plan_run(engine: Engine, run: RunRequest) -> PlanResult:
    """Create a run with jobs for the audio `run` selects (see RunRequest); returns ids only (small
    enough for XCom). Audio already planned in an unfinished run of the same key is never planned twice;
    an advisory lock on the key serialises concurrent plans, so two planners (DAG and CLI) cannot both
    take the same audio. The datasets the run covered are recorded in `run_dataset` (those in
    `dataset_ids` holding its clips; without `dataset_ids`, every dataset of its clips).

    Steps, in one transaction: select the clips (`_select_clips`), make batches (`_batches`), insert the
    run (`_insert_run`), its jobs and their items (`_insert_jobs`), record its datasets, notify workers.
    """

    def _plan() -> PlanResult:
        with db.transaction(engine) as conn:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(run.lock_key, 0))))
            todo = _select_clips(conn, run)
            batches = _batches(todo, run)
            n_items = sum(len(b) for b in batches)
            if not batches:
                return PlanResult(run_id=None, job_ids=[], n_items=0, n_left_over=len(todo))
            run_id = _insert_run(conn, run, n_items)
            job_ids = _insert_jobs(conn, run_id, batches, run.max_attempts)
            _record_datasets(conn, run_id, run.dataset_ids)
            # delivered on commit: workers waiting for this model wake up at once instead of polling
            conn.execute(sa.select(sa.func.pg_notify(JOBS_CHANNEL, run.model_info.model[:7000])))
            return PlanResult(
                run_id=run_id, job_ids=job_ids, n_items=n_items, n_left_over=len(todo) - n_items
            )

    result = retry_db(_plan, what="plan run")
    if result.run_id is not None:
        log.info("planned run %s: %d jobs, %d clips", result.run_id, len(result.job_ids), result.n_items)
    return result


def _select_clips(conn: Connection, run: RunRequest) -> list[tuple[int, float]]:
    """(audio id, duration) of the clips `run` takes, oldest first: an ok path, not in an unfinished run
    of the same key, in its scope (`audio_ids`, `dataset_ids`, `where`), no label yet unless `relabel`;
    at most `limit`."""
    task, info = run.task, run.model_info
    has_ok_path = sa.exists().where(
        audio_file.c.audio_id == audio.c.id, audio_file.c.status == AudioStatus.OK
    )
    in_flight = sa.exists().where(
        label_job_item.c.audio_id == audio.c.id,
        label_job_item.c.run_id.in_(_same_key_runs(task, info, unfinished=True)),
    )
    query = sa.select(audio.c.id, audio.c.duration_s).where(has_ok_path, ~in_flight)
    if run.audio_ids is not None:
        query = query.where(audio.c.id.in_(list(run.audio_ids)))
    if run.dataset_ids is not None:
        query = query.where(audio.c.id.in_(dataset_members(run.dataset_ids)))
    if run.where is not None:
        query = query.where(run.where)
    if not run.relabel:
        query = query.where(~_has_label(task, info, run.request))
    query = query.order_by(audio.c.id)
    if run.limit is not None:
        query = query.limit(run.limit)
    return [(int(r.id), float(r.duration_s)) for r in conn.execute(query)]


def _batches(todo: Sequence[tuple[int, float]], run: RunRequest) -> list[list[tuple[int, float]]]:
    """The clips in batches under the run's budgets (`make_batches`), at most `max_jobs` of them."""
    batches = make_batches(todo, run.batch_size, run.max_batch_seconds)
    return batches[: run.max_jobs] if run.max_jobs is not None else batches


def _insert_run(conn: Connection, run: RunRequest, n_items: int) -> int:
    """The label_run row (status planned); returns its id."""
    info = run.model_info
    return conn.execute(
        label_run.insert()
        .values(
            task=run.task,
            model=info.model,
            revision=info.revision,
            prompt_version=info.prompt_version,
            prompt_template=info.prompt_template,
            # dtype and device are recorded by the first worker that loads the model: the
            # planner (an Airflow scheduler, a laptop) may well have no GPU.
            params=run.stored_params(),
            status=RunStatus.PLANNED,
            n_planned=n_items,
            purpose=run.purpose,
        )
        .returning(label_run.c.id)
    ).scalar_one()


def _insert_jobs(
    conn: Connection, run_id: int, batches: Sequence[Sequence[tuple[int, float]]], max_attempts: int
) -> list[int]:
    """One label_job per batch (in order: `seq`) and a label_job_item per clip; returns the job ids."""
    job_rows = [
        {
            "run_id": run_id,
            "seq": seq,
            "n_items": len(batch),
            "audio_seconds": sum(d for _, d in batch),
            "max_attempts": max_attempts,
        }
        for seq, batch in enumerate(batches)
    ]
    job_ids = list(
        conn.execute(
            label_job.insert().returning(label_job.c.id, sort_by_parameter_order=True), job_rows
        ).scalars()
    )
    conn.execute(
        label_job_item.insert(),
        [
            {"job_id": job_id, "run_id": run_id, "audio_id": audio_id}
            for job_id, batch in zip(job_ids, batches, strict=True)
            for audio_id, _ in batch
        ],
    )
    return job_ids


def _record_datasets(conn: Connection, run_id: int, dataset_ids: Sequence[int] | None) -> None:
    """run_dataset rows: the datasets (of `dataset_ids`, or any) holding the run's clips, with counts."""
    item, member = label_job_item, dataset_audio
    query = (
        sa.select(sa.literal(run_id, sa.BigInteger), member.c.dataset_id, sa.func.count())
        .join(item, item.c.audio_id == member.c.audio_id)
        .where(item.c.run_id == run_id)
        .group_by(member.c.dataset_id)
    )
    if dataset_ids is not None:
        query = query.where(member.c.dataset_id.in_(list(dataset_ids)))
    conn.execute(run_dataset.insert().from_select(["run_id", "dataset_id", "n_items"], query))


def _request_dict(request: LabelRequest) -> dict[str, Any]:
    raw = dataclasses.asdict(request)
    raw["methods"] = list(request.methods)
    return raw


# --- reading runs and jobs -----------------------------------------------------------------------------


def get_run(engine: Engine | Connection, run_id: int) -> RunInfo:
    """The run `run_id`; ConfigError when there is none (a wrong --run is a user error, not a crash)."""
    query = sa.select(label_run).where(label_run.c.id == run_id)
    if isinstance(engine, Connection):
        row = engine.execute(query).one_or_none()
    else:
        with engine.connect() as conn:
            row = conn.execute(query).one_or_none()
    if row is None:
        raise ConfigError(f"no labelling run with id {run_id} (see: qwen-tasks runs)")
    return RunInfo(
        id=row.id,
        task=row.task,
        model=row.model,
        revision=row.revision,
        prompt_version=row.prompt_version,
        status=row.status,
        dtype=row.dtype,
        device=row.device,
        params=dict(row.params or {}),
    )


def job_items(conn: Connection, job_id: int) -> list[JobItem]:
    """The audio of a job, in planned order (by duration), each with its ok paths."""
    ids = sa.select(label_job_item.c.audio_id).where(label_job_item.c.job_id == job_id)
    return audio_items(conn, ids)


def audio_items(conn: Connection, audio_ids: Any) -> list[JobItem]:
    """Audio (ids, or a subquery of ids) by duration, each with its ok paths as ingest recorded them:
    what `worker.load_clips` needs to re-check and read them (labelling, and fine-tune training rows)."""
    rows = conn.execute(
        sa.select(
            audio.c.id.label("audio_id"),
            audio.c.duration_s,
            audio_file.c.path,
            audio_file.c.size_bytes,
            audio_file.c.mtime_ns,
            audio_file.c.root,
            audio_file.c.path_bytes,
            audio.c.sha256,
        )
        .outerjoin(
            audio_file, sa.and_(audio_file.c.audio_id == audio.c.id, audio_file.c.status == AudioStatus.OK)
        )
        .where(audio.c.id.in_(audio_ids))
        .order_by(audio.c.duration_s, audio.c.id, audio_file.c.id)
    ).all()
    items: dict[int, JobItem] = {}
    for r in rows:
        item = items.get(r.audio_id) or JobItem(r.audio_id, float(r.duration_s), ())
        if r.path is not None:
            raw = bytes(r.path_bytes) if r.path_bytes is not None else None
            recorded = RecordedPath(r.path, r.size_bytes, r.mtime_ns, r.root, raw, r.sha256)
            item = dataclasses.replace(item, paths=(*item.paths, recorded))
        items[r.audio_id] = item
    return list(items.values())


# --- claiming and leases -------------------------------------------------------------------------------


def _job_from_row(row: Any, claim_seconds: float) -> Job:
    return Job(
        id=row.id,
        run_id=row.run_id,
        seq=row.seq,
        n_items=row.n_items,
        audio_seconds=float(row.audio_seconds),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        claim_seconds=claim_seconds,
    )


_RETURNED = (
    label_job.c.id,
    label_job.c.run_id,
    label_job.c.seq,
    label_job.c.n_items,
    label_job.c.audio_seconds,
    label_job.c.attempts,
    label_job.c.max_attempts,
    label_job.c.lease_owner,
    label_job.c.lease_expires_at,
)


def _claimable() -> sa.ColumnElement[bool]:
    expired = sa.and_(label_job.c.status == JobStatus.RUNNING, label_job.c.lease_expires_at < sa.func.now())
    return sa.and_(
        label_job.c.attempts < label_job.c.max_attempts,
        sa.or_(label_job.c.status == JobStatus.PENDING, expired),
    )


def _take(worker_id: str, lease_seconds: float) -> dict[str, Any]:
    """SET clause of a claim: running, our lease, one more attempt; note a lease taken from a lost worker."""
    took_over = sa.func.concat(
        "lease of ", label_job.c.lease_owner, " expired on attempt ", label_job.c.attempts, " (worker lost?)"
    )
    return {
        "status": JobStatus.RUNNING,
        "lease_owner": worker_id,
        "lease_expires_at": sa.func.now() + _interval(lease_seconds),
        "attempts": label_job.c.attempts + 1,
        "started_at": sa.func.coalesce(label_job.c.started_at, sa.func.now()),
        "last_error": sa.case(
            (label_job.c.status == JobStatus.RUNNING, took_over), else_=label_job.c.last_error
        ),
    }


def fail_exhausted(conn: Connection, run_id: int | None = None) -> int:
    """Fail jobs whose lease expired on their last attempt; returns how many. Called before each claim."""
    lost = sa.func.concat(
        sa.func.coalesce(label_job.c.last_error + "; ", ""),
        "lease of ",
        label_job.c.lease_owner,
        " expired on attempt ",
        label_job.c.attempts,
        " of ",
        label_job.c.max_attempts,
        " (worker lost?)",
    )
    query = label_job.update().where(
        label_job.c.status == JobStatus.RUNNING,
        label_job.c.lease_expires_at < sa.func.now(),
        label_job.c.attempts >= label_job.c.max_attempts,
    )
    if run_id is not None:
        query = query.where(label_job.c.run_id == run_id)
    return conn.execute(
        query.values(status=JobStatus.FAILED, finished_at=sa.func.now(), last_error=lost)
    ).rowcount


RunSelector = int | Sequence[int] | None


def _runs_filter(runs: RunSelector, model: tuple[str, str] | None) -> list[sa.ColumnElement[bool]]:
    """WHERE terms choosing which runs' jobs a worker takes: given run ids, and/or the unfinished runs
    of one (model, revision) (a `work --follow` worker serves every run of the model it has loaded)."""
    where: list[sa.ColumnElement[bool]] = []
    if isinstance(runs, int):
        where.append(label_job.c.run_id == runs)
    elif runs is not None:
        where.append(label_job.c.run_id.in_([int(r) for r in runs]))
    if model is not None:
        where.append(
            label_job.c.run_id.in_(
                sa.select(label_run.c.id).where(
                    label_run.c.model == model[0],
                    label_run.c.revision == model[1],
                    label_run.c.status.in_(UNFINISHED_RUN),
                )
            )
        )
    return where


def claim_job(
    engine: Engine,
    runs: RunSelector,
    worker_id: str,
    lease_seconds: float,
    *,
    model: tuple[str, str] | None = None,
) -> Job | None:
    """Claim the next job of `runs` (a run id, several, or any run when None; only runs of `model` =
    (model, revision) when given), or None when nothing is claimable now.

    Claimable: pending, or running with an expired lease (its worker died), and attempts left. The row is
    picked with `FOR UPDATE SKIP LOCKED`, so concurrent workers never wait on each other nor take the
    same job; free jobs of a run come in plan order, before a dead worker's job whose lease just ran out
    only when that one is older. The time spent here is returned as `claim_seconds`.
    """
    if not lease_seconds > 0:
        raise ConfigError(f"lease_seconds must be > 0, got {lease_seconds}")
    where = _runs_filter(runs, model)

    def _claim() -> Job | None:
        start = time.perf_counter()
        with db.transaction(engine) as conn:
            fail_exhausted(conn, runs if isinstance(runs, int) else None)
            pick = (
                sa.select(label_job.c.id)
                .where(_claimable(), *where)
                .order_by(label_job.c.run_id, label_job.c.seq)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            row = conn.execute(
                label_job.update()
                .where(label_job.c.id == pick.scalar_subquery())
                .values(**_take(worker_id, lease_seconds))
                .returning(*_RETURNED)
            ).one_or_none()
        return None if row is None else _job_from_row(row, time.perf_counter() - start)

    return retry_db(_claim, what="claim job")


def job_state(engine: Engine, job_id: int) -> dict[str, Any]:
    """Status, attempts, lease and last error of one job (for waiting on a lease and for messages)."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                label_job.c.status,
                label_job.c.attempts,
                label_job.c.max_attempts,
                label_job.c.lease_owner,
                label_job.c.last_error,
                (sa.func.extract("epoch", label_job.c.lease_expires_at - sa.func.now())).label("lease_left"),
            ).where(label_job.c.id == job_id)
        ).one_or_none()
    if row is None:
        raise ConfigError(f"no labelling job with id {job_id}")
    return dict(row._mapping)


def held_by(job_id: int, worker_id: str) -> sa.ColumnElement[bool]:
    """The job is running under `worker_id`'s lease. Every write a worker makes is conditioned on this,
    so a worker whose lease expired and was taken over writes nothing."""
    return sa.and_(
        label_job.c.id == job_id,
        label_job.c.status == JobStatus.RUNNING,
        label_job.c.lease_owner == worker_id,
    )


def extend_lease(engine: Engine, job_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Push our lease forward (heartbeat); False when the job is no longer ours (lease taken over)."""
    with db.transaction(engine) as conn:
        n = conn.execute(
            label_job.update()
            .where(held_by(job_id, worker_id))
            .values(lease_expires_at=sa.func.now() + _interval(lease_seconds))
        ).rowcount
    return n == 1


def release_job(engine: Engine, job: Job, worker_id: str, error: str) -> str | None:
    """Give a job back after a job-level error: pending again, or failed when attempts are used up.

    Returns the new status, or None when the job was no longer ours (someone else took it over).
    """

    used_up = label_job.c.attempts >= label_job.c.max_attempts

    def _release() -> str | None:
        with db.transaction(engine) as conn:
            row = conn.execute(
                label_job.update()
                .where(held_by(job.id, worker_id))
                .values(
                    status=sa.case((used_up, JobStatus.FAILED.value), else_=JobStatus.PENDING.value),
                    lease_expires_at=None,
                    last_error=error[:4000],
                    claim_seconds=job.claim_seconds,
                    finished_at=sa.case((used_up, sa.func.now()), else_=None),
                )
                .returning(label_job.c.status)
            ).one_or_none()
        return None if row is None else str(row.status)

    return retry_db(_release, what=f"release job {job.id}")


def give_back(engine: Engine, job: Job, worker_id: str, reason: str) -> bool:
    """Return a job we cannot work on (interrupted, model would not load) without using up an attempt."""

    def _give() -> bool:
        with db.transaction(engine) as conn:
            return (
                conn.execute(
                    label_job.update()
                    .where(held_by(job.id, worker_id))
                    .values(
                        status=JobStatus.PENDING,
                        attempts=sa.func.greatest(label_job.c.attempts - 1, 0),
                        lease_expires_at=None,
                        last_error=reason[:4000],
                    )
                ).rowcount
                == 1
            )

    try:
        return retry_db(_give, what=f"give back job {job.id}", attempts=3)
    except Exception as exc:  # the lease will run out on its own; never mask the original error
        log.warning("could not give back job %s: %s", job.id, _short(exc))
        return False


# --- run status ----------------------------------------------------------------------------------------


def start_run(engine: Engine, run_id: int, info: ModelInfo | None = None) -> None:
    """Mark a run running (first worker) and fill dtype/device, known only once a model is loaded."""

    def _start() -> None:
        with db.transaction(engine) as conn:
            values: dict[str, Any] = {
                "status": sa.case(
                    (label_run.c.status == RunStatus.PLANNED, RunStatus.RUNNING.value),
                    else_=label_run.c.status,
                ),
                "started_at": sa.func.coalesce(label_run.c.started_at, sa.func.now()),
            }
            if info is not None:
                values["dtype"] = sa.func.coalesce(label_run.c.dtype, info.dtype or None)
                values["device"] = sa.func.coalesce(label_run.c.device, info.device or None)
            conn.execute(label_run.update().where(label_run.c.id == run_id).values(**values))

    retry_db(_start, what=f"start run {run_id}")


def finish_run_if_complete(engine: Engine, run_id: int) -> str | None:
    """Close the run when no job is pending or running; returns the final status when it closed now.

    Called after a job's transaction committed (inside it, a concurrent last job would not be visible, and
    two workers finishing the last two jobs would each think the other is still running). A run is
    'failed' only when every job failed; per-job failures are visible in run_progress.
    """

    def _finish() -> str | None:
        with db.transaction(engine) as conn:
            fail_exhausted(conn, run_id)
            open_jobs = sa.exists().where(
                label_job.c.run_id == run_id, label_job.c.status.in_(UNFINISHED_JOB)
            )
            any_done = sa.exists().where(label_job.c.run_id == run_id, label_job.c.status == JobStatus.DONE)
            row = conn.execute(
                label_run.update()
                .where(label_run.c.id == run_id, label_run.c.status.in_(UNFINISHED_RUN), ~open_jobs)
                .values(
                    status=sa.case((any_done, RunStatus.DONE.value), else_=RunStatus.FAILED.value),
                    finished_at=sa.func.now(),
                    started_at=sa.func.coalesce(label_run.c.started_at, sa.func.now()),
                )
                .returning(label_run.c.status)
            ).one_or_none()
        return None if row is None else str(row.status)

    return retry_db(_finish, what=f"finish run {run_id}")


def open_job_counts(
    engine: Engine, runs: RunSelector, *, model: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Pending/running jobs of `runs` (see claim_job), their clips, the seconds until the earliest running
    lease ends, and who holds the running ones (for the "waiting for ..." log line)."""
    where = _runs_filter(runs, model)
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                sa.func.count().filter(label_job.c.status == JobStatus.PENDING).label("pending"),
                sa.func.count().filter(label_job.c.status == JobStatus.RUNNING).label("running"),
                sa.func.coalesce(
                    sa.func.sum(label_job.c.n_items).filter(label_job.c.status.in_(UNFINISHED_JOB)), 0
                ).label("clips"),
                sa.func.min(sa.func.extract("epoch", label_job.c.lease_expires_at - sa.func.now()))
                .filter(label_job.c.status == JobStatus.RUNNING)
                .label("next_expiry"),
                sa.func.array_agg(sa.distinct(label_job.c.lease_owner))
                .filter(label_job.c.status == JobStatus.RUNNING)
                .label("holders"),
            ).where(*where)
        ).one()
    out = dict(row._mapping)
    out["holders"] = [h for h in (out["holders"] or []) if h]
    return out


def run_status_counts(engine: Engine, run_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per run: its status and how many of its jobs are pending/running/done/failed (for progress logs
    and for the DAG's wait on external workers)."""
    if not run_ids:
        return {}
    query = (
        sa.select(
            label_run.c.id,
            label_run.c.status,
            label_run.c.n_planned,
            label_run.c.n_labelled,
            label_run.c.n_failed,
            *(
                sa.func.count(label_job.c.id).filter(label_job.c.status == s.value).label(s.value)
                for s in JobStatus
            ),
        )
        .outerjoin(label_job, label_job.c.run_id == label_run.c.id)
        .where(label_run.c.id.in_([int(r) for r in run_ids]))
        .group_by(label_run.c.id)
    )
    with engine.connect() as conn:
        return {int(r.id): dict(r._mapping) for r in conn.execute(query)}


def wait_for_new_jobs(engine: Engine, timeout: float) -> bool:
    """Block up to `timeout` seconds for a NOTIFY on JOBS_CHANNEL (a planner committed new jobs); True
    when one came. Polling stays the safety net: callers look for jobs after every return anyway."""
    import select

    raw = engine.raw_connection()
    try:
        dbapi = raw.driver_connection
        dbapi.autocommit = True
        with dbapi.cursor() as cur:
            cur.execute(f"LISTEN {JOBS_CHANNEL}")  # a constant identifier, never user input
        ready, _, _ = select.select([dbapi], [], [], max(timeout, 0.0))
        if ready:
            dbapi.poll()
        got = bool(dbapi.notifies)
        dbapi.notifies.clear()
        with dbapi.cursor() as cur:
            cur.execute("UNLISTEN *")
        return got
    finally:
        raw.invalidate()  # a connection that LISTENed is not handed to anyone else


def latest_run_ids(
    engine: Engine | Connection,
    *,
    tasks: Sequence[str] | None = None,
    model: str | None = None,
    statuses: Sequence[str] | None = None,
    with_labels: bool = False,
    dataset_id: int | None = None,
) -> list[int]:
    """The newest run (highest id) per task among the runs that pass every given filter; sorted by run id.

    The one "latest run" helper: each caller states its rule through the filters, so the rules stay
    visible side by side instead of living in one helper per module.

    - `tasks`: only these tasks (None: every task); `model`: only runs of this model (as label_run.model
      records it); `statuses`: only runs in these RunStatus (None: any, unfinished included);
      `with_labels`: only runs that labelled at least one clip (n_labelled > 0); `dataset_id`: only runs
      that covered that dataset (run_dataset).
    - Evaluation runs (purpose 'evaluation', a fine-tune's base / candidate) count like any other run:
      migration 0004 lets metrics and the report see them, and no caller leaves them out.

    The callers' rules, which differ on purpose:
    - `qwen-tasks metrics` / `report` default: every task, no filter (the newest run, even one in flight);
      with `--dataset NAME`: `dataset_id=` its id (the newest run of each task that covered it).
    - Label Studio export (review.label_studio): `tasks=[task]` (the run the review_queue view calls latest).
    - CSV/JSONL export (review.export): `tasks=[task], with_labels=True` (a run with nothing to export is
      skipped).
    - The DAG's report step when nothing new was labelled: the requested `tasks` and `model`,
      `statuses=(RunStatus.DONE,)` (only finished runs are worth a report).
    """
    query = sa.select(sa.func.max(label_run.c.id)).group_by(label_run.c.task)
    if tasks is not None:
        query = query.where(label_run.c.task.in_([str(t) for t in tasks]))
    if model is not None:
        query = query.where(label_run.c.model == model)
    if statuses is not None:
        query = query.where(label_run.c.status.in_([str(s) for s in statuses]))
    if with_labels:
        query = query.where(label_run.c.n_labelled > 0)
    if dataset_id is not None:
        covered = sa.select(run_dataset.c.run_id).where(run_dataset.c.dataset_id == dataset_id)
        query = query.where(label_run.c.id.in_(covered))
    if isinstance(engine, Connection):
        return sorted(int(r) for r in engine.execute(query).scalars())
    with engine.connect() as conn:
        return sorted(int(r) for r in conn.execute(query).scalars())


def discard_untouched_run(engine: Engine, run_id: int) -> bool:
    """Delete a run that no worker has started (status planned, no job ever claimed): what `label` does
    when the model it planned for will not load, so no orphan run is left behind. True if deleted."""

    def _discard() -> bool:
        with db.transaction(engine) as conn:
            touched = sa.exists().where(label_job.c.run_id == run_id, label_job.c.attempts > 0)
            row = conn.execute(
                sa.select(label_run.c.id)
                .where(label_run.c.id == run_id, label_run.c.status == RunStatus.PLANNED, ~touched)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return False
            conn.execute(label_job_item.delete().where(label_job_item.c.run_id == run_id))
            conn.execute(label_job.delete().where(label_job.c.run_id == run_id))
            conn.execute(label_run.delete().where(label_run.c.id == run_id))
            return True

    return retry_db(_discard, what=f"discard run {run_id}")


# --- progress (the run_progress view of migration 0002) ------------------------------------------------


def progress_rows(
    engine: Engine, *, limit: int | None = 20, task: str | None = None, run_id: int | None = None
) -> list[dict[str, Any]]:
    """Rows of the run_progress view, newest run first (what `qwen-tasks runs` prints)."""
    query = sa.select(*run_progress.c).order_by(run_progress.c.run_id.desc())
    if task is not None:
        query = query.where(run_progress.c.task == task)
    if run_id is not None:
        query = query.where(run_progress.c.run_id == run_id)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def _unfinished_key(task: str, model: str, revision: str, prompt_version: str) -> sa.ColumnElement[bool]:
    """label_run: an unfinished run with this key (what resuming and "in flight" look at)."""
    return sa.and_(
        label_run.c.task == task,
        label_run.c.model == model,
        label_run.c.revision == revision,
        label_run.c.prompt_version == prompt_version,
        label_run.c.status.in_(UNFINISHED_RUN),
    )


def in_flight_runs(engine: Engine, task: str, model: str, revision: str, prompt_version: str) -> list[int]:
    """Unfinished runs with this key that a live worker is labelling right now (a running job whose
    lease has not run out): what a second `label` started beside the first finds nothing left to take."""
    query = (
        sa.select(label_job.c.run_id)
        .join(label_run, label_run.c.id == label_job.c.run_id)
        .where(
            _unfinished_key(task, model, revision, prompt_version),
            label_job.c.status == JobStatus.RUNNING,
            label_job.c.lease_expires_at >= sa.func.now(),
        )
        .distinct()
        .order_by(label_job.c.run_id)
    )
    with engine.connect() as conn:
        return [int(r) for r in conn.execute(query).scalars()]


def unfinished_jobs(
    engine: Engine, task: str, model: str, revision: str, prompt_version: str, *, limit: int | None
) -> list[tuple[int, int]]:
    """(job id, run id) of jobs that still need a worker in unfinished runs with this key: pending with
    attempts left, or running with an expired lease (their worker is gone)."""
    if limit is not None and limit < 1:
        return []
    query = (
        sa.select(label_job.c.id, label_job.c.run_id)
        .join(label_run, label_run.c.id == label_job.c.run_id)
        .where(
            _unfinished_key(task, model, revision, prompt_version),
            label_job.c.attempts < label_job.c.max_attempts,
            sa.or_(
                label_job.c.status == JobStatus.PENDING,
                sa.and_(
                    label_job.c.status == JobStatus.RUNNING, label_job.c.lease_expires_at < sa.func.now()
                ),
            ),
        )
        .order_by(label_job.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [(int(r.id), int(r.run_id)) for r in conn.execute(query)]
