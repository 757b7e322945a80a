"""
### Qwen-Audio fine-tune from reviewed labels

Starts on demand, and by itself when reviewed labels are imported: `qwen-tasks review-import` posts an
asset event on `qwen_tasks://reviews/<task>` (when `QWEN_TASKS_AIRFLOW_URL` is set). Such a run first asks
whether the task has at least `QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED` (default 200) reviewed labels newer
than its promoted version: if not, **enough_new_reviews** says so in its log and the run ends with every
other task *skipped* (not failed). A manual run always trains. Makes the model better from what
reviewers confirmed, and only keeps a version that is measurably better:

1. **prepare**: the labelled audio of the task (human labels first, then manifest gold / references) in
   the train datasets of `datasets` (empty: every train dataset of the task), never a clip of any test
   dataset; the stored train / held-out split (by audio content; held-out audio is never trained on);
   refuses with one line when there are too few labelled clips, only one class, or a dataset name is
   unknown / of the wrong split / not labelled for the task;
2. **train** (pool `gpu`): a LoRA adapter on the training part, saved and registered in `model_version`;
3. **evaluate** (pool `gpu`): two real labelling runs over the held-out audio — base and fine-tuned — and
   the promotion gate (cry: ROC AUC and F1, ASR: error rate, by `min_improvement`); then the same two runs
   over each test dataset of `test_datasets` (empty: every test dataset of the task with labelled clips),
   reported beside the held-out figures (the gate stays on the held-out split);
4. **promote** when `auto_promote` is on and the gate passed, with an asset event on
   `qwen_tasks://model/<task>`: the `qwen_audio_labelling` DAG starts at once and labels the task's
   datasets with this version (its labels get a new revision, so everything is labelled again);
5. **report**: base vs fine-tuned side by side on the same held-out audio.

Each task's body is a step of `qwen_tasks.orchestration.finetune_steps`; only the version name, run ids
and counts travel between tasks. Compare versions in SQL:
`SELECT * FROM model_version_quality ORDER BY created_at DESC;` and, held-out and test sets side by side,
`SELECT * FROM model_version_evaluation WHERE name = '<version>';`
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from qwen_tasks.config import Settings
from qwen_tasks.finetune.options import dag_param_specs
from qwen_tasks.orchestration.assets import PROMOTED_ALIAS, TASKS, reviews_uri
from qwen_tasks.orchestration.steps import no_retry_for_permanent_errors

DAG_ID = "qwen_audio_finetune"
# Environment only, never an import error (a bad QWEN_TASKS_* value fails the tasks with one line).
PARAMS = {
    name: Param(spec.pop("default"), **spec)
    for name, spec in dag_param_specs(Settings.from_env(strict=False)).items()
}
# Imported reviewed labels of any task (the first task checks whether there are enough).
REVIEWS = Asset(reviews_uri(TASKS[0]))
for _task in TASKS[1:]:
    REVIEWS = REVIEWS | Asset(reviews_uri(_task))
PROMOTED = AssetAlias(PROMOTED_ALIAS)


def _params() -> dict:
    """The run's params, with the task its reviews chose when imported reviews started it."""
    ctx = get_current_context()
    params = dict(ctx["params"])
    chosen = ctx["ti"].xcom_pull(task_ids="enough_new_reviews")
    if isinstance(chosen, dict) and chosen.get("task"):  # a run started by reviews: their task
        params["task"] = chosen["task"]
    return params


@dag(
    dag_id=DAG_ID,
    schedule=REVIEWS,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["qwen-audio", "fine-tune", "review"],
    doc_md=__doc__,
    params=PARAMS,
    default_args={"owner": "qwen-tasks", "retries": 1, "retry_delay": timedelta(minutes=1)},
    dagrun_timeout=timedelta(hours=24),
)
def qwen_audio_finetune():
    @task.short_circuit
    def enough_new_reviews() -> dict:
        """A run started by imported reviews goes on only when a task of theirs has enough reviewed labels
        newer than its promoted version (otherwise every later task is skipped); a manual run always does."""
        from qwen_tasks.orchestration.assets import events_from_airflow
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import enough_new_reviews_step

        events = events_from_airflow(get_current_context().get("triggering_asset_events"))
        with no_retry_for_permanent_errors():
            return enough_new_reviews_step(
                events, TASKS, database_url=resolve_database_url() if events else None
            )

    @task
    def prepare() -> dict:
        """Labelled clips per class and part; stores the split. Fails at once when training is pointless."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import prepare_step

        with no_retry_for_permanent_errors():
            return prepare_step(
                _params(), run_name=get_current_context()["run_id"], database_url=resolve_database_url()
            )

    @task(pool="gpu", queue="gpu", execution_timeout=timedelta(hours=12))
    def train(prepared: dict) -> str:
        """LoRA training on the training part; returns the registered version's name."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import train_step

        with no_retry_for_permanent_errors():
            return train_step(
                _params(), run_name=get_current_context()["run_id"], prepared=prepared,
                database_url=resolve_database_url(),
            )["name"]  # fmt: skip

    @task(pool="gpu", queue="gpu", execution_timeout=timedelta(hours=12))
    def evaluate(name: str) -> dict:
        """Base and fine-tuned labelling runs over the held-out audio (metrics and the gate are stored), then
        over each test dataset (model_version_test)."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import evaluate_step

        with no_retry_for_permanent_errors():
            return evaluate_step(
                _params(), name, run_name=get_current_context()["run_id"], database_url=resolve_database_url()
            )

    @task(outlets=[PROMOTED])
    def promote(evaluation: dict) -> dict:
        """Promote when asked and allowed, with an asset event on qwen_tasks://model/<task> that starts
        the relabelling; otherwise say why not (the version stays in the registry, no event)."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import promote_step

        ctx = get_current_context()
        with no_retry_for_permanent_errors():
            out = promote_step(
                _params(), evaluation, run_name=ctx["run_id"], database_url=resolve_database_url()
            )
        event = out.pop("event", None)
        if event:
            ctx["outlet_events"][PROMOTED].add(Asset(event["uri"]), extra=event["extra"])
        return out

    @task
    def report(evaluation: dict, promoted: dict) -> dict:
        """Base vs fine-tuned report under $QWEN_TASKS_HOME/reports/<DAG run id>/."""
        from qwen_tasks.orchestration.connection import resolve_database_url
        from qwen_tasks.orchestration.finetune_steps import report_step

        with no_retry_for_permanent_errors():
            out = report_step(
                evaluation["name"],
                run_name=get_current_context()["run_id"],
                database_url=resolve_database_url(),
            )
        return {**out, **promoted}

    prepared = prepare()
    enough_new_reviews() >> prepared
    evaluation = evaluate(train(prepared))
    report(evaluation, promote(evaluation))


qwen_audio_finetune()
