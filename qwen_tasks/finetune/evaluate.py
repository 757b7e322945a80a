"""Evaluate a version and decide on it: the held-out evaluation runs, the gate, the test-set runs and the
version's decision rules.

Two real labelling runs (purpose 'evaluation') over the held-out audio — the base model, and base +
adapter loaded from disk through the normal backend path — and their metrics; the same two runs over each
test dataset's labelled clips (`model_version_test`), reported side by side. The gate (`registry.gate`, on
the held-out split only) sets `candidate` or `rejected`; promotion is optional and not done here. For cry,
the version's decision rules are fitted on its held-out runs (`quality.calibration`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.config import Settings
from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune.data import TrainingData, evaluation_set_ids, heldout_ids, resolve_scope
from qwen_tasks.finetune.options import FinetuneOptions
from qwen_tasks.finetune.trainer import free_memory
from qwen_tasks.labelling import jobs, registry
from qwen_tasks.progress import ProgressLog
from qwen_tasks.records import DEFAULT_QUESTION, ModelVersionStatus, RunStatus
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import cry_question, model_version, model_version_test

log = logging.getLogger(__name__)


def evaluation_run(
    engine: Engine,
    version: registry.ModelVersion,
    opts: FinetuneOptions,
    role: str,
    audio_ids: Sequence[int],
    evaluated_on: str = "heldout",
) -> int:
    """One real labelling run (purpose 'evaluation') of the base model or of the version (base + its
    adapter, loaded from disk through the normal backend path) over `audio_ids` (the held-out split or a
    test dataset's labelled clips, named by `evaluated_on`); returns its id."""
    from qwen_tasks.labelling.backends import planned_model_info
    from qwen_tasks.labelling.worker import WorkerOptions, work

    request = opts.eval_request()
    choice = registry.ModelChoice(
        version.base_model,
        version.base_revision,
        None if role == "base" else version.adapter_path,  # candidate, calibration: the version
        version.name,
    )
    info = planned_model_info(
        choice.model,
        request,
        revision=choice.revision,
        device=opts.device,
        dtype=opts.dtype,
        adapter=choice.adapter,
    )
    run = jobs.RunRequest(
        task=version.task,
        model_info=info,
        request=request,
        batch_size=opts.batch_size * 2,
        max_batch_seconds=Settings.max_batch_seconds,  # the declared default (not this machine's)
        relabel=True,
        audio_ids=audio_ids,
        purpose="evaluation",
        params={
            "device": opts.device,
            "dtype": opts.dtype,
            **choice.params,
            "model_version": version.name,
            "role": role,
            "evaluated_on": evaluated_on,
        },
    )
    plan = jobs.plan_run(engine, run)
    if plan.run_id is None:
        raise ConfigError(
            f"{version.name}: nothing planned for the {role} evaluation on {evaluated_on} (audio in use?)"
        )
    with ProgressLog(f"held-out {role} run {plan.run_id}", len(audio_ids)) as shown:
        summary = work(
            engine, plan.run_id, WorkerOptions(device=opts.device, dtype=opts.dtype),
            progress=lambda o: shown.update(advance=o.labelled + o.failed, audio_seconds=o.audio_seconds),
        )  # fmt: skip
    if summary.run_status != RunStatus.DONE:
        raise ConfigError(
            f"{version.name}: {role} evaluation run {plan.run_id} ended {summary.run_status} "
            f"({'; '.join(summary.errors[-2:])})"
        )
    return plan.run_id


KEEP_METRICS = (
    "run_id",
    "n_results",
    "n_gold",
    "n_reference",
    "score.roc_auc",
    "score.f1",
    "score.accuracy",
    "generate.accuracy",
    "generate.unknown_rate",
    "wer",
    "cer",
    "error_rate",
)


def _evaluate_pair(
    engine: Engine,
    version: registry.ModelVersion,
    opts: FinetuneOptions,
    ids: Sequence[int],
    evaluated_on: str,
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Base and candidate runs over `ids`, then their metrics (the figures kept with the version)."""
    from qwen_tasks.labelling.backends import get_backend
    from qwen_tasks.quality.metrics import compute_run_metrics

    runs = {
        role: evaluation_run(engine, version, opts, role, ids, evaluated_on) for role in ("base", "candidate")
    }
    get_backend.cache_clear()
    free_memory()
    metrics = {role: compute_run_metrics(engine, run_id) for role, run_id in runs.items()}
    return runs, {role: {k: m.get(k) for k in KEEP_METRICS if k in m} for role, m in metrics.items()}


def evaluate_version(
    engine: Engine, name: str, options: FinetuneOptions, data: TrainingData | None = None
) -> dict[str, Any]:
    """Label the held-out audio with the base model and with the version (two real runs), compute and
    store their metrics and the gate decision on the version; then the same two runs on each test dataset
    (`model_version_test`, metrics["test"][name]), reported beside the held-out figures. The gate decides
    on the held-out split only: a test set is a fixed yardstick, not a second gate. `data`: `prepare`'s
    result when this process prepared the fine-tune (its held-out rows and scope are used as they are);
    None: looked up from the stored split (a DAG task evaluating a version by name). Returns run ids,
    metrics and the gate."""
    version = registry.require_version(engine, name)
    opts = replace(
        options,
        task=version.task,
        question=version.request.get("question", options.question),
        language=version.request.get("language", options.language),
    )
    if data is not None and data.prepared.task != version.task:
        raise ConfigError(f"{name}: prepared data is for {data.prepared.task}, not {version.task}")
    scope = data.scope if data is not None else resolve_scope(engine, opts)
    ids = data.heldout_ids if data is not None else heldout_ids(engine, opts, scope)
    if not ids:
        raise ConfigError(f"{name}: no labelled held-out audio to evaluate on")
    runs, stored = _evaluate_pair(engine, version, opts, ids, "heldout")
    result = registry.gate(version.task, stored["base"], stored["candidate"], opts.min_improvement)
    calibrated = _calibrate(engine, version, runs["candidate"], opts, ids) if version.task == "cry" else {}
    tests: dict[str, dict[str, Any]] = {}
    for set_name, dataset_id in scope.test.items():
        set_ids = evaluation_set_ids(engine, opts, dataset_id)
        if not set_ids:  # e.g. its only labelled clips lost their files since resolve_scope
            log.warning("%s: test dataset %s has no readable labelled clips; not evaluated", name, set_name)
            continue
        set_runs, set_metrics = _evaluate_pair(engine, version, opts, set_ids, set_name)
        tests[set_name] = {
            "dataset_id": dataset_id,
            "base_run_id": set_runs["base"],
            "candidate_run_id": set_runs["candidate"],
            **set_metrics,
        }
    status = ModelVersionStatus.CANDIDATE if result.passed else ModelVersionStatus.REJECTED
    with transaction(engine) as conn:
        conn.execute(
            model_version.update()
            .where(model_version.c.name == name)
            .values(
                base_run_id=runs["base"],
                candidate_run_id=runs["candidate"],
                metrics={
                    **stored,
                    "gate": result.to_dict(),
                    "test": {n: {"base": t["base"], "candidate": t["candidate"]} for n, t in tests.items()},
                },
                status=status,
                status_reason="; ".join(result.reasons),
            )
        )
        conn.execute(model_version_test.delete().where(model_version_test.c.version_id == version.id))
        if tests:
            conn.execute(
                model_version_test.insert(),
                [
                    {
                        "version_id": version.id,
                        "dataset_id": t["dataset_id"],
                        "base_run_id": t["base_run_id"],
                        "candidate_run_id": t["candidate_run_id"],
                    }
                    for t in tests.values()
                ],
            )
    return {
        "base_run_id": runs["base"],
        "candidate_run_id": runs["candidate"],
        **stored,
        "gate": result.to_dict(),
        "status": str(status),
        "test": tests,
        "calibration": calibrated,
    }


def _calibrate(
    engine: Engine, version: registry.ModelVersion, run_id: int, opts: FinetuneOptions, ids: Sequence[int]
) -> dict[str, Any]:
    """The version's decision rules, fitted on held-out clips it never trained on and stored for it, so a
    promoted version labels with them: one for its own question (on the candidate evaluation run), and
    one per other manifest question the held-out clips ask (`label` asks each clip its own question, and
    p_yes depends on the prompt): a candidate run over those clips asking it. A question whose held-out
    gold has one class gets no rule (the version then labels it with the plain threshold), said in the
    log and the summary under "error"."""
    out = _fit_rule(engine, version, run_id, opts)
    others: dict[str, dict[str, Any]] = {}
    for question, asking in _other_questions(engine, ids, opts.question).items():
        asked = replace(opts, question=question, eval_method="score")
        others[question] = _fit_rule(
            engine, version, evaluation_run(engine, version, asked, "calibration", asking), opts
        )
    if others:
        out["questions"] = others
    return out


def _other_questions(engine: Engine, ids: Sequence[int], own: str) -> dict[str, list[int]]:
    """The held-out clips by the question `label` asks them (their manifest line's, else the default),
    but the version's own question."""
    with engine.connect() as conn:
        asked = dict(
            conn.execute(
                sa.select(cry_question.c.audio_id, cry_question.c.question).where(
                    cry_question.c.audio_id.in_(list(ids))
                )
            ).all()
        )
    groups: dict[str, list[int]] = {}
    for audio_id in ids:
        groups.setdefault(asked.get(audio_id, DEFAULT_QUESTION), []).append(audio_id)
    return {q: a for q, a in groups.items() if q != own}


def _fit_rule(
    engine: Engine, version: registry.ModelVersion, run_id: int, opts: FinetuneOptions
) -> dict[str, Any]:
    from qwen_tasks.quality.calibration import calibrate_run

    try:
        rule, fitted = calibrate_run(
            engine,
            run_id,
            method=opts.calibration,
            target_precision=opts.target_precision,
            model_version_id=version.id,
        )
    except ConfigError as exc:
        log.warning("%s: no calibration: %s", version.name, exc)
        return {"error": str(exc), "run_id": run_id}
    return {
        "id": rule.id,
        "run_id": run_id,
        "method": rule.method,
        "threshold": rule.threshold,
        "objective": fitted.choice.objective,
        "note": fitted.choice.note,
        "n_labels": fitted.n_labels,
        "heldout": fitted.heldout,
    }
