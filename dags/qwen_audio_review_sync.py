"""
### Live review with Label Studio (hourly)

Keeps a Label Studio server and the labels database in step:

1. **push**: for each task, the review queue (`strategy`, with a `random_share` of uniform picks) of each
   dataset goes to that dataset's project (`qwen-tasks <dataset> <task>`, created when missing), at most
   `limit` new clips per project, the model's answer pre-filled; never a clip twice to a project, never a
   clip already reviewed;
2. **pull**: new, changed and deleted annotations come back; each clip's human label is resolved from
   its reviewers' answers (docs/review.md) and wins in `cry_gold`, `asr_reference` and fine-tuning.

The server is the Airflow connection `qwen_tasks_label_studio` (host = URL, password = API key, extra
`{"document_root": "..."}` = Label Studio's LOCAL_FILES_DOCUMENT_ROOT), else `LABEL_STUDIO_URL`,
`LABEL_STUDIO_API_KEY` and `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`. Only counts travel through XCom.
Same as `qwen-tasks review push --task T` and `qwen-tasks review pull`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from qwen_tasks.orchestration.assets import NEW_REVIEWS_ALIAS, reviews_uri
from qwen_tasks.orchestration.review_sync import SyncOptions

DAG_ID = "qwen_audio_review_sync"
# Generated from SyncOptions (one declaration per option; the steps check the same rules again).
PARAMS = {name: Param(default, **schema) for name, (default, schema) in SyncOptions.param_specs().items()}


NEW_REVIEWS = AssetAlias(NEW_REVIEWS_ALIAS)


@dag(
    dag_id=DAG_ID,
    schedule="@hourly",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["qwen-audio", "review", "label-studio"],
    doc_md=__doc__,
    params=PARAMS,
    default_args={"owner": "qwen-tasks", "retries": 2, "retry_delay": timedelta(minutes=2)},
    dagrun_timeout=timedelta(minutes=55),
)
def qwen_audio_review_sync():
    @task
    def push() -> dict:
        """Push each task's review queue to its dataset projects; returns counts."""
        from qwen_tasks.orchestration.review_sync import push_step
        from qwen_tasks.orchestration.steps import no_retry_for_permanent_errors

        with no_retry_for_permanent_errors():
            return push_step(dict(get_current_context()["params"]))

    @task(trigger_rule="all_done", outlets=[NEW_REVIEWS])  # answers given come back even when a push failed
    def pull() -> dict:
        """Pull new, changed and deleted annotations; returns counts. Each task whose human labels this
        pull wrote gets a `reviews/<task>` asset event: that task's fine-tune DAG checks whether enough
        reviewed labels are new (QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED)."""
        from qwen_tasks.orchestration.review_sync import pull_step
        from qwen_tasks.orchestration.steps import no_retry_for_permanent_errors

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            counts = pull_step(dict(ctx["params"]))
        for reviewed_task, n in counts["reviewed"].items():
            extra = {"task": reviewed_task, "reviewed": n, "source": "qwen_audio_review_sync pull"}
            ctx["outlet_events"][NEW_REVIEWS].add(Asset(reviews_uri(reviewed_task)), extra=extra)
        return counts

    push() >> pull()


qwen_audio_review_sync()
