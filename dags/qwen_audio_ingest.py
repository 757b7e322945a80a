"""
### Qwen-Audio ingest: list the audio sources often, announce the datasets that received new audio

Runs on the cron `QWEN_TASKS_INGEST_SCHEDULE` (default `*/15 * * * *` UTC; `off` or empty: never by
itself) and on demand. Cheap by design: it only lists and checks files (no model, no GPU):

1. **ingest** the configured folders and manifests (the labelling DAG's `audio_dirs`, `asr_manifests`,
   `aqa_manifests` and their defaults), new and changed files only;
2. for each dataset that received new audio, an **asset event** on `qwen_tasks://dataset/<name>`
   (through the alias `qwen_tasks_new_audio`), whose extra holds the dataset's name and id, the number of
   new clips and its sources. The `qwen_audio_labelling` DAG runs on these events and labels only those
   datasets. A listing that finds nothing new emits nothing and starts nothing.

Only counts travel in XCom; the event extras hold ids and counts, never audio or credentials.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from qwen_tasks.config import Settings
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.orchestration.assets import NEW_AUDIO_ALIAS
from qwen_tasks.orchestration.steps import no_retry_for_permanent_errors

DAG_ID = "qwen_audio_ingest"
# Environment only: a bad QWEN_TASKS_* value is replaced by its default here and fails the task.
_SETTINGS = Settings.from_env(strict=False)
# The sources: the labelling DAG's own Params (same options object, same defaults).
SOURCES = ("audio_dirs", "asr_manifests", "aqa_manifests")
PARAMS = {
    name: Param(default, **schema)
    for name, (default, schema) in LabelOptions.param_specs(_SETTINGS).items()
    if name in SOURCES
}
NEW_AUDIO = AssetAlias(NEW_AUDIO_ALIAS)


@dag(
    dag_id=DAG_ID,
    schedule=_SETTINGS.ingest_schedule,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["qwen-audio", "ingest", "assets"],
    doc_md=__doc__,
    params=PARAMS,
    default_args={"owner": "qwen-tasks", "retries": 2, "retry_delay": timedelta(seconds=30)},
    dagrun_timeout=timedelta(hours=2),
)
def qwen_audio_ingest():
    @task(outlets=[NEW_AUDIO])
    def ingest() -> dict:
        """New files into `audio` / `audio_file`; one asset event per dataset that received new audio."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.steps import watch_step

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            out = watch_step(ctx["params"], database_url=resolve_database_url())
        for event in out.pop("events"):
            ctx["outlet_events"][NEW_AUDIO].add(Asset(event["uri"]), extra=event["extra"])
            out["datasets_with_new_audio"] = out.get("datasets_with_new_audio", 0) + 1
        return out

    ingest()


qwen_audio_ingest()
