"""The steps of the nightly labelling DAG as plain functions: params and ids in, small dicts out.

`dags/qwen_audio_labelling.py` only wires these together (and `qwen_tasks.demo` runs that DAG), so every
step can be called, tested and debugged without Airflow. Each step:
- takes the DAG's params (a plain mapping, validated here again: the UI form validates, but the REST API,
  `airflow dags test` and `dag.test(run_conf=...)` can hand us anything) and database ids;
- opens its own engine from `database_url` (None = QWEN_TASKS_DATABASE_URL / embedded server);
- returns a small JSON-able dict of ids and counts, which is what goes into XCom — never audio or rows.

Steps are idempotent the way Airflow retries need: ingest upserts, planning never plans audio twice,
labelling a job that is already done returns at once without loading the model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import db
from .config import Settings, get_settings
from .errors import ConfigError, QwenTasksError
from .records import LabelRequest

log = logging.getLogger(__name__)

TASKS = ("asr", "cry")
METHODS = ("score", "generate", "both")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_LANGUAGE = re.compile(r"[a-z]{2,3}")
# Airflow retries of label_batch; each try is one claim of the job, so jobs get one attempt more.
LABEL_RETRIES = 3


class JobFailed(QwenTasksError):
    """A job used up its attempts (or failed for good): the mapped Airflow task must fail, visibly."""


def env_list(name: str) -> list[str]:
    """A `:`-separated list from the environment (folders and manifests the nightly run ingests)."""
    return [p for p in os.environ.get(name, "").split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class PipelineParams:
    """The DAG's Params, validated. Field names are the Param keys (see `defaults()`)."""

    audio_dirs: tuple[str, ...] = ()
    asr_manifests: tuple[str, ...] = ()
    aqa_manifests: tuple[str, ...] = ()
    tasks: tuple[str, ...] = TASKS
    model: str = ""
    revision: str = ""
    device: str = "auto"
    dtype: str = "auto"
    method: str = "score"
    batch_size: int = 16
    max_batch_seconds: float = 240.0
    limit: int | None = None
    relabel: bool = False
    question: str = LabelRequest(task="cry").question
    yes_threshold: float = 0.5
    max_new_tokens: int = 128
    language: str = "en"
    report_dir: str = ""

    @classmethod
    def defaults(cls, settings: Settings | None = None) -> PipelineParams:
        """Defaults from the environment (QWEN_TASKS_*), read when the DAG file is parsed: env only."""
        s = settings or get_settings()
        return cls(
            audio_dirs=tuple(env_list("QWEN_TASKS_AUDIO_DIRS")),
            asr_manifests=tuple(env_list("QWEN_TASKS_ASR_MANIFESTS")),
            aqa_manifests=tuple(env_list("QWEN_TASKS_AQA_MANIFESTS")),
            model=s.model,
            revision=s.model_revision,
            device=s.device if s.device in DEVICES else "auto",
            batch_size=s.batch_size,
            max_batch_seconds=s.max_batch_seconds,
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> PipelineParams:
        """Validate a params mapping (unknown keys are ignored: Airflow adds its own); ConfigError names
        the field and what is wrong with it."""
        base = cls.defaults()
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name, getattr(base, f.name))
            values[f.name] = _check(f.name, value)
        params = cls(**values)
        params.request("cry")  # LabelRequest's own checks, reported with the field names
        return params

    @property
    def dtype_arg(self) -> str | None:
        """dtype as the backends take it (None = their default: bf16 on CUDA, fp32 on CPU)."""
        return None if self.dtype == "auto" else self.dtype

    @property
    def methods(self) -> tuple[str, ...]:
        return ("score", "generate") if self.method == "both" else (self.method,)

    def request(self, task: str) -> LabelRequest:
        """What to ask the model for `task` (the same request for every clip of that task's run)."""
        try:
            return LabelRequest(
                task=task,  # type: ignore[arg-type]
                language=self.language,
                question=self.question,
                methods=self.methods,  # type: ignore[arg-type]
                max_new_tokens=self.max_new_tokens,
                yes_threshold=self.yes_threshold,
            )
        except ValueError as exc:
            raise ConfigError(f"params: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (lists, not tuples): what the DAG uses as Param defaults."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _bad(name: str, why: str, value: Any) -> ConfigError:
    return ConfigError(f"param {name!r} {why} (got {value!r})")


def _check(name: str, value: Any) -> Any:
    """Type and range checks per field (the same rules as the DAG's Param schema)."""
    if name in ("audio_dirs", "asr_manifests", "aqa_manifests", "tasks"):
        if isinstance(value, str):
            value = [value] if value.strip() else []
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
            raise _bad(name, "must be a list of non-empty strings", value)
        if name == "tasks":
            if not value or any(v not in TASKS for v in value):
                raise _bad(name, f"must be a non-empty list of {list(TASKS)}", value)
            return tuple(dict.fromkeys(value))
        return tuple(value)
    if name in ("model", "question"):
        if not isinstance(value, str) or not value.strip():
            raise _bad(name, "must be a non-empty string", value)
        return value.strip()
    if name in ("revision", "report_dir"):
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _bad(name, "must be a string", value)
        return value.strip()
    if name == "device":
        return _enum(name, value, DEVICES)
    if name == "dtype":
        return _enum(name, value, DTYPES)
    if name == "method":
        return _enum(name, value, METHODS)
    if name == "language":
        if not isinstance(value, str) or not _LANGUAGE.fullmatch(value):
            raise _bad(name, "must be a 2-3 letter language code such as 'en' or 'zh'", value)
        return value
    if name in ("batch_size", "max_new_tokens"):
        return _int(name, value, 1, 1024 if name == "batch_size" else 4096)
    if name == "limit":
        return None if value is None or value == "" else _int(name, value, 1, None)
    if name == "max_batch_seconds":
        number = _number(name, value)
        if not 0 < number <= 86_400:
            raise _bad(name, "must be > 0 and <= 86400 seconds", value)
        return number
    if name == "yes_threshold":
        number = _number(name, value)
        if not 0.0 <= number <= 1.0:
            raise _bad(name, "must be between 0 and 1", value)
        return number
    if name == "relabel":
        if not isinstance(value, bool):
            raise _bad(name, "must be true or false", value)
        return value
    raise ConfigError(f"unknown param {name!r}")  # pragma: no cover - fields and checks are kept in step


def _enum(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _bad(name, f"must be one of {list(allowed)}", value)
    return str(value)


def _int(name: str, value: Any, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "must be an integer", value)
    if value < low or (high is not None and value > high):
        raise _bad(name, f"must be between {low} and {high}" if high else f"must be >= {low}", value)
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "must be a number", value)
    return float(value)


def _engine(database_url: str | None) -> Engine:
    return db.get_engine(database_url)


# --- steps ---------------------------------------------------------------------------------------------


def ingest_step(params: Mapping[str, Any], *, database_url: str | None = None) -> dict[str, Any]:
    """Ingest the configured folders and manifests; returns counts (quarantined paths go to the log)."""
    from .ingest import ingest

    p = PipelineParams.from_mapping(params)
    engine = _engine(database_url)
    db.upgrade(engine)  # a fresh labels database works on the first nightly run
    manifests = [(Path(m), "asr") for m in p.asr_manifests] + [(Path(m), "aqa") for m in p.aqa_manifests]
    if not p.audio_dirs and not manifests:
        log.warning("no audio_dirs or manifests given: nothing to ingest (set QWEN_TASKS_AUDIO_DIRS)")
    summary = ingest(engine, [Path(d) for d in p.audio_dirs], manifests=manifests).to_dict()
    for item in summary.get("quarantine") or []:
        log.warning("quarantined: %s", item)
    return {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def plan_step(
    params: Mapping[str, Any],
    *,
    max_jobs: int | None = None,
    database_url: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Jobs for this DAG run, per requested task: first the unfinished jobs of earlier runs with the same
    model and prompt (a night whose workers died or whose model would not load is picked up the next
    night), then one new run over the audio that has no label yet. At most `max_jobs` jobs in total
    (Airflow's max_map_length); audio left over is planned by the next DAG run."""
    from .backends import describe
    from .jobs import plan_run

    p = PipelineParams.from_mapping(params)
    engine = _engine(database_url)
    run_ids: list[int] = []
    job_ids: list[int] = []
    per_task: dict[str, dict[str, Any]] = {}
    budget = max_jobs
    for task in p.tasks:
        request = p.request(task)
        info = describe(p.model, request, revision=p.revision, device=p.device, dtype=p.dtype_arg)
        resumed = unfinished_jobs(engine, task, info.model, info.revision, info.prompt_version, limit=budget)
        job_ids.extend(job_id for job_id, _ in resumed)
        run_ids.extend(sorted({run_id for _, run_id in resumed} - set(run_ids)))
        if budget is not None:
            budget -= len(resumed)
        entry: dict[str, Any] = {"resumed_jobs": len(resumed), "run_id": None, "jobs": 0, "items": 0}
        per_task[task] = entry
        if budget is not None and budget < 1:
            entry["left_over"] = None  # not counted: no room left in this DAG run
            continue
        result = plan_run(
            engine,
            task=task,
            model_info=info,
            request=request,
            batch_size=p.batch_size,
            max_batch_seconds=p.max_batch_seconds,
            limit=p.limit,
            relabel=p.relabel,
            max_jobs=budget,
            max_attempts=LABEL_RETRIES + 1,
            params={"device": p.device, "dtype": p.dtype_arg, **dict(context or {})},
        )
        if result.run_id is not None:
            run_ids.append(result.run_id)
        job_ids.extend(result.job_ids)
        if budget is not None:
            budget -= len(result.job_ids)
        entry.update(
            run_id=result.run_id, jobs=len(result.job_ids), items=result.n_items, left_over=result.n_left_over
        )
    return {
        "run_ids": run_ids,
        "job_ids": job_ids,
        "jobs": len(job_ids),
        "items": sum(t["items"] for t in per_task.values()),
        "per_task": per_task,
    }


def unfinished_jobs(
    engine: Engine, task: str, model: str, revision: str, prompt_version: str, *, limit: int | None
) -> list[tuple[int, int]]:
    """(job id, run id) of jobs that still need a worker in unfinished runs with this key: pending with
    attempts left, or running with an expired lease (their worker is gone)."""
    from .schema import label_job, label_run

    if limit is not None and limit < 1:
        return []
    query = (
        sa.select(label_job.c.id, label_job.c.run_id)
        .join(label_run, label_run.c.id == label_job.c.run_id)
        .where(
            label_run.c.task == task,
            label_run.c.model == model,
            label_run.c.revision == revision,
            label_run.c.prompt_version == prompt_version,
            label_run.c.status.in_(("planned", "running")),
            label_job.c.attempts < label_job.c.max_attempts,
            sa.or_(
                label_job.c.status == "pending",
                sa.and_(label_job.c.status == "running", label_job.c.lease_expires_at < sa.func.now()),
            ),
        )
        .order_by(label_job.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [(int(r.id), int(r.run_id)) for r in conn.execute(query)]


def job_summary(engine: Engine, job_id: int) -> dict[str, Any]:
    """Run, task, seq, status and size of one job (names the mapped task instance in the Airflow UI)."""
    from .schema import label_job, label_run

    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                label_job.c.run_id,
                label_job.c.seq,
                label_job.c.status,
                label_job.c.n_items,
                label_job.c.audio_seconds,
                label_run.c.task,
                label_run.c.model,
                label_run.c.revision,
            )
            .join(label_run, label_run.c.id == label_job.c.run_id)
            .where(label_job.c.id == job_id)
        ).one_or_none()
    if row is None:
        raise ConfigError(f"no labelling job with id {job_id}")
    return dict(row._mapping)


def batch_name(job: Mapping[str, Any]) -> str:
    """The mapped task instance's name in the UI: `cry run 12 batch 3 (16 clips, 201 s)`."""
    return (
        f"{job['task']} run {job['run_id']} batch {job['seq']} "
        f"({job['n_items']} clips, {float(job['audio_seconds']):.0f} s)"
    )


def label_step(
    job_id: int, params: Mapping[str, Any], *, database_url: str | None = None, worker: str | None = None
) -> dict[str, Any]:
    """Label one planned job with the model its run names (the run is closed after its last job).

    A job already done returns at once without loading the model (an Airflow retry or a cleared task is
    cheap). A job-level error (model crash, storage not mounted) is stored on the job and raised, so
    Airflow retries the task with back-off; each retry is one more attempt of the job. Once the job's
    attempts are used up it is failed and JobFailed is raised: the failure is visible in both places.
    """
    from . import jobs
    from .backends import get_backend
    from .runner import default_worker_id, process_job

    p = PipelineParams.from_mapping(params)
    engine = _engine(database_url)
    job = job_summary(engine, job_id)
    run_id = int(job["run_id"])
    base = {"job_id": job_id, "run_id": run_id, "task": job["task"]}
    if job["status"] == "done":
        log.info("job %s is already done: nothing to do", job_id)
        return {**base, "status": "skipped"}
    if job["status"] == "failed":
        raise JobFailed(f"job {job_id} (run {run_id}) has failed for good: {_last_error(engine, job_id)}")
    run = jobs.get_run(engine, run_id)
    backend = get_backend(**run.load_args, device=p.device, dtype=p.dtype_arg)
    # claims the job (waiting out a dead worker's lease), marks the run running, closes it after the last job
    outcome = process_job(engine, job_id, backend, worker_id=worker or default_worker_id())
    out = {**base, **_small(outcome), "run_status": jobs.get_run(engine, run_id).status}
    if outcome.status == "retry":
        raise QwenTasksError(
            f"job {job_id} attempt {outcome.attempt} failed, will be retried: {outcome.error}"
        )
    failed = outcome.status == "failed" or (
        outcome.status == "skipped" and job_summary(engine, job_id)["status"] == "failed"
    )
    if failed:
        raise JobFailed(
            f"job {job_id} (run {run_id}) failed after {outcome.attempt} attempts: {outcome.error}"
        )
    return out


def _last_error(engine: Engine, job_id: int) -> str:
    from .jobs import job_state

    return str(job_state(engine, job_id).get("last_error") or "no error recorded")


def _small(outcome: Any) -> dict[str, Any]:
    """Numbers and short strings of a result object, for XCom."""
    raw = outcome.to_dict() if hasattr(outcome, "to_dict") else dict(outcome or {})
    return {
        k: v[:500] if isinstance(v, str) else v
        for k, v in raw.items()
        if isinstance(v, int | float | bool | str | None)
    }


def metrics_step(run_ids: Sequence[int], *, database_url: str | None = None) -> dict[str, Any]:
    """Compute and store quality and speed metrics for each run; returns metric counts per run."""
    from .metrics import compute_run_metrics

    engine = _engine(database_url)
    out: dict[str, Any] = {}
    for run_id in run_ids:
        metrics = compute_run_metrics(engine, int(run_id))
        out[str(run_id)] = {
            k: v for k, v in dict(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return {"runs": len(out), "metrics": out}


def report_dir(params: Mapping[str, Any], settings: Settings | None = None) -> Path:
    """Where reports go: the `report_dir` param, else $QWEN_TASKS_HOME/reports."""
    p = PipelineParams.from_mapping(params)
    return Path(p.report_dir).expanduser() if p.report_dir else (settings or get_settings()).home / "reports"


def latest_run_ids(engine: Engine, tasks: Sequence[str], model: str) -> list[int]:
    """The newest finished run per task for `model` (what the report shows when nothing new came in)."""
    from .schema import label_run

    latest = (
        sa.select(sa.func.max(label_run.c.id))
        .where(label_run.c.task.in_(list(tasks)), label_run.c.model == model, label_run.c.status == "done")
        .group_by(label_run.c.task)
    )
    with engine.connect() as conn:
        return sorted(int(r) for r in conn.execute(latest).scalars())


def report_step(
    run_ids: Sequence[int], params: Mapping[str, Any], *, name: str, database_url: str | None = None
) -> dict[str, Any]:
    """Write the report for this DAG run's runs (or, when nothing new was labelled, the latest runs) to
    `<report_dir>/<name>`; returns its path and the runs it covers."""
    from .report import write_report

    p = PipelineParams.from_mapping(params)
    engine = _engine(database_url)
    ids = [int(r) for r in run_ids] or latest_run_ids(engine, p.tasks, p.model)
    if not ids:
        return {"report": None, "run_ids": [], "reason": "no finished runs yet"}
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "report"
    out = report_dir(params) / safe
    written = write_report(engine, ids, out)
    return {"report": str(written if written is not None else out), "run_ids": ids, "new": bool(run_ids)}
