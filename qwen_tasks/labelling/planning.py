"""Resume or plan labelling runs: the one planning function, used by `qwen-tasks label` and the DAG.

Why one: the CLI and the DAG used to plan with different rules (attempts, whether unfinished jobs are
resumed). Now both call `plan`, which first resumes the unfinished jobs of earlier runs with the same
model, revision and prompt, then plans one new run per task over the audio with no label yet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.options import LabelOptions, resolve_model

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What `plan` found and made: the runs and jobs to work, resumed ones first."""

    model: str
    revision: str
    run_ids: list[int] = field(default_factory=list)  # resumed runs, then new runs
    new_run_ids: list[int] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    resumed_jobs: int = 0
    items: int = 0  # clips in new runs
    left_over: int = 0  # audio that did not fit under max_jobs (planned next time)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_models: dict[int, str] = field(default_factory=dict)  # run id -> the model that labels it
    run_jobs: dict[int, int] = field(default_factory=dict)  # run id -> its jobs in job_ids

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["jobs"] = len(self.job_ids)
        return out


def plan(
    engine: Engine,
    opts: LabelOptions,
    *,
    max_jobs: int | None = None,
    context: Mapping[str, Any] | None = None,
) -> Plan:
    """The one planning function (the DAG's plan step and `qwen-tasks label`). Per requested task: first
    the unfinished jobs of earlier runs with the same model, revision and prompt (a night whose workers
    died, a `label` that was killed or whose model would not load), then one new run over the audio with
    no label yet (`relabel`: over all audio not already in an unfinished run). At most `max_jobs` jobs in
    total (Airflow's max_map_length); audio left over is planned next time. Every job gets
    jobs.DEFAULT_MAX_ATTEMPTS attempts, whoever planned it."""
    from qwen_tasks.labelling.backends import planned_model_info
    from qwen_tasks.labelling.registry import model_for

    out = Plan(model=resolve_model(opts.model), revision=opts.revision)
    budget = max_jobs
    for task in opts.tasks:
        request = opts.request(task)
        choice = model_for(engine, task, opts.model, opts.revision, opts.adapter or None, opts.promoted)
        info = planned_model_info(
            choice.model, request, revision=choice.revision, device=opts.device, dtype=opts.dtype_arg,
            adapter=choice.adapter,
        )  # fmt: skip
        if choice.version:
            log.info(
                "%s: labelling with fine-tuned version %s (revision %s)", task, choice.version, info.revision
            )
        out.model, out.revision = info.model, info.revision
        resumed = jobs.unfinished_jobs(
            engine, task, info.model, info.revision, info.prompt_version, limit=budget
        )
        out.job_ids.extend(job_id for job_id, _ in resumed)
        out.run_ids.extend(sorted({run_id for _, run_id in resumed} - set(out.run_ids)))
        for _, run_id in resumed:
            out.run_models[run_id] = info.model
            out.run_jobs[run_id] = out.run_jobs.get(run_id, 0) + 1
        out.resumed_jobs += len(resumed)
        if budget is not None:
            budget -= len(resumed)
        entry: dict[str, Any] = {"resumed_jobs": len(resumed), "run_id": None, "jobs": 0, "items": 0}
        if choice.version:
            entry["model_version"] = choice.version
        out.per_task[task] = entry
        if resumed:
            log.info("%s: resuming %d unfinished job(s) of run(s) %s", task, len(resumed),
                     sorted({r for _, r in resumed}))  # fmt: skip
        if budget is not None and budget < 1:
            entry["left_over"] = None  # not counted: no room left in this DAG run
            continue
        result = jobs.plan_run(
            engine,
            task=task,
            model_info=info,
            request=request,
            batch_size=opts.batch_size,
            max_batch_seconds=opts.max_batch_seconds,
            limit=opts.limit,
            relabel=opts.relabel,
            max_jobs=budget,
            params={"device": opts.device, "dtype": opts.dtype_arg, **choice.params, **dict(context or {})},
        )
        if result.run_id is not None:
            out.run_ids.append(result.run_id)
            out.new_run_ids.append(result.run_id)
            out.run_models[result.run_id] = info.model
            out.run_jobs[result.run_id] = len(result.job_ids)
        out.job_ids.extend(result.job_ids)
        out.items += result.n_items
        out.left_over += result.n_left_over
        if budget is not None:
            budget -= len(result.job_ids)
        entry.update(
            run_id=result.run_id, jobs=len(result.job_ids), items=result.n_items, left_over=result.n_left_over
        )
    return out
