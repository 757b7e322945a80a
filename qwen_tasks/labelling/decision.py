"""Which decision rule a cry run decides with: the stored calibrations (table decision_calibration, 0016).

Owns reading and writing that table. A rule belongs to a fine-tuned model version (fitted by `finetune`
on the version's held-out evaluation run) or to a base model + revision, on one dataset or on every
dataset (fitted by `qwen-tasks calibrate` on reviewed / gold labels), and to one prompt (the text sent,
`label_run.prompt_template`, the same for `--method score` and `both`): p_yes depends on the question
asked, so a rule fitted on one prompt's scores never decides another prompt's
(measured: a rule fitted on the version's own question, applied to clips asked their manifest question,
wrote 82.5 % correct labels at ROC AUC 0.99). The newest row of a key wins.
Planning attaches the rule to the run's request, so all of a run's jobs decide alike and each label
records the rule (`cry_answer.calibration_id`); the fitting itself (sklearn) is `quality.calibration`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.records import Calibration
from qwen_tasks.store.schema import decision_calibration, model_version

log = logging.getLogger(__name__)


def _row_to_calibration(row: Any) -> Calibration:
    return Calibration.from_stored(row.id, row.method, row.threshold, dict(row.params or {}))


def for_version(conn: Connection, version_name: str, prompt_template: str) -> Calibration | None:
    """The newest rule of the fine-tuned version called `version_name` for this prompt, if any."""
    c = decision_calibration.c
    row = conn.execute(
        sa.select(decision_calibration)
        .join(model_version, model_version.c.id == c.model_version_id)
        .where(model_version.c.name == version_name, c.prompt_template == prompt_template)
        .order_by(c.id.desc())
        .limit(1)
    ).first()
    return None if row is None else _row_to_calibration(row)


def for_base(
    conn: Connection, model: str, revision: str, prompt_template: str, dataset_ids: Sequence[int]
) -> Calibration | None:
    """The base model's rule for a run of this prompt over `dataset_ids`: the one fitted on that very
    dataset when the run covers exactly one, else the one fitted on every dataset (dataset_id NULL). A
    rule fitted on one dataset is never applied to the clips of another."""
    c = decision_calibration.c
    query = (
        sa.select(decision_calibration)
        .where(c.model_version_id.is_(None), c.model == model, c.revision == revision)
        .where(c.prompt_template == prompt_template)
        .order_by(c.dataset_id.is_(None), c.id.desc())  # a dataset's own rule first
        .limit(1)
    )
    scopes = [c.dataset_id.is_(None)]
    if len(dataset_ids) == 1:
        scopes.append(c.dataset_id == dataset_ids[0])
    row = conn.execute(query.where(sa.or_(*scopes))).first()
    return None if row is None else _row_to_calibration(row)


def find(
    engine: Engine,
    *,
    model: str,
    revision: str,
    prompt_template: str,
    version: str | None,
    dataset_ids: Sequence[int],
) -> Calibration | None:
    """The rule a run of this model (a version's, else the base model's) and prompt decides with, or None."""
    with engine.connect() as conn:
        if version:
            return for_version(conn, version, prompt_template)
        return for_base(conn, model, revision, prompt_template, dataset_ids)


def store(conn: Connection, calibration: Calibration, values: dict[str, Any]) -> Calibration:
    """Insert a fitted rule (its key and figures in `values`: model, revision, prompt_template,
    model_version_id, dataset_id, objective, target_precision, n_labels, n_yes, source_run_id, heldout,
    note); returns it with its id, as labelling will apply it."""
    new_id = conn.execute(
        decision_calibration.insert()
        .values(
            method=calibration.method,
            params=calibration.params,
            threshold=calibration.threshold,
            **values,
        )
        .returning(decision_calibration.c.id)
    ).scalar_one()
    log.info("stored calibration %d: %s, threshold %.4f", new_id, calibration.method, calibration.threshold)
    return replace(calibration, id=int(new_id))


def load(conn: Connection, calibration_id: int) -> Calibration | None:
    """One stored rule by id."""
    row = conn.execute(
        sa.select(decision_calibration).where(decision_calibration.c.id == calibration_id)
    ).first()
    return None if row is None else _row_to_calibration(row)
