"""Which clips reach reviewers, and why: the ranked review queue (issue 23, part 2).

Interface stand-in on the `lsync` branch: the `queue` branch owns this module and replaces this file at
merge. Only what `review push` needs to be tested is implemented here: the RANDOM strategy (the
unreviewed clips of the task's latest production label in the dataset scope, in a uniform order given
by the seed). The other strategies raise NotImplementedError with a clear message, and `record_queued`
is a documented no-op until the queue branch's table lands. `qwen_tasks.review.sync` uses this
interface only (rank, record_queued, Strategy, QueuedClip, DEFAULT_RANDOM_SHARE).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import sqlalchemy as sa

from qwen_tasks.ingest import datasets
from qwen_tasks.records import Task
from qwen_tasks.store.schema import current_label, human_label

DEFAULT_RANDOM_SHARE = 0.10  # share of every push drawn uniformly, so quality estimates stay unbiased


class Strategy(StrEnum):
    """How the queue ranks clips (docs/review.md)."""

    UNCERTAINTY = "uncertainty"
    DISAGREEMENT = "disagreement"
    GOLD_CONFLICT = "gold-conflict"
    RANDOM = "random"


@dataclass(frozen=True)
class QueuedClip:
    """One clip to review: its model label's run, the strategy that picked it, why, and its priority."""

    audio_id: int
    task: Task
    run_id: int | None
    strategy: Strategy
    reason: str
    priority: float


def rank(
    conn: sa.Connection,
    *,
    task: Task,
    dataset_ids: Sequence[int] | None,
    strategy: Strategy,
    limit: int,
    random_share: float = DEFAULT_RANDOM_SHARE,
    seed: int | None = None,
) -> list[QueuedClip]:
    """Up to `limit` clips of `task` to review, best first; never a clip already reviewed for `task`.

    `dataset_ids` None: every dataset. `random_share` of the picks are uniform (all of them here, as
    only RANDOM is implemented on this branch).
    """
    if strategy != Strategy.RANDOM:
        raise NotImplementedError(
            f"review strategy {strategy.value!r} comes with the review queue (branch queue); "
            f"use --strategy {Strategy.RANDOM.value}"
        )
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    c = current_label
    reviewed = sa.select(human_label.c.audio_id).where(human_label.c.task == Task(task).value)
    query = (
        sa.select(c.c.audio_id, c.c.run_id)
        .where(c.c.task == Task(task).value, c.c.run_id.is_not(None), c.c.audio_id.not_in(reviewed))
        .order_by(c.c.audio_id)
    )
    if dataset_ids is not None:
        query = query.where(c.c.audio_id.in_(datasets.members(list(dataset_ids))))
    rows = conn.execute(query).all()
    random.Random(seed).shuffle(rows)
    return [
        QueuedClip(
            audio_id=r.audio_id,
            task=Task(task),
            run_id=r.run_id,
            strategy=Strategy.RANDOM,
            reason="random",
            priority=0.0,
        )
        for r in rows[:limit]
    ]


def record_queued(conn: sa.Connection, clips: Sequence[QueuedClip], destination: str) -> None:
    """Store why each clip was queued and where it went. Pending: the queue branch's table (migration
    0015) stores it; on this branch nothing is recorded."""
    del conn, clips, destination
