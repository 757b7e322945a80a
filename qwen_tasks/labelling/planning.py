"""Resume or plan labelling runs: the one planning function, used by `qwen-tasks label` and the DAG.

Why one: the CLI and the DAG used to plan with different rules (attempts, whether unfinished jobs are
resumed). Now both call `plan`, which scopes each task to its datasets, groups cry clips by the question
their manifest line asks, first resumes the unfinished jobs of earlier runs with the same model, revision
and prompt, then plans one new run per (task, question) over the clips with no label yet.

The model of each task is chosen once (`choose_models`: `registry.model_for`, one `ModelChoice` per
task; `qwen-tasks label` makes it before planning to know which interpreter must label) and recorded on
the plan per run (`Plan.run_choices`), which the CLI, the DAG's slots and the worker read from there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets
from qwen_tasks.labelling import decision, jobs
from qwen_tasks.labelling.options import LabelOptions, absolute_model_path
from qwen_tasks.labelling.registry import ModelChoice, model_for
from qwen_tasks.records import LabelRequest, ModelInfo, Task
from qwen_tasks.store.schema import audio, cry_question

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
    choices: dict[str, ModelChoice] = field(default_factory=dict)  # task -> the model that labels it
    run_choices: dict[int, ModelChoice] = field(default_factory=dict)  # run id -> the model that labels it
    run_jobs: dict[int, int] = field(default_factory=dict)  # run id -> its jobs in job_ids

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["jobs"] = len(self.job_ids)
        return out


def choose_models(engine: Engine, opts: LabelOptions) -> dict[str, ModelChoice]:
    """Task -> the model that labels it (`registry.model_for`): the one place a `label` or a DAG run
    resolves its model, version, adapter, backend kind and interpreter."""
    return {
        task: model_for(engine, task, opts.model, opts.revision, opts.adapter or None, opts.promoted)
        for task in opts.tasks
    }


def plan(
    engine: Engine,
    opts: LabelOptions,
    *,
    max_jobs: int | None = None,
    context: Mapping[str, Any] | None = None,
    choices: Mapping[str, ModelChoice] | None = None,
) -> Plan:
    """The one planning function (the DAG's plan step and `qwen-tasks label`). Per requested task: the
    clips of its datasets (`opts.datasets`, else every dataset labelled for the task), grouped by the
    question they are asked (cry: each clip's own manifest question unless `opts.question` overrides it;
    one group for asr). Per group: first the unfinished jobs of earlier runs with the same model,
    revision and prompt (a night whose workers died, a `label` that was killed or whose model would not
    load), then one new run over the clips with no label yet (`relabel`: over all clips not already in
    an unfinished run). At most `max_jobs` jobs in total (Airflow's max_map_length); audio left over is
    planned next time. Every job gets jobs.DEFAULT_MAX_ATTEMPTS attempts, whoever planned it. A task
    with nothing to do says why in its `per_task` entry (`reason`). `choices`: the tasks' models when the
    caller chose them already (`choose_models`), else they are chosen here.

    Steps: `_Planner.plan_task` per task (check its model, scope it to datasets), `plan_group` per
    question group (`resume`, then `new_run`), and `_why_nothing` for a task that got no jobs."""
    out = Plan(model=absolute_model_path(opts.model), revision=opts.revision)
    out.choices = dict(choices) if choices is not None else choose_models(engine, opts)
    planner = _Planner(engine, opts, dict(context or {}), out, budget=max_jobs)
    named = datasets.resolve(engine, opts.datasets, what="datasets" if context else "--dataset")
    for task in opts.tasks:
        planner.plan_task(task, named)
    return out


@dataclass
class _TaskScope:
    """One task being planned: its model, its `per_task` entry, its datasets and the clips left under
    `--limit` (shared by its question groups)."""

    task: str
    choice: ModelChoice
    entry: dict[str, Any]
    dataset_ids: list[int]
    limit: int | None


@dataclass
class _Planner:
    """The state of one `plan` call: the plan being filled and the jobs left under `max_jobs`."""

    engine: Engine
    opts: LabelOptions
    context: dict[str, Any]  # stored on each new run's params (the DAG's run id, ...)
    out: Plan
    budget: int | None  # jobs left under max_jobs (None: no cap)

    def plan_task(self, task: str, named: Sequence[datasets.Dataset]) -> None:
        """One task: its model checked, its datasets found, each question group planned; a task with
        nothing to do gets a `reason`."""
        choice = self.out.choices[task]
        entry: dict[str, Any] = {"resumed_jobs": 0, "run_id": None, "run_ids": [], "jobs": 0, "items": 0,
                                 "left_over": 0}  # fmt: skip
        self.out.per_task[task] = entry
        if choice.version:
            entry["model_version"] = choice.version
        # the model is checked first (a wrong --model is the error to report, even with nothing to label)
        self.model_info(choice, self.opts.request(task))
        labelled_for = [d for d in named if task in d.tasks]
        entry["datasets"] = [d.name for d in labelled_for]
        if not labelled_for:
            entry["reason"] = (
                f"no dataset is labelled for {task}"
                if not self.opts.datasets
                else f"none of the datasets {list(self.opts.datasets)} is labelled for {task}"
            ) + " (see: qwen-tasks datasets)"
            log.info("%s: nothing to plan: %s", task, entry["reason"])
            return
        scope = _TaskScope(task, choice, entry, [d.id for d in labelled_for], self.opts.limit)
        for request, where in question_groups(self.engine, self.opts, task, scope.dataset_ids):
            self.plan_group(scope, request, where)
        _why_nothing(entry, task)

    def model_info(self, choice: ModelChoice, request: LabelRequest) -> ModelInfo:
        """The run key of `request` asked of the chosen model (ConfigError when it cannot be used)."""
        from qwen_tasks.labelling.backends import planned_model_info

        kind = choice.backend or "auto"  # None: not usable, and planned_model_info says why
        return planned_model_info(
            choice.model, request, revision=choice.revision, device=self.opts.device,
            dtype=self.opts.dtype_arg, adapter=choice.adapter, backend=kind,
        )  # fmt: skip

    def plan_group(
        self, scope: _TaskScope, request: LabelRequest, where: sa.ColumnElement[bool] | None
    ) -> None:
        """One question group of a task: resume the unfinished jobs of its run key, then plan a new run
        over its clips with no label yet (unless the job budget or `--limit` is used up)."""
        choice, entry, task = scope.choice, scope.entry, scope.task
        info = self.model_info(choice, request)
        if choice.version:
            log.info("%s: labelling with fine-tuned version %s (revision %s)", task, choice.version,
                     info.revision)  # fmt: skip
        request = with_calibration(self.engine, self.opts, request, info, choice.version, scope.dataset_ids)
        self.out.model, self.out.revision = info.model, info.revision
        resumed = self.resume(scope, info)
        in_flight = jobs.in_flight_runs(self.engine, task, info.model, info.revision, info.prompt_version)
        if self.budget is not None and self.budget < 1:
            entry["left_over"] = None  # not counted: no room left in this DAG run
            return
        if scope.limit is not None and scope.limit < 1:
            return  # --limit reached by the groups before
        result = self.new_run(scope, request, info, where)
        if in_flight and not result.job_ids and not resumed:
            busy = entry.setdefault("in_flight_run_ids", [])
            busy.extend(r for r in in_flight if r not in busy)

    def resume(self, scope: _TaskScope, info: ModelInfo) -> list[tuple[int, int]]:
        """The unfinished jobs of earlier runs with this run key (within the budget), added to the plan;
        returns them as (job id, run id)."""
        out, entry = self.out, scope.entry
        resumed = jobs.unfinished_jobs(
            self.engine, scope.task, info.model, info.revision, info.prompt_version, limit=self.budget
        )
        out.job_ids.extend(job_id for job_id, _ in resumed)
        out.run_ids.extend(sorted({run_id for _, run_id in resumed} - set(out.run_ids)))
        for _, run_id in resumed:
            out.run_choices[run_id] = scope.choice
            out.run_jobs[run_id] = out.run_jobs.get(run_id, 0) + 1
        out.resumed_jobs += len(resumed)
        entry["resumed_jobs"] += len(resumed)
        if self.budget is not None:
            self.budget -= len(resumed)
        if resumed:
            log.info("%s: resuming %d unfinished job(s) of run(s) %s", scope.task, len(resumed),
                     sorted({r for _, r in resumed}))  # fmt: skip
        return resumed

    def new_run(
        self, scope: _TaskScope, request: LabelRequest, info: ModelInfo, where: sa.ColumnElement[bool] | None
    ) -> jobs.PlanResult:
        """A new run (`jobs.plan_run`) over the group's clips with no label yet, added to the plan; the
        budget and the task's `--limit` shrink by what it took."""
        out, entry, opts = self.out, scope.entry, self.opts
        result = jobs.plan_run(
            self.engine,
            jobs.RunRequest(
                task=scope.task,
                model_info=info,
                request=request,
                batch_size=opts.batch_size,
                max_batch_seconds=opts.max_batch_seconds,
                limit=scope.limit,
                relabel=opts.relabel,
                max_jobs=self.budget,
                params={"device": opts.device, "dtype": opts.dtype_arg, **scope.choice.params,
                        "datasets": entry["datasets"], **self.context},
                dataset_ids=scope.dataset_ids,
                where=where,
            ),
        )  # fmt: skip
        if result.run_id is not None:
            out.run_ids.append(result.run_id)
            out.new_run_ids.append(result.run_id)
            out.run_choices[result.run_id] = scope.choice
            out.run_jobs[result.run_id] = len(result.job_ids)
            entry["run_id"] = result.run_id
            entry["run_ids"].append(result.run_id)
            if request.calibration is not None:  # run id -> the rule its labels are decided with
                entry.setdefault("calibration_ids", {})[result.run_id] = request.calibration.id
        out.job_ids.extend(result.job_ids)
        out.items += result.n_items
        out.left_over += result.n_left_over
        if self.budget is not None:
            self.budget -= len(result.job_ids)
        if scope.limit is not None:
            scope.limit -= result.n_items
        entry["jobs"] += len(result.job_ids)
        entry["items"] += result.n_items
        if entry["left_over"] is not None:
            entry["left_over"] += result.n_left_over
        return result


def _why_nothing(entry: dict[str, Any], task: str) -> None:
    """The `reason` of a task whose groups got no jobs: its clips are in another's run, or all labelled."""
    busy = entry.get("in_flight_run_ids")
    if not entry["jobs"] and not entry["resumed_jobs"] and busy:
        # Another `label` (or the DAG) holds every open job of this key: not "everything has a label".
        # This call does not wait for it (the DAG and scripts should not block on another's run).
        entry["reason"] = (
            f"the clips of {', '.join(entry['datasets'])} without a label are being labelled by run "
            f"{', '.join(map(str, busy))} (in flight; see: qwen-tasks runs)"
        )
    if not entry["jobs"] and not entry["resumed_jobs"] and "reason" not in entry:
        entry["reason"] = (
            f"every clip of {', '.join(entry['datasets'])} already has a label for {task} from this "
            "model, revision and prompt (--relabel labels them again)"
        )


def with_calibration(
    engine: Engine,
    opts: LabelOptions,
    request: LabelRequest,
    info: ModelInfo,
    version: str | None,
    dataset_ids: Sequence[int],
) -> LabelRequest:
    """A cry `score` request with the labelling model's calibrated rule for this prompt attached
    (labelling.decision: the version's, else the base model's for these datasets), unless the user gave
    a threshold: an explicit `--threshold` / `yes_threshold` wins, compared with the raw p_yes."""
    if request.task != Task.CRY or "score" not in request.methods or opts.yes_threshold is not None:
        return request
    rule = decision.find(
        engine, model=info.model, revision=info.revision, prompt_template=info.prompt_template,
        version=version, dataset_ids=dataset_ids,
    )  # fmt: skip
    if rule is None:
        return request
    log.info("%s: deciding with calibration %s (%s, threshold %.4f)", request.task, rule.id, rule.method,
             rule.threshold)  # fmt: skip
    return replace(request, calibration=rule)


def question_groups(
    engine: Engine, opts: LabelOptions, task: str, dataset_ids: Sequence[int]
) -> list[tuple[LabelRequest, sa.ColumnElement[bool] | None]]:
    """The requests a task's clips are asked, each with the SQL condition (on audio.id) that picks its
    clips. asr, or cry with `opts.question`: one request for every clip. cry otherwise: one per distinct
    manifest question among the clips (view cry_question, 0009), plus the default question for clips
    without one; the prompt version carries a digest of each question, so runs never mix questions."""
    if task != Task.CRY or opts.question:
        return [(opts.request(task), None)]
    asked = cry_question
    with engine.connect() as conn:
        questions = (
            conn.execute(
                sa.select(asked.c.question)
                .where(asked.c.audio_id.in_(datasets.members(dataset_ids)))
                .group_by(asked.c.question)
                .order_by(sa.func.count().desc(), asked.c.question)
            )
            .scalars()
            .all()
        )
    conditions: dict[str, sa.ColumnElement[bool]] = {
        q: audio.c.id.in_(sa.select(asked.c.audio_id).where(asked.c.question == q)) for q in questions
    }
    no_line = ~sa.exists().where(asked.c.audio_id == audio.c.id)
    default = opts.request(task).question
    conditions[default] = sa.or_(conditions[default], no_line) if default in conditions else no_line
    groups = []
    for question, where in conditions.items():
        try:
            request = replace(opts.request(task), question=question)
        except ValueError as exc:  # pragma: no cover - LabelRequest accepts any question text
            raise ConfigError(f"manifest question {question[:80]!r}: {exc}") from None
        groups.append((request, where))
    return groups
