"""
### Qwen-Audio labelling (ASR transcripts + baby-cry detection)

Runs nightly (cron `QWEN_TASKS_SCHEDULE`, default `0 2 * * *` UTC) and on demand:

1. **ingest** the audio folders and manifests (new files only; unreadable files are quarantined with
   their reason, never dropped);
2. **plan** one labelling run per task (`asr`, `cry`) over the audio that has no label yet for this
   model, revision and prompt version, split into jobs of at most `batch_size` clips and
   `max_batch_seconds` of audio (at most `[core] max_map_length` jobs per DAG run; the rest waits for
   the next run);
3. **label_batch**, one mapped task per job, on the `gpu` pool and the `gpu` Celery queue, with
   retries and exponential back-off;
4. **metrics** (WER/CER, accuracy, AUC, speed) stored per run in `run_metric`;
5. **report** written under `$QWEN_TASKS_HOME/reports/<dag run id>/`.

**Manual run:** *Trigger DAG* → fill in the form (folders, manifests, tasks, model, method, ...).
Only ids and counts travel between tasks; the labels are in the `qwen_tasks_db` database:
`SELECT * FROM run_progress ORDER BY run_id DESC;`
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from qwen_tasks.errors import ConfigError
from qwen_tasks.pipeline import DEVICES, DTYPES, LABEL_RETRIES, METHODS, TASKS, JobFailed, PipelineParams

DAG_ID = "qwen_audio_labelling"
SCHEDULE = os.environ.get("QWEN_TASKS_SCHEDULE", "0 2 * * *").strip() or None
_DEFAULTS = PipelineParams.defaults()  # environment only: no database, no model at parse time
# First retry delay (doubles on each retry); the local harness lowers it so a failure shows up quickly.
RETRY_DELAY = timedelta(seconds=float(os.environ.get("QWEN_TASKS_RETRY_DELAY_SECONDS") or 30))


def _string_list(title: str, description: str, default: tuple[str, ...]) -> Param:
    return Param(
        list(default),
        type="array",
        items={"type": "string", "minLength": 1},
        title=title,
        description=description,
    )


@contextmanager
def no_retry_for_permanent_errors() -> Iterator[None]:
    """Bad params, a missing folder or a job out of attempts will not get better by retrying: fail now."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except (ConfigError, JobFailed) as exc:
        raise AirflowFailException(str(exc)) from exc


PARAMS = {
    "audio_dirs": _string_list(
        "Audio folders",
        "Folders scanned recursively for audio (one per line). Default: QWEN_TASKS_AUDIO_DIRS.",
        _DEFAULTS.audio_dirs,
    ),
    "asr_manifests": _string_list(
        "ASR manifests",
        'jsonl files with {"audio", "text"} lines (reference transcripts).',
        _DEFAULTS.asr_manifests,
    ),
    "aqa_manifests": _string_list(
        "Cry / audio-QA manifests",
        'jsonl files with {"question", "audio", "gt", "source"} lines (gold yes/no labels).',
        _DEFAULTS.aqa_manifests,
    ),
    "tasks": Param(
        list(_DEFAULTS.tasks),
        type="array",
        items={"type": "string", "enum": list(TASKS)},
        minItems=1,
        uniqueItems=True,
        title="Tasks",
        description="asr = transcripts, cry = is a baby crying (yes/no/unknown).",
    ),
    "model": Param(
        _DEFAULTS.model, type="string", minLength=1, title="Model", description="Hub id or local path."
    ),
    "revision": Param(
        _DEFAULTS.revision,
        type="string",
        title="Revision",
        description="Pinned hub revision (empty = default).",
    ),
    "device": Param(_DEFAULTS.device, type="string", enum=list(DEVICES), title="Device"),
    "dtype": Param(_DEFAULTS.dtype, type="string", enum=list(DTYPES), title="Weights dtype"),
    "method": Param(
        _DEFAULTS.method,
        type="string",
        enum=list(METHODS),
        title="Cry method",
        description="score = P(yes) from one forward pass; generate = free answer, normalised; both.",
    ),
    "batch_size": Param(
        _DEFAULTS.batch_size, type="integer", minimum=1, maximum=1024, title="Clips per batch"
    ),
    "max_batch_seconds": Param(
        _DEFAULTS.max_batch_seconds,
        type="number",
        exclusiveMinimum=0,
        maximum=86400,
        title="Audio seconds per batch",
        description="One mapped task labels at most this much audio.",
    ),
    "limit": Param(
        None, type=["null", "integer"], minimum=1, title="Limit", description="Label at most this many clips."
    ),
    "relabel": Param(
        False, type="boolean", title="Relabel", description="Label again audio that has labels."
    ),
    "question": Param(_DEFAULTS.question, type="string", minLength=1, title="Cry question"),
    "yes_threshold": Param(
        _DEFAULTS.yes_threshold, type="number", minimum=0, maximum=1, title="Yes threshold"
    ),
    "max_new_tokens": Param(
        _DEFAULTS.max_new_tokens, type="integer", minimum=1, maximum=4096, title="Max new tokens"
    ),
    "language": Param(
        _DEFAULTS.language,
        type="string",
        pattern="^[a-z]{2,3}$",
        title="ASR language",
        description="en, zh, ...",
    ),
    "report_dir": Param(
        _DEFAULTS.report_dir,
        type="string",
        title="Report folder",
        description="Empty = $QWEN_TASKS_HOME/reports. One sub-folder per DAG run.",
    ),
}


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
        """New files into `audio` / `audio_file`; bad ones into quarantine. Returns counts."""
        from qwen_tasks.airflow_conn import resolve_database_url
        from qwen_tasks.pipeline import ingest_step

        with no_retry_for_permanent_errors():
            return ingest_step(get_current_context()["params"], database_url=resolve_database_url())

    @task
    def plan(ingested: dict) -> list[int]:
        """One run per task; returns the job ids label_batch maps over (at most [core] max_map_length).
        The run ids (for metrics and report) and per-task counts go out as the XComs `run_ids` and `plan`."""
        from airflow.sdk import conf

        from qwen_tasks.airflow_conn import resolve_database_url
        from qwen_tasks.pipeline import plan_step

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            planned = plan_step(
                ctx["params"],
                max_jobs=conf.getint("core", "max_map_length", fallback=1024),
                database_url=resolve_database_url(),
                context={"airflow_dag_run": ctx["run_id"], "ingested": ingested},
            )
        ctx["ti"].xcom_push(key="run_ids", value=planned["run_ids"])
        ctx["ti"].xcom_push(key="plan", value={k: v for k, v in planned.items() if k != "job_ids"})
        return planned["job_ids"]

    @task(
        pool="gpu",
        queue="gpu",
        retries=LABEL_RETRIES,
        retry_delay=RETRY_DELAY,
        retry_exponential_backoff=True,
        max_retry_delay=timedelta(minutes=15),
        execution_timeout=timedelta(hours=2),
        map_index_template="{{ batch_name }}",
        multiple_outputs=False,
    )
    def label_batch(job_id: int) -> dict:
        """Label one job; the model is loaded inside the task (never at parse time)."""
        from qwen_tasks import db
        from qwen_tasks.airflow_conn import resolve_database_url
        from qwen_tasks.pipeline import batch_name, job_summary, label_step

        ctx = get_current_context()
        ctx["batch_name"] = f"job {job_id}"  # the UI name if the lookup below fails
        url = resolve_database_url()
        with no_retry_for_permanent_errors():
            ctx["batch_name"] = batch_name(job_summary(db.get_engine(url), job_id))
            return label_step(job_id, ctx["params"], database_url=url)

    @task(trigger_rule="none_failed", multiple_outputs=False)
    def metrics(run_ids: list) -> dict:
        """Quality and speed metrics per run, stored in run_metric."""
        from qwen_tasks.airflow_conn import resolve_database_url
        from qwen_tasks.pipeline import metrics_step

        with no_retry_for_permanent_errors():
            return metrics_step(run_ids, database_url=resolve_database_url())

    @task(trigger_rule="none_failed", multiple_outputs=False)
    def report(run_ids: list, computed: dict) -> dict:
        """Report files for this DAG run's runs (the latest runs when nothing new was labelled)."""
        from qwen_tasks.airflow_conn import resolve_database_url
        from qwen_tasks.pipeline import report_step

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            return report_step(
                run_ids, ctx["params"], name=ctx["run_id"], database_url=resolve_database_url()
            )

    planned = plan(ingest())
    labelled = label_batch.expand(job_id=planned)
    computed = metrics(planned["run_ids"])
    labelled >> computed
    report(planned["run_ids"], computed)


qwen_audio_labelling()
