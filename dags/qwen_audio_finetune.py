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

Only the version name, run ids and counts travel between tasks. Compare versions in SQL:
`SELECT * FROM model_version_quality ORDER BY created_at DESC;` and, held-out and test sets side by side,
`SELECT * FROM model_version_evaluation WHERE name = '<version>';`
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

from qwen_tasks.config import Settings
from qwen_tasks.orchestration.assets import PROMOTED_ALIAS, model_uri, reviews_uri
from qwen_tasks.orchestration.steps import no_retry_for_permanent_errors
from qwen_tasks.records import Task
from qwen_tasks.review.finetune import dag_param_specs

DAG_ID = "qwen_audio_finetune"
# Environment only, never an import error (a bad QWEN_TASKS_* value fails the tasks with one line).
PARAMS = {
    name: Param(spec.pop("default"), **spec)
    for name, spec in dag_param_specs(Settings.from_env(strict=False)).items()
}
# Imported reviewed labels of any task (the first task checks whether there are enough).
_FIRST, *_REST = Task
REVIEWS = Asset(reviews_uri(_FIRST))
for _task in _REST:
    REVIEWS = REVIEWS | Asset(reviews_uri(_task))
PROMOTED = AssetAlias(PROMOTED_ALIAS)


def _options():  # noqa: ANN202 - FinetuneOptions; imported inside tasks only
    from qwen_tasks.review.finetune import options_from_params

    ctx = get_current_context()
    params = dict(ctx["params"])
    chosen = ctx["ti"].xcom_pull(task_ids="enough_new_reviews")
    if isinstance(chosen, dict) and chosen.get("task"):  # a run started by reviews: their task
        params["task"] = chosen["task"]
    with no_retry_for_permanent_errors():  # bad params will not get better by retrying
        return options_from_params(params, run_name=ctx["run_id"])


def _engine():  # noqa: ANN202 - Engine
    from qwen_tasks.orchestration.connection import resolve_database_url
    from qwen_tasks.store import database as db

    engine = db.get_engine(resolve_database_url())
    db.upgrade(engine)
    return engine


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
        import logging

        from qwen_tasks.orchestration.assets import events_from_airflow, parse_uri
        from qwen_tasks.review.new_reviews import decide

        log = logging.getLogger(__name__)
        ctx = get_current_context()
        events = events_from_airflow(ctx.get("triggering_asset_events"))
        if not events:
            log.info("why this run: started by hand (no asset event): training as asked")
            return {"task": None, "why": "manual"}
        for event in events:
            log.info("why this run: asset event %s", event.describe())
        tasks = [k[1] for k in (parse_uri(e.uri) for e in events) if k and k[0] == "reviews"]
        for name in dict.fromkeys(t.value for t in Task if t in tasks):
            decision = decide(_engine(), name)
            log.info("%s", decision.reason())
            if decision.start:
                return decision.to_dict()
        return {}  # falsy: the rest of the run is skipped, not failed

    @task
    def prepare() -> dict:
        """Labelled clips per class and part; stores the split. Fails at once when training is pointless."""
        from qwen_tasks.review.finetune import prepare as prepare_data

        with no_retry_for_permanent_errors():
            prepared, _, _ = prepare_data(_engine(), _options().resolved())
        return prepared.to_dict()

    @task(pool="gpu", queue="gpu", execution_timeout=timedelta(hours=12))
    def train(prepared: dict) -> str:
        """LoRA training on the training part; returns the registered version's name."""
        import logging

        from qwen_tasks.progress import ProgressLog
        from qwen_tasks.review.finetune import train_version

        log = logging.getLogger(__name__)
        log.info(
            "training data (clips per class): train %s, held out %s", prepared["train"], prepared["heldout"]
        )
        with ProgressLog("training", None, unit="steps") as shown, no_retry_for_permanent_errors():

            def progress(p) -> None:  # noqa: ANN001 - trainer.Progress
                shown.total = p.total_steps
                figures = {"epoch": p.epoch, "loss": f"{p.loss:.4f}", "clips/s": f"{p.clips_per_s:.1f}"}
                shown.update(p.step, **figures)

            trained = train_version(_engine(), _options(), progress=progress)
        log.info("version %s: adapter %s, revision %s", trained.name, trained.adapter_path, trained.revision)
        return trained.name

    @task(pool="gpu", queue="gpu", execution_timeout=timedelta(hours=12))
    def evaluate(name: str) -> dict:
        """Base and fine-tuned labelling runs over the held-out audio (metrics and the gate are stored), then
        over each test dataset (model_version_test)."""
        from qwen_tasks.review.finetune import evaluate_version

        with no_retry_for_permanent_errors():
            result = evaluate_version(_engine(), name, _options())
        return {
            "name": name,
            "base_run_id": result["base_run_id"],
            "candidate_run_id": result["candidate_run_id"],
            "test_runs": {
                set_name: {"base_run_id": t["base_run_id"], "candidate_run_id": t["candidate_run_id"]}
                for set_name, t in result["test"].items()
            },
            "gate_passed": bool(result["gate"]["passed"]),
            "status": result["status"],
        }

    @task(outlets=[PROMOTED])
    def promote(evaluation: dict) -> dict:
        """Promote when asked and allowed, with an asset event on qwen_tasks://model/<task> that starts
        the relabelling; otherwise say why not (the version stays in the registry, no event)."""
        from qwen_tasks.labelling import registry

        options = _options()
        if options.promote and evaluation["gate_passed"]:
            with no_retry_for_permanent_errors():
                version = registry.promote(_engine(), evaluation["name"])
            extra = {"task": version.task, "version": version.name, "revision": version.revision}
            get_current_context()["outlet_events"][PROMOTED].add(Asset(model_uri(version.task)), extra=extra)
            return {"name": version.name, "status": str(version.status)}
        why = "auto_promote is off" if not options.promote else "it did not beat the base on held-out audio"
        return {"name": evaluation["name"], "status": evaluation["status"], "not_promoted": why}

    @task
    def report(evaluation: dict, promoted: dict) -> dict:
        """Base vs fine-tuned report under $QWEN_TASKS_HOME/reports/<DAG run id>/."""
        import re

        from qwen_tasks.config import get_settings
        from qwen_tasks.quality.report import write_report

        ctx = get_current_context()
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", ctx["run_id"]).strip("_") or "finetune"
        out = get_settings().home / "reports" / folder / "finetune.html"
        path = write_report(_engine(), [], out, versions=[evaluation["name"]])
        return {"report": str(path), **promoted}

    prepared = prepare()
    enough_new_reviews() >> prepared
    evaluation = evaluate(train(prepared))
    report(evaluation, promote(evaluation))


qwen_audio_finetune()
