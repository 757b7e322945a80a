"""
### Qwen-Audio labelling (ASR transcripts + baby-cry detection)

Runs nightly (cron `QWEN_TASKS_SCHEDULE`, default `0 2 * * *` UTC; `off`: no cron), on demand, and on
**asset events** (the run's page shows the events that started it, and `plan` logs the reason):
- `qwen_tasks://dataset/<name>` (from `qwen_audio_ingest`): labels only the datasets that received new audio;
- `qwen_tasks://model/<task>` (a promotion, by `qwen_audio_finetune` or `qwen-tasks models promote`):
  labels that task's datasets again with the promoted version (a new revision).
A cron or manual run labels every dataset of the requested tasks. Steps:

1. **ingest** the audio folders and manifests (new files only; unreadable files are quarantined with
   their reason, never dropped); not on a run started by asset events (`qwen_audio_ingest` lists);
2. **plan**: resume unfinished jobs of earlier runs with the same model and prompt, then plan one
   labelling run per task (`asr`, `cry`) over the audio that has no label yet, split into jobs of at most
   `batch_size` clips and `max_batch_seconds` of audio;
3. **label_batch**, mapped over worker *slots* (`slots`, default the `gpu` pool size; never more than
   the jobs), on the `gpu` pool and the `gpu` Celery queue: each slot loads the model **once** and claims
   jobs until the runs are drained; a slot that dies has its jobs taken over by the others or by its
   Airflow retry. Runs of an original Qwen-Audio model (transformers 4.x) go to
   **label_batch_qwen_audio** instead: the same slots, run by the Qwen-Audio environment's python
   (`QWEN_TASKS_QWEN_AUDIO_PYTHON` on the workers). With `workers=external`, no slot runs:
   **wait_for_workers** defers until a fleet of `qwen-tasks work --follow` processes has labelled the runs;
4. **metrics** (WER/CER, accuracy, AUC, speed) stored per run in `run_metric`;
5. **report** written under `$QWEN_TASKS_HOME/reports/<dag run id>/`.

**Manual run:** *Trigger DAG* → the defaults work as they are; empty optional fields mean the default.
Only ids and counts travel between tasks; the labels are in the labels database:
`SELECT * FROM run_progress ORDER BY run_id DESC;`
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import (
    Asset,
    AssetAlias,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)

from qwen_tasks.config import Settings
from qwen_tasks.labelling.environments import PYTHON_ENV_VAR, interpreter
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.orchestration.assets import NEW_AUDIO_ALIAS, model_uri
from qwen_tasks.orchestration.steps import LABEL_RETRIES, no_retry_for_permanent_errors
from qwen_tasks.orchestration.triggers import WaitForWorkersOperator
from qwen_tasks.records import Task

DAG_ID = "qwen_audio_labelling"
# Environment only (no database, no model at parse time). A bad QWEN_TASKS_* value must not become an
# import error: it is replaced by its default here, and every task fails with the one-line error.
_SETTINGS = Settings.from_env(strict=False)
for _error in _SETTINGS.errors:
    logging.getLogger(__name__).warning("%s (the DAG's tasks will fail until it is fixed)", _error)
# New audio in any dataset (the alias resolves to the dataset assets) or a promoted model, or the cron.
EVENTS = AssetAlias(NEW_AUDIO_ALIAS)
for _task in Task:
    EVENTS = EVENTS | Asset(model_uri(_task))
SCHEDULE = (
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(_SETTINGS.schedule, timezone="UTC"), assets=EVENTS)
    if _SETTINGS.schedule
    else EVENTS
)
# First retry delay (doubles on each retry); the local harness lowers it so a failure shows up quickly.
try:
    RETRY_DELAY = timedelta(seconds=float(os.environ.get("QWEN_TASKS_RETRY_DELAY_SECONDS") or 30))
except ValueError:
    RETRY_DELAY = timedelta(seconds=30)

# The Qwen-Audio environment's python (QWEN_TASKS_QWEN_AUDIO_PYTHON, else the checkout's
# .venv-qwen-audio), read where the DAG is parsed: a worker parses it again before running a task, so
# the path that counts is the worker's. Checked when the task starts, not here.
QWEN_AUDIO_PYTHON = str(interpreter())

# The trigger form: generated from the options object the CLI uses, so they cannot disagree.
PARAMS = {
    name: Param(default, **schema) for name, (default, schema) in LabelOptions.param_specs(_SETTINGS).items()
}


def qwen_audio_slot_starts(context: Any) -> None:
    """label_batch_qwen_audio, on the Airflow side before the Qwen-Audio python starts: that python has
    no Airflow, so the labels database (the Airflow connection) goes into its environment as
    QWEN_TASKS_DATABASE_URL (never into its arguments, which the UI shows); a missing environment fails
    the task with how to create it."""
    from airflow.sdk.exceptions import AirflowFailException

    from qwen_tasks.labelling.environments import how_to_create
    from qwen_tasks.orchestration.connection import resolve_database_url
    from qwen_tasks.orchestration.steps import slot_name

    op = context["task"]
    python = Path(op.python)
    if not python.is_absolute():
        raise AirflowFailException(f"{PYTHON_ENV_VAR} must be an absolute path on the workers, got {python}")
    if not python.is_file():
        raise AirflowFailException(f"runs of an original Qwen-Audio model need it: {how_to_create(python)}")
    with no_retry_for_permanent_errors():
        url = resolve_database_url()
    if url:
        op.env_vars = {**(op.env_vars or {}), "QWEN_TASKS_DATABASE_URL": url}
    context["worker_name"] = slot_name(op.op_kwargs["slot"], len(op.op_kwargs["slots"]))


def qwen_audio_slot_ended(context: Any, result: Any) -> None:
    """label_batch_qwen_audio, on the Airflow side after it: its UI name, and a permanent failure (only
    values cross from the other interpreter) fails the task without retries, as in label_batch."""
    from airflow.sdk.exceptions import AirflowFailException

    context["worker_name"] = result.get("name") or context.get("worker_name")
    if result.get("failed_for_good"):
        raise AirflowFailException(result["failed_for_good"])


@dag(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["qwen-audio", "labelling", "asr", "cry-detection"],
    doc_md=__doc__,
    params=PARAMS,
    default_args={
        "owner": "qwen-tasks",
        "retries": 2,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    },
    dagrun_timeout=timedelta(hours=20),
)
def qwen_audio_labelling():
    @task(multiple_outputs=False)
    def ingest() -> dict:
        """New files into `audio` / `audio_file`; bad ones into quarantine. Returns counts. Not on a run
        started by asset events: qwen_audio_ingest lists the sources, and audio found here would get no
        event of its own (it would wait for the cron outside this run's datasets)."""
        from qwen_tasks.orchestration.assets import events_from_airflow
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import ingest_step

        ctx = get_current_context()
        if events_from_airflow(ctx.get("triggering_asset_events")):
            logging.getLogger(__name__).info(
                "started by asset events: the sources are listed by qwen_audio_ingest"
            )
            return {}
        with no_retry_for_permanent_errors():
            return ingest_step(ctx["params"], database_url=resolve_database_url())

    @task
    def plan(ingested: dict) -> list[int]:
        """Resume unfinished jobs, plan new runs; returns the slot numbers label_batch maps over
        (min(jobs, slots); none with workers=external). The run ids go out as the XCom `run_ids`, the
        counts as `plan`."""
        from airflow.sdk import conf

        from qwen_tasks.orchestration.assets import events_from_airflow, scope_of
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import plan_step

        ctx = get_current_context()
        scope = scope_of(events_from_airflow(ctx.get("triggering_asset_events")), ctx["params"])
        logging.getLogger(__name__).info("why this run: %s", scope.reason)
        ctx["ti"].xcom_push(key="why", value=scope.to_dict())
        with no_retry_for_permanent_errors():
            planned = plan_step(
                scope.apply(ctx["params"]),
                max_jobs=conf.getint("core", "max_map_length", fallback=1024),
                database_url=resolve_database_url(),
                context={"airflow_dag_run": ctx["run_id"], "ingested": ingested, "why": scope.reason},
            )
        ctx["ti"].xcom_push(key="run_ids", value=planned["run_ids"])
        ctx["ti"].xcom_push(key="plan", value={k: v for k, v in planned.items() if k != "job_ids"})
        return list(range(planned["slots"]))

    @task(
        pool="gpu",
        queue="gpu",
        retries=LABEL_RETRIES,
        retry_delay=RETRY_DELAY,
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=15),
        execution_timeout=timedelta(hours=12),
        map_index_template="{{ worker_name }}",
        multiple_outputs=False,
    )
    def label_batch(slot: int, run_ids: list) -> dict:
        """One worker slot: loads the model once (inside the task, never at parse time) and labels jobs
        of this DAG run's runs until none is left."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import slot_name, work_step

        ctx = get_current_context()
        slots = len(ctx["ti"].xcom_pull(task_ids="plan") or []) or 1
        ctx["worker_name"] = slot_name(slot, slots)

        def name(text: str) -> None:
            ctx["worker_name"] = text

        with no_retry_for_permanent_errors():
            return work_step(
                ctx["params"], run_ids, slot=slot, slots=slots, database_url=resolve_database_url(),
                on_name=name,
            )  # fmt: skip

    @task(multiple_outputs=False)
    def qwen_audio_slots(counts: dict) -> list[int]:
        """The slot numbers label_batch_qwen_audio maps over (none unless runs of an original Qwen-Audio
        model were planned): Airflow maps a task only over another's return value, and plan's is
        label_batch's."""
        return list(range(counts["qwen_audio_slots"]))

    @task.external_python(
        python=QWEN_AUDIO_PYTHON,
        expect_airflow=False,  # the Qwen-Audio environment has no Airflow: plain arguments, no context
        pool="gpu",
        queue="gpu",
        retries=LABEL_RETRIES,
        retry_delay=RETRY_DELAY,
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=15),
        execution_timeout=timedelta(hours=12),
        map_index_template="{{ worker_name }}",
        pre_execute=qwen_audio_slot_starts,
        post_execute=qwen_audio_slot_ended,
        multiple_outputs=False,
    )
    def label_batch_qwen_audio(slot: int, run_ids: list, slots: list) -> dict:
        """label_batch for runs of an original Qwen-Audio model, in the Qwen-Audio environment's python
        (transformers 4.x). Airflow runs a copy of this function's source there, with its arguments
        pickled: it may only import and call."""
        from qwen_tasks.orchestration.steps import work_step_elsewhere

        return work_step_elsewhere(run_ids, slot=slot, slots=len(slots))

    @task(trigger_rule="none_failed", multiple_outputs=False)
    def metrics(run_ids: list) -> dict:
        """Quality and speed metrics per run, stored in run_metric."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import metrics_step

        with no_retry_for_permanent_errors():
            return metrics_step(run_ids, database_url=resolve_database_url())

    @task(trigger_rule="none_failed", multiple_outputs=False)
    def report(run_ids: list, computed: dict) -> dict:
        """Report files for this DAG run's runs (the latest runs when nothing new was labelled)."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import report_step

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            return report_step(
                run_ids, ctx["params"], name=ctx["run_id"], database_url=resolve_database_url()
            )

    planned = plan(ingest())
    labelled = label_batch.partial(run_ids=planned["run_ids"]).expand(slot=planned)
    qa_slots = qwen_audio_slots(planned["plan"])
    labelled_qa = label_batch_qwen_audio.partial(run_ids=planned["run_ids"], slots=qa_slots).expand(
        slot=qa_slots
    )
    waited = WaitForWorkersOperator(task_id="wait_for_workers", run_ids=planned["run_ids"])
    computed = metrics(planned["run_ids"])
    [labelled, labelled_qa, waited] >> computed
    report(planned["run_ids"], computed)


qwen_audio_labelling()
