"""The worker loop: claim a job, run it through its stages (`stages`), record the outcome, repeat; and
`label`, which plans (`labelling.planning`) and then runs that loop in the same process.

One loop serves every caller: `qwen-tasks label` and `work`, the DAG's label_batch slots, `work
--follow`, the fine-tune evaluation runs. What differs between them is a `WorkerOptions` (who the worker
is, its lease, when it stops, device and dtype) and which runs it may claim. The model is loaded when the
first job is claimed, under that job's lease, and refused before any claim when it needs another Python
environment, so such a refusal uses up no attempt.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks import options_spec
from qwen_tasks.errors import ConfigError, ModelError, QwenTasksError, WrongEnvironment
from qwen_tasks.labelling import jobs, planning
from qwen_tasks.labelling.backends import check_environment
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.options import Dtype
from qwen_tasks.labelling.registry import ModelChoice
from qwen_tasks.labelling.worker.leases import LeaseKeeper, StopFlag, default_worker_id, why
from qwen_tasks.labelling.worker.results import WriteFailed
from qwen_tasks.labelling.worker.stages import Overlapped, check_backend, process_job
from qwen_tasks.labelling.worker.summary import JobOutcome, WorkSummary
from qwen_tasks.options_spec import Spec, from_setting, option
from qwen_tasks.records import FINISHED_JOB, UNFINISHED_JOB, JobOutcomeStatus, RunStatus

log = logging.getLogger(__name__)


class Until(StrEnum):
    """When a worker stops on its own: `idle` (nothing claimable now), `drained` (its runs have no
    pending or running job left: it also waits for other workers' jobs and takes over any whose lease
    runs out), `stopped` (never: `work --follow` serves new runs until SIGTERM)."""

    IDLE = "idle"
    DRAINED = "drained"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker runs: the settings `work` takes (CLI flags, a DAG slot's, `label`'s), one declaration
    per option (`options_spec`): `qwen-tasks work`'s flags (and `label --lease-seconds`) are generated
    from these. `until` and `overlap` have no flag (`work --follow` / `--wait` choose `until`)."""

    worker_id: str | None = option(
        None,
        Spec("str", "Worker id", "Name recorded on the jobs", nullable=True, dag=False,
             default_text="host:pid:rnd"),
    )  # fmt: skip
    lease_seconds: float = from_setting(
        Spec("float", "Lease seconds", "A killed worker's job is taken over after this long", minimum=0.5,
             setting="lease_seconds", dag=False),
    )  # fmt: skip
    until: Until = Until.DRAINED
    max_jobs: int | None = option(
        None,
        Spec("int", "Max jobs", "Stop after N jobs", nullable=True, minimum=1, dag=False,
             default_text="no limit"),
    )  # fmt: skip
    poll_seconds: float = option(
        5.0,
        Spec("float", "Poll seconds", "--follow, or waiting for a lease: look for jobs at least this often",
             minimum=0.1, dag=False),
    )  # fmt: skip
    overlap: bool | None = None  # None: QWEN_TASKS_OVERLAP (on)
    device: str | None = option(
        None,
        Spec("str", "Device", "auto, cpu or cuda[:N]", nullable=True, dag=False,
             default_text="what each run was planned with"),
    )  # fmt: skip
    dtype: str | None = option(
        None,
        Spec("enum", "Weights dtype", "auto = bfloat16 on CUDA, float32 on CPU", choices=Dtype, nullable=True,
             dag=False, default_text="as planned"),
    )  # fmt: skip

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], **fixed: Any) -> WorkerOptions:
        """From CLI flags keyed by field name (missing or None: the default, the environment's for the
        lease); errors name the flag. `fixed`: the fields without a flag (`until`)."""
        return cls(**options_spec.from_mapping(cls, flags, flags=True), **fixed)


BackendFactory = Callable[[jobs.RunInfo], Backend]


def backend_for_run(
    device: str | None = None,
    dtype: str | None = None,
    choices: Mapping[int, ModelChoice] | None = None,
) -> BackendFactory:
    """The usual factory: the run's own model (base checkpoint at its revision, plus the adapter of a
    fine-tuned version: RunInfo.load_args), on `device`/`dtype` or what the run was planned with; with
    the backend kind its plan chose (`choices`: run id -> ModelChoice), else detected from the model."""

    def load(run: jobs.RunInfo) -> Backend:
        from qwen_tasks.config import get_settings
        from qwen_tasks.labelling.backends import get_backend

        planned_device = run.params.get("device") or get_settings().device
        planned_dtype = run.params.get("dtype")
        choice = (choices or {}).get(run.id)
        kind = choice.backend if choice is not None and choice.backend else "auto"
        return get_backend(
            **run.load_args, device=device or planned_device, dtype=dtype or planned_dtype, backend=kind
        )

    return load


def _model_key(run: jobs.RunInfo) -> tuple[str, str]:
    """Runs with the same key are served by one loaded model (the revision names an adapter too)."""
    return (run.model, run.revision)


def work(
    engine: Engine,
    runs: jobs.RunSelector,
    options: WorkerOptions | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    backend: Backend | None = None,
    model: tuple[str, str] | None = None,
    progress: Callable[[JobOutcome], None] | None = None,
    stop: StopFlag | None = None,
) -> WorkSummary:
    """The one worker loop (CLI `label`/`work`, the DAG's label_batch, `work --follow`): claim a job of
    `runs` (run ids; or every unfinished run of `model` = (model, revision) when runs is None), label it,
    commit, repeat; see `Until` for when it stops. Free jobs are always taken before the worker waits
    for a lease held by someone else, so a retry never sits out a dead worker's lease while work is free.

    The model is loaded (`backend_factory(run)`, default `backend_for_run` on the options' device and
    dtype) when the first job is claimed (or pass a loaded `backend`); once loaded, jobs of runs with the
    same model are claimed first, so a worker whose runs use different models (a promoted fine-tuned
    version for cry, the base for ASR) loads each of them once. A model that needs another Python
    environment is refused before any job is claimed, so the refusal uses up no attempt. SIGTERM/Ctrl-C
    while a job is in hand give it back without using one. `stop` set: stop after the job in hand.

    `options.overlap` (default: QWEN_TASKS_OVERLAP, on) reads and featurises the next job while the model
    runs this one and writes the previous one meanwhile (`stages.Overlapped`); off, one job after the other.
    """
    opts = options or WorkerOptions()
    until = Until(opts.until)
    overlap = overlap_from_env() if opts.overlap is None else opts.overlap
    worker_id = opts.worker_id or default_worker_id()
    lease = opts.lease_seconds
    factory = backend_factory or backend_for_run(opts.device, opts.dtype)
    summary = WorkSummary(worker_id=worker_id, run_id=runs if isinstance(runs, int) else None)
    if runs is not None:
        summary.run_ids = [runs] if isinstance(runs, int) else [int(r) for r in runs]
    known: dict[int, jobs.RunInfo] = {r: jobs.get_run(engine, r) for r in summary.run_ids}
    for run_id, info in known.items():
        check_environment(info.model, run_id=run_id)
    if model is not None:
        check_environment(model[0])
    started = time.perf_counter()

    def record(run: jobs.RunInfo, job: jobs.Job, outcome: JobOutcome) -> None:
        summary.count(outcome)
        _log_outcome(engine, run, job, outcome)
        if progress is not None:
            progress(outcome)

    waiting_for: tuple[Any, ...] | None = None
    loaded: tuple[str, str] | None = None
    n_jobs = 0
    while (opts.max_jobs is None or n_jobs < opts.max_jobs) and not stop:
        job = None
        if loaded is not None and model is None:  # keep the loaded model busy before switching
            job = jobs.claim_job(engine, runs, worker_id, lease, model=loaded)
        if job is None:
            job = jobs.claim_job(engine, runs, worker_id, lease, model=model)
        if job is None:
            for run_id in summary.run_ids:
                jobs.finish_run_if_complete(engine, run_id)
            if until == Until.IDLE or stop:
                break
            waiting_for = _wait_for_jobs(engine, runs, model, until, opts.poll_seconds, waiting_for)
            if waiting_for is None:
                break
            continue
        waiting_for = None
        try:
            run = known.get(job.run_id) or known.setdefault(job.run_id, jobs.get_run(engine, job.run_id))
            if job.run_id not in summary.run_ids:
                summary.run_ids.append(job.run_id)
            if backend is None or (loaded is not None and _model_key(run) != loaded):
                check_environment(run.model, run_id=run.id)
                backend = _load_backend(engine, run, job, worker_id, lease, factory, summary)
                loaded = _model_key(run)
            if overlap:
                n_jobs += Overlapped(
                    engine, backend, runs=runs, model=loaded or model, worker_id=worker_id,
                    lease_seconds=lease, known=known, record=record, stop=stop,
                    budget=None if opts.max_jobs is None else opts.max_jobs - n_jobs,
                ).run(job)  # fmt: skip
                continue
            outcome = process_job(engine, job, backend, worker_id=worker_id, lease_seconds=lease)
        except WriteFailed:
            raise  # the job was released with its attempt counted (or its lease will run out)
        except BaseException as exc:
            # anything between the claim and the job's own handling: do not keep the job hostage
            jobs.give_back(engine, job, worker_id, f"worker stopped ({why(exc)})")
            raise
        n_jobs += 1
        record(run, job, outcome)
    if stop:
        summary.stopped = stop.reason
    if summary.run_id is not None:
        summary.run_status = jobs.get_run(engine, summary.run_id).status
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _wait_for_jobs(
    engine: Engine,
    runs: jobs.RunSelector,
    model: tuple[str, str] | None,
    until: Until,
    poll_seconds: float,
    waiting_for: tuple[Any, ...] | None,
) -> tuple[Any, ...] | None:
    """Nothing claimable now: None when the worker is done (`drained`), else wait a while (for a lease
    to run out, or for new jobs) and return what it waited for (logged once per change)."""
    counts = jobs.open_job_counts(engine, runs, model=model)
    if until == Until.DRAINED and not counts["pending"] and not counts["running"]:
        return None
    state = (counts["pending"], counts["running"], tuple(counts["holders"]))
    if state != waiting_for:
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
    return state


def overlap_from_env() -> bool:
    """`QWEN_TASKS_OVERLAP`: 1 (default) runs a worker's stages overlapped, 0 one job after the other."""
    value = os.environ.get("QWEN_TASKS_OVERLAP", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"QWEN_TASKS_OVERLAP must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes", "on")


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
        jobs.give_back(engine, job, worker_id, f"worker could not load the model: {exc or why(exc)}")
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


def label(
    engine: Engine,
    options: Any,
    worker: WorkerOptions | None = None,
    *,
    choices: Mapping[str, ModelChoice] | None = None,
    max_jobs: int | None = None,
    plan_only: bool = False,
    on_plan: Callable[[planning.Plan], None] | None = None,
    progress: Callable[[JobOutcome], None] | None = None,
    backend_factory: BackendFactory | None = None,
    stop: StopFlag | None = None,
) -> WorkSummary:
    """`qwen-tasks label`: the DAG's planning step (resume unfinished jobs of this model and prompt, then
    plan a run over what has no label yet, at most `max_jobs` jobs) and the worker loop, in this process,
    until the runs are done.

    `options` is a `qwen_tasks.labelling.options.LabelOptions` with one task; `choices` the model chosen
    for it when the caller chose it already (`planning.choose_models`), recorded on the plan and used by
    the worker to load it. `worker`: the worker's settings (device and dtype default to the options').
    A model that will not load leaves no run behind: the run planned by this call is discarded (resumed
    runs stay for the next try)."""
    started = time.perf_counter()
    planned = planning.plan(engine, options, max_jobs=max_jobs, choices=choices)
    if on_plan is not None:
        on_plan(planned)
    summary = WorkSummary(
        run_id=planned.run_ids[-1] if planned.run_ids else None,
        run_ids=list(planned.run_ids),
        planned=planned.items,
        jobs=len(planned.job_ids),
        left_over=planned.left_over,
        resumed_jobs=planned.resumed_jobs,
    )
    if not planned.run_ids:
        entry = planned.per_task.get(options.tasks[0]) or {}
        summary.reason = entry.get("reason")
        summary.in_flight_run_ids = list(entry.get("in_flight_run_ids") or [])
    if not planned.run_ids or plan_only:
        summary.run_status = RunStatus.PLANNED if planned.run_ids else None
        summary.wall_seconds = time.perf_counter() - started
        return summary
    worker = worker or WorkerOptions()
    worker = replace(worker, device=worker.device or options.device, dtype=worker.dtype or options.dtype_arg)
    factory = backend_factory or backend_for_run(worker.device, worker.dtype, planned.run_choices)
    try:
        done = work(
            engine, planned.run_ids, replace(worker, until=Until.DRAINED), backend_factory=factory,
            progress=progress, stop=stop,
        )  # fmt: skip
    except WrongEnvironment:
        raise  # the plan is right, only this interpreter cannot run it: keep it for `work --run`
    except ModelError:
        for run_id in planned.new_run_ids:
            if jobs.discard_untouched_run(engine, run_id):
                log.warning("run %d discarded: the model could not be loaded, nothing was labelled", run_id)
        raise
    summary.merge(done)
    summary.run_status = jobs.get_run(engine, summary.run_id).status if summary.run_id is not None else None
    summary.wall_seconds = time.perf_counter() - started
    return summary
