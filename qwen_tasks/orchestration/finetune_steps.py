"""The steps of the `qwen_audio_finetune` DAG as plain functions: params and names in, small dicts out.

The fine-tune DAG's counterpart of `orchestration.steps` (the labelling DAG's): `dags/qwen_audio_finetune.py`
only wires these together, so both DAGs read the same way and every step can be called, tested and
debugged without Airflow. Each step:
- takes the DAG run's params (a plain mapping, validated again by `finetune.options.options_from_params`:
  the REST API can send anything), the DAG run id (the default version name) and names or ids;
- opens its own engine from `database_url` (None = QWEN_TASKS_DATABASE_URL / embedded server), the way
  `steps` does, and migrates a fresh labels database;
- returns a small JSON-able dict of names, ids and counts, which is what goes into XCom — never rows or
  audio. Refusals are ConfigErrors; the DAG wraps each call in `steps.no_retry_for_permanent_errors`.

The stages' work is `qwen_tasks.finetune`: `prepare_step` is `data.prepare` (the checks and the stored
split, early and without a GPU); `train_step` prepares once in its own process — the split is stored, so
it is the same split — and trains on exactly that result (`train.train_version`); `evaluate_step` is
`evaluate.evaluate_version` on the stored held-out split; `promote_step` promotes when asked and allowed
and returns the asset event for the DAG to emit; `report_step` writes the base vs fine-tuned report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.config import get_settings
from qwen_tasks.finetune.options import FinetuneOptions, options_from_params
from qwen_tasks.orchestration.assets import Event, model_uri, parse_uri
from qwen_tasks.progress import ProgressLog
from qwen_tasks.records import Task
from qwen_tasks.store import database as db

log = logging.getLogger(__name__)


def options(params: Mapping[str, Any], run_name: str = "") -> FinetuneOptions:
    """The DAG's params validated, the version name defaulting to <task>-<DAG run id>; ConfigError names
    the bad option."""
    return options_from_params(dict(params), run_name=run_name)


def _engine(database_url: str | None) -> Engine:
    engine = db.get_engine(database_url)
    db.upgrade(engine)  # a fresh labels database works on the first fine-tune
    return engine


def enough_new_reviews_step(events: Sequence[Event], *, database_url: str | None = None) -> dict[str, Any]:
    """Whether a run started by imported reviews goes on: the first task (in `Task` order) among the
    events' `reviews/<task>` assets with enough reviewed labels newer than its promoted version
    (`review.new_reviews.decide`); its decision as a dict, or {} when none has (the DAG then skips the
    rest of the run). No events: a manual run, which always trains."""
    from qwen_tasks.review.new_reviews import decide

    if not events:
        log.info("why this run: started by hand (no asset event): training as asked")
        return {"task": None, "why": "manual"}
    for event in events:
        log.info("why this run: asset event %s", event.describe())
    reviewed = [k[1] for k in (parse_uri(e.uri) for e in events) if k and k[0] == "reviews"]
    engine = _engine(database_url) if reviewed else None
    for name in dict.fromkeys(t.value for t in Task if t in reviewed):
        decision = decide(engine, name)
        log.info("%s", decision.reason())
        if decision.start:
            return decision.to_dict()
    return {}


def prepare_step(
    params: Mapping[str, Any], *, run_name: str = "", database_url: str | None = None
) -> dict[str, Any]:
    """The labelled clips per class and part, and the stored split (`finetune.data.prepare`); fails at
    once when training is pointless. Returns the counts (no rows)."""
    from qwen_tasks.finetune.data import prepare

    data = prepare(_engine(database_url), options(params, run_name).resolved())
    return data.prepared.to_dict()


def train_step(
    params: Mapping[str, Any],
    *,
    run_name: str = "",
    prepared: Mapping[str, Any] | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Prepare once in this process and train on exactly that result (LoRA, the adapter saved and
    registered); `prepared` is prepare_step's counts, and a difference (labels imported in between) is
    logged. Returns the version's name, adapter, revision and counts."""
    from qwen_tasks.finetune.data import prepare
    from qwen_tasks.finetune.train import train_version

    engine = _engine(database_url)
    opts = options(params, run_name).resolved()
    data = prepare(engine, opts)
    counts = data.prepared.to_dict()
    if prepared is not None and {k: prepared.get(k) for k in counts} != counts:
        log.warning("the labelled data changed since prepare (%s); training on what is there now", prepared)
    log.info("training data (clips per class): train %s, held out %s", counts["train"], counts["heldout"])
    with ProgressLog("training", None, unit="steps") as shown:

        def progress(p: Any) -> None:  # finetune.trainer.Progress
            shown.total = p.total_steps
            figures = {"epoch": p.epoch, "loss": f"{p.loss:.4f}", "clips/s": f"{p.clips_per_s:.1f}"}
            shown.update(p.step, **figures)

        trained = train_version(engine, opts, data, progress=progress)
    log.info("version %s: adapter %s, revision %s", trained.name, trained.adapter_path, trained.revision)
    return {
        "name": trained.name,
        "adapter_path": trained.adapter_path,
        "revision": trained.revision,
        "train": trained.prepared.train,
        "heldout": trained.prepared.heldout,
        "steps": trained.result.steps,
    }


def evaluate_step(
    params: Mapping[str, Any], name: str, *, run_name: str = "", database_url: str | None = None
) -> dict[str, Any]:
    """Base and fine-tuned labelling runs over the stored held-out audio (metrics and the gate are stored
    on the version), then over each test dataset (model_version_test). Returns the run ids, whether the
    gate passed and the version's status."""
    from qwen_tasks.finetune.evaluate import evaluate_version

    result = evaluate_version(_engine(database_url), name, options(params, run_name))
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


def promote_step(
    params: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    *,
    run_name: str = "",
    database_url: str | None = None,
) -> dict[str, Any]:
    """Promote the evaluated version when `auto_promote` is on and the gate passed; the result then has
    `event` (URI + extra: ids only) for the DAG to emit on qwen_tasks://model/<task>, which starts the
    relabelling. Otherwise says why not (the version stays in the registry, no event)."""
    from qwen_tasks.labelling import registry

    opts = options(params, run_name)
    if opts.promote and evaluation["gate_passed"]:
        version = registry.promote(_engine(database_url), evaluation["name"])
        extra = {"task": version.task, "version": version.name, "revision": version.revision}
        return {
            "name": version.name,
            "status": str(version.status),
            "event": {"uri": model_uri(version.task), "extra": extra},
        }
    why = "auto_promote is off" if not opts.promote else "it did not beat the base on held-out audio"
    return {"name": evaluation["name"], "status": evaluation["status"], "not_promoted": why}


def report_step(name: str, *, run_name: str, database_url: str | None = None) -> dict[str, Any]:
    """The base vs fine-tuned report of version `name` under $QWEN_TASKS_HOME/reports/<DAG run id>/."""
    from qwen_tasks.quality.report import write_report

    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_name).strip("_") or "finetune"
    out = get_settings().home / "reports" / folder / "finetune.html"
    path = write_report(_engine(database_url), [], out, versions=[name])
    return {"report": str(path)}
