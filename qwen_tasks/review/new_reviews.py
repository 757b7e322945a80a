"""Whether reviewed labels have piled up enough to fine-tune again: the automatic fine-tune's gate.

Why: reviewers keep importing labels (`qwen-tasks review-import`); each import announces itself with an
asset event (`qwen_tasks://reviews/<task>`) that starts the `qwen_audio_finetune` DAG, whose first task
asks `decide`. Training on a handful of new labels wastes a GPU for hours and produces a version that
cannot be told apart from the last one, so a run starts only when at least
`QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED` (default 200) human labels of the task are newer than the version
in use: created (or changed by a later import, which sets `created_at` again) after the promoted
version was trained. With no promoted version, every human label of the task counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.config import get_settings
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.store.schema import human_label, model_version


@dataclass(frozen=True)
class FinetuneDecision:
    """The gate's answer for one task, with the figures behind it (what the DAG logs and returns)."""

    task: str
    new_reviewed: int
    minimum: int
    since_version: str | None  # the promoted version counted from (None: none promoted yet)
    since: str | None  # when that version was created (ISO 8601)

    @property
    def start(self) -> bool:
        return self.new_reviewed >= self.minimum

    def reason(self) -> str:
        since = f"newer than {self.since_version} ({self.since})" if self.since_version else "in all"
        verdict = "enough to fine-tune" if self.start else "not enough to fine-tune yet"
        return (
            f"{self.task}: {self.new_reviewed} reviewed label(s) {since}, minimum {self.minimum} "
            f"(QWEN_TASKS_FINETUNE_MIN_NEW_REVIEWED): {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "start": self.start, "reason": self.reason()}


def new_reviewed_count(engine: Engine, task: str) -> tuple[int, str | None, datetime | None]:
    """Human labels of `task` created after its promoted version was: (count, version name, created_at)."""
    promoted = (
        sa.select(model_version.c.name, model_version.c.created_at)
        .where(model_version.c.task == task, model_version.c.status == ModelVersionStatus.PROMOTED.value)
        .order_by(model_version.c.created_at.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        version = conn.execute(promoted).one_or_none()
        query = sa.select(sa.func.count()).select_from(human_label).where(human_label.c.task == task)
        if version is not None:
            query = query.where(human_label.c.created_at > version.created_at)
        count = int(conn.execute(query).scalar_one())
    return count, (version.name if version else None), (version.created_at if version else None)


def decide(engine: Engine, task: str, minimum: int | None = None) -> FinetuneDecision:
    """Whether `task` has enough new reviewed labels for a fine-tune (`minimum` None: the setting)."""
    minimum = get_settings().finetune_min_new_reviewed if minimum is None else minimum
    count, name, since = new_reviewed_count(engine, task)
    return FinetuneDecision(task, count, minimum, name, since.isoformat() if since else None)


def database_now(engine: Engine) -> datetime:
    """The database's clock (human_label.created_at is set by it, not by this machine's)."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.now())).scalar_one()


def reviewed_since(engine: Engine, since: datetime) -> dict[str, int]:
    """Human labels per task written (or rewritten) at or after `since`: what one import added."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(human_label.c.task, sa.func.count())
            .where(human_label.c.created_at >= since)
            .group_by(human_label.c.task)
            .order_by(human_label.c.task)
        ).all()
    return {str(task): int(n) for task, n in rows}
