"""The steps of the nightly labelling DAG as plain functions: options and ids in, small dicts out.

`dags/qwen_audio_labelling.py` only wires these together (and `qwen_tasks.dev.demo` runs that DAG), so every
step can be called, tested and debugged without Airflow. Each step:
- takes the DAG's params (a plain mapping, validated again by `LabelOptions.from_mapping`: the UI form
  validates, but the REST API, `airflow dags test` and `dag.test(run_conf=...)` can hand us anything) and
  database ids;
- opens its own engine from `database_url` (None = QWEN_TASKS_DATABASE_URL / embedded server);
- returns a small JSON-able dict of ids and counts, which is what goes into XCom — never audio or rows.

Planning is `labelling.planning.plan` (`qwen-tasks label` calls it too): resume, then plan. Labelling
fans out over worker slots, not jobs: `work_step` is one slot, which loads the model once and claims jobs of
the DAG run's runs until none is left (the lease / SKIP LOCKED claim makes sharing safe). Runs of an
original Qwen-Audio model are labelled by slots of their own in the Qwen-Audio environment's python
(`work_step_elsewhere`, `qwen_tasks.labelling.environments`): each interpreter's slots take the runs it
can load.
Steps are idempotent the way Airflow retries need: ingest upserts, planning never plans audio twice, a
slot whose runs are already done returns at once without loading the model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.config import Settings, get_settings
from qwen_tasks.errors import ConfigError, QwenTasksError
from qwen_tasks.ingest.manifests import ManifestKind
from qwen_tasks.labelling.options import LabelOptions, Workers, absolute_model_path
from qwen_tasks.labelling.planning import plan
from qwen_tasks.orchestration.connection import use_object_storage_connection
from qwen_tasks.progress import ProgressLog
from qwen_tasks.records import RunStatus
from qwen_tasks.store import database as db

log = logging.getLogger(__name__)

# Airflow retries of a label_batch slot (a slot killed with its machine, a model that would not load on
# a busy GPU); job attempts are counted on the jobs themselves (jobs.DEFAULT_MAX_ATTEMPTS).
LABEL_RETRIES = 3
# The figures of a label_batch slot's WorkSummary that go into XCom (not its job ids and errors).
SLOT_FIGURES = ("jobs_done", "jobs_failed", "jobs_retried", "jobs_lost", "labelled", "failed",
                "audio_seconds", "model_load_seconds", "wall_seconds")  # fmt: skip


class JobFailed(QwenTasksError):
    """A job used up its attempts (or failed for good): the mapped Airflow task must fail, visibly."""


@contextmanager
def no_retry_for_permanent_errors() -> Iterator[None]:
    """For the DAGs' tasks: bad params, a missing folder, a refusal such as too few labelled clips, or a
    job out of attempts will not get better by retrying: fail the task now (AirflowFailException), with
    the one-line message."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except (ConfigError, JobFailed) as exc:
        raise AirflowFailException(str(exc)) from exc


def options(params: Mapping[str, Any]) -> LabelOptions:
    """The DAG's params (or any options mapping) validated; ConfigError names the bad option."""
    return LabelOptions.from_mapping(params)


# --- steps ---------------------------------------------------------------------------------------------


def _ingest(params: Mapping[str, Any], engine: Engine) -> dict[str, Any]:
    """Ingest the configured folders and manifests; the whole summary (quarantined paths go to the log)."""
    from qwen_tasks.ingest.register import ingest

    p = options(params)
    db.upgrade(engine)  # a fresh labels database works on the first nightly run
    use_object_storage_connection()
    # str, not Path: a folder may be a bucket prefix (s3://bucket/audio), which pathlib would fold
    manifests: list[tuple[str, ManifestKind | None]] = [(m, "asr") for m in p.asr_manifests]
    manifests += [(m, "aqa") for m in p.aqa_manifests]
    if not p.audio_dirs and not manifests:
        log.warning("no audio_dirs or manifests given: nothing to ingest (set QWEN_TASKS_AUDIO_DIRS)")
    summary = ingest(engine, list(p.audio_dirs), manifests=manifests).to_dict()
    for item in summary.get("quarantine") or []:
        log.warning("quarantined: %s", item)
    return summary


def _counts(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def ingest_step(params: Mapping[str, Any], *, database_url: str | None = None) -> dict[str, Any]:
    """Ingest the configured folders and manifests; returns counts."""
    return _counts(_ingest(params, db.get_engine(database_url)))


def watch_step(params: Mapping[str, Any], *, database_url: str | None = None) -> dict[str, Any]:
    """The ingest DAG's listing: ingest (no model), then one asset event per dataset that received new
    audio (`orchestration.assets.new_audio_events`). Returns counts and `events` (URI + extra, ids and
    counts only) for the task to emit."""
    from qwen_tasks.orchestration.assets import new_audio_events

    engine = db.get_engine(database_url)
    summary = _ingest(params, engine)
    events = new_audio_events(engine, summary.get("datasets") or [])
    for event in events:
        log.info("new audio: %s (%s)", event["uri"], event["extra"])
    if not events:
        log.info("no dataset received new audio: no asset event, no labelling run")
    return {**_counts(summary), "events": events}


def plan_step(
    params: Mapping[str, Any],
    *,
    max_jobs: int | None = None,
    database_url: str | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`plan` for a DAG run; returns ids and counts, plus how many worker slots to map: `slots` for
    label_batch (this interpreter) and `qwen_audio_slots` for label_batch_qwen_audio (runs of an original
    Qwen-Audio model, `qwen_audio_run_ids`); each min(its jobs, the slots param), 0 when nothing is to do
    or the jobs go to external workers. Which interpreter labels a run is read from the plan
    (`Plan.run_choices`: the model chosen once per task)."""
    p = options(params)
    planned = plan(db.get_engine(database_url), p, max_jobs=max_jobs, context=context)
    n_jobs = len(planned.job_ids)
    elsewhere = [r for r in planned.run_ids if planned.run_choices[r].python is not None]
    jobs_elsewhere = sum(planned.run_jobs.get(r, 0) for r in elsewhere)
    airflow = p.workers == Workers.AIRFLOW
    slots = min(n_jobs - jobs_elsewhere, p.slots) if airflow else 0
    qwen_audio_slots = min(jobs_elsewhere, p.slots) if airflow else 0
    out = {
        "run_ids": planned.run_ids,
        "job_ids": planned.job_ids,
        "jobs": n_jobs,
        "items": planned.items,
        "per_task": planned.per_task,
        "workers": p.workers,
        "slots": slots,
        "qwen_audio_run_ids": elsewhere,
        "qwen_audio_slots": qwen_audio_slots,
    }
    if airflow:
        where = f"{slots} label_batch worker(s)"
        if qwen_audio_slots:
            where += f", {qwen_audio_slots} in the Qwen-Audio environment for run(s) {elsewhere}"
    else:
        where = "for external workers"
    log.info("planned %d job(s) in run(s) %s (%d resumed); %s", n_jobs, planned.run_ids,
             planned.resumed_jobs, where)  # fmt: skip
    for task, about in (planned.per_task or {}).items():
        if (about or {}).get("reason"):
            log.info("%s: nothing to label: %s", task, about["reason"])
    return out


def slot_name(slot: int, slots: int, job_names: Sequence[str] = ()) -> str:
    """The mapped task instance's name in the UI: `worker 1/2` while it starts, then with its jobs:
    `worker 1/2: cry run 12 batches 0,2,5 (48 clips)`."""
    name = f"worker {slot + 1}/{slots}"
    return f"{name}: {'; '.join(job_names)}" if job_names else name


def _job_names(engine: Engine, job_ids: Sequence[int]) -> list[str]:
    """`cry run 12 batches 0,2,5 (48 clips)` per run, for the jobs a slot finished."""
    from qwen_tasks.store.schema import label_job, label_run

    if not job_ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(label_run.c.id, label_run.c.task, label_job.c.seq, label_job.c.n_items)
            .join(label_run, label_run.c.id == label_job.c.run_id)
            .where(label_job.c.id.in_(list(job_ids)))
            .order_by(label_run.c.id, label_job.c.seq)
        ).all()
    by_run: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for r in rows:
        by_run.setdefault((r.id, r.task), []).append((r.seq, r.n_items))
    return [
        f"{task} run {run_id} batch{'es' if len(b) > 1 else ''} {','.join(str(s) for s, _ in b)} "
        f"({sum(n for _, n in b)} clips)"
        for (run_id, task), b in by_run.items()
    ]


def work_step(
    params: Mapping[str, Any] | None,
    run_ids: Sequence[int],
    *,
    slot: int = 0,
    slots: int = 1,
    database_url: str | None = None,
    worker: str | None = None,
    on_name: Any = None,
) -> dict[str, Any]:
    """One label_batch slot: load the model once (only if a job is claimable) and label jobs of this DAG
    run's runs until none is pending or running (taking over jobs of a slot that died once their lease
    runs out). Job-level errors are retried on the job (any slot may take it again); a job that used up
    its attempts fails this slot at the end (JobFailed), after the other jobs were done.

    Only runs whose model this interpreter can load are worked; the others are left to the slots of the
    interpreter that can (plan_step maps both). `params` None: device and dtype as planned.
    `on_name(name)` is called with the slot's UI name once its jobs are known (the DAG's map name)."""
    from qwen_tasks.labelling.worker import WorkerOptions, default_worker_id, work

    device, dtype = (None, None)
    if params is not None:
        p = options(params)
        device, dtype = p.device, p.dtype_arg
    settings = get_settings()
    engine = db.get_engine(database_url)
    use_object_storage_connection()  # audio in a bucket is read with the DAG's connection, if it has one
    worker_id = worker or f"{default_worker_id()}:slot{slot + 1}"
    ids = _runs_for_this_interpreter(engine, [int(r) for r in run_ids])
    if not ids:
        return {"slot": slot, "jobs_done": 0, "labelled": 0}

    log.info("worker %d/%d (%s): labelling runs %s", slot + 1, slots, worker_id, ids)
    from qwen_tasks.labelling.jobs import open_job_counts

    # the clips still open in these runs when the slot starts (other slots share them: with several
    # slots, this slot's count stays below the total and the ETA is an upper bound)
    total = int(open_job_counts(engine, ids)["clips"])
    with ProgressLog(f"worker {slot + 1}/{slots} runs {','.join(map(str, ids))}", total) as shown:
        slot_options = WorkerOptions(worker_id=worker_id, lease_seconds=settings.lease_seconds,
                                     device=device, dtype=dtype)  # fmt: skip
        summary = work(
            engine, ids, slot_options,
            progress=lambda o: shown.update(advance=o.labelled + o.failed, audio_seconds=o.audio_seconds),
        )  # fmt: skip
    names = _job_names(engine, summary.job_ids)
    if on_name is not None:
        on_name(slot_name(slot, slots, names))
    log.info(
        "worker %d/%d: %d job(s) done, %d failed, %d retried, %d clips labelled, %d failed clips, "
        "model load %.1f s, wall %.1f s", slot + 1, slots, summary.jobs_done, summary.jobs_failed,
        summary.jobs_retried, summary.labelled, summary.failed, summary.model_load_seconds,
        summary.wall_seconds,
    )  # fmt: skip
    out = {"slot": slot, "worker": worker_id, **summary.to_dict(SLOT_FIGURES, digits=3)}
    if summary.jobs_failed:
        raise JobFailed(
            f"{summary.jobs_failed} job(s) failed after all attempts: {'; '.join(summary.errors[-3:])}"
        )
    return out


def _runs_for_this_interpreter(engine: Engine, run_ids: Sequence[int]) -> list[int]:
    """The runs among `run_ids` whose model this interpreter can load (see environments)."""
    from qwen_tasks.errors import WrongEnvironment
    from qwen_tasks.labelling.backends import check_environment
    from qwen_tasks.labelling.jobs import get_run

    out = []
    for run_id in run_ids:
        try:
            check_environment(get_run(engine, run_id).model, run_id=run_id)
        except WrongEnvironment as exc:
            log.info("run %d is left to the slots of another interpreter: %s", run_id, exc)
            continue
        out.append(run_id)
    return out


def work_step_elsewhere(run_ids: Sequence[int], *, slot: int = 0, slots: int = 1) -> dict[str, Any]:
    """label_batch_qwen_audio's body, run by the Qwen-Audio environment's python (Airflow's
    ExternalPythonOperator; no Airflow there): `work_step` on the database named by
    QWEN_TASKS_DATABASE_URL (the task puts the Airflow connection there), device and dtype as planned,
    SIGTERM giving the job in hand back (this process owns its signals, unlike a task in Airflow's).

    Only values cross the process boundary, so the slot's UI name is returned (`name`), and so is a
    failure that retrying will not fix (`failed_for_good`: bad settings, a job out of attempts) rather
    than raised as an exception, which would arrive as text and be retried."""
    from qwen_tasks.labelling.worker import signals_handled

    names = [slot_name(slot, slots)]
    try:
        with signals_handled():
            out = work_step(None, run_ids, slot=slot, slots=slots, on_name=names.append)
    except (ConfigError, JobFailed) as exc:
        return {"slot": slot, "name": names[-1], "failed_for_good": str(exc)}
    return {**out, "name": names[-1]}


def runs_progress(run_ids: Sequence[int], *, database_url: str | None = None) -> dict[str, Any]:
    """Where this DAG run's runs stand: finished (all done/failed) or not, with per-run job counts
    (the deferrable wait for external workers polls this)."""
    from qwen_tasks.labelling.jobs import run_status_counts
    from qwen_tasks.records import FINISHED_RUN

    counts = run_status_counts(db.get_engine(database_url), run_ids)
    missing = sorted(set(int(r) for r in run_ids) - set(counts))
    if missing:
        raise ConfigError(f"no labelling run with id {missing[0]} (deleted while the DAG waited?)")
    runs = {
        str(run_id): {k: (str(v) if k == "status" else int(v or 0)) for k, v in c.items() if k != "id"}
        for run_id, c in counts.items()
    }
    return {"finished": all(c["status"] in FINISHED_RUN for c in counts.values()), "runs": runs}


def metrics_step(run_ids: Sequence[int], *, database_url: str | None = None) -> dict[str, Any]:
    """Compute and store quality and speed metrics for each run; returns metric counts per run."""
    from qwen_tasks.quality.metrics import compute_run_metrics

    engine = db.get_engine(database_url)
    out: dict[str, Any] = {}
    for run_id in run_ids:
        metrics = compute_run_metrics(engine, int(run_id))
        out[str(run_id)] = {
            k: v for k, v in dict(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return {"runs": len(out), "metrics": out}


def report_dir(params: Mapping[str, Any], settings: Settings | None = None) -> Path:
    """Where reports go: the `report_dir` param, else $QWEN_TASKS_HOME/reports."""
    p = options(params)
    return Path(p.report_dir).expanduser() if p.report_dir else (settings or get_settings()).home / "reports"


def report_step(
    run_ids: Sequence[int], params: Mapping[str, Any], *, name: str, database_url: str | None = None
) -> dict[str, Any]:
    """Write the report for this DAG run's runs (or, when nothing new was labelled, the latest finished
    runs of the requested tasks and model) to `<report_dir>/<name>`; returns its path and the runs."""
    from qwen_tasks.labelling.jobs import latest_run_ids
    from qwen_tasks.quality.report import write_report

    p = options(params)
    engine = db.get_engine(database_url)
    ids = [int(r) for r in run_ids] or latest_run_ids(
        engine, tasks=p.tasks, model=absolute_model_path(p.model), statuses=(RunStatus.DONE,)
    )
    if not ids:
        return {"report": None, "run_ids": [], "reason": "no finished runs yet"}
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "report"
    out = report_dir(params) / safe
    written = write_report(engine, ids, out)
    return {"report": str(written if written is not None else out), "run_ids": ids, "new": bool(run_ids)}
