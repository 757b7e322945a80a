"""From reviewers' annotations to one human label per (audio, task), and how much reviewers agree.

The resolution rule (docs/review.md), over a clip's non-cancelled annotations in every project:
- cry: "Can't tell" abstains. The majority of the yes/no answers wins; a tie goes to the most recent
  yes/no answer (Label Studio's updated_at, then annotation id). Only "Can't tell" answers: `unknown`,
  which marks the clip reviewed (it leaves the queue and is never pushed again) without a gold label
  (cry_gold takes yes/no only, so metrics leave it out and fine-tuning never trains on it).
- asr: the transcript most reviewers typed (after trimming), a tie going to the most recent one.
- no annotation left (all deleted in Label Studio): no human label from the live sync.

Agreement: Cohen's kappa per project over the cry clips two different reviewers answered yes/no/can't
tell (the first two annotations of each clip, by annotation id), with scikit-learn's `cohen_kappa_score`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from qwen_tasks.ingest.datasets import all_datasets
from qwen_tasks.store.schema import review_annotation, review_project


@dataclass(frozen=True)
class Vote:
    """One reviewer's non-cancelled answer about a clip."""

    label: str | None
    text: str | None
    reviewer: str | None
    updated_at: datetime
    annotation_id: int


@dataclass(frozen=True)
class Resolved:
    label: str | None
    text: str | None
    reviewer: str | None  # the reviewers whose answer won, comma-separated


def resolve(task: str, votes: Sequence[Vote]) -> Resolved | None:
    """The clip's human label from its votes (module docstring); None when there is none."""
    if not votes:
        return None
    recent = sorted(votes, key=lambda v: (v.updated_at, v.annotation_id), reverse=True)
    if task == "cry":
        decided = [v for v in recent if v.label in ("yes", "no")]
        if not decided:
            return Resolved("unknown", None, _who(recent))
        counts = Counter(v.label for v in decided)
        top = max(counts.values())
        winners = [label for label, n in counts.items() if n == top]
        label = winners[0] if len(winners) == 1 else decided[0].label
        return Resolved(label, None, _who([v for v in decided if v.label == label]))
    texts = Counter((v.text or "").strip() for v in recent)
    top = max(texts.values())
    text = next((v.text or "").strip() for v in recent if texts[(v.text or "").strip()] == top)
    return Resolved(None, text, _who([v for v in recent if (v.text or "").strip() == text]))


def _who(votes: Sequence[Vote]) -> str | None:
    """The reviewers of `votes`, oldest answer first."""
    ordered = sorted(votes, key=lambda v: (v.updated_at, v.annotation_id))
    names = list(dict.fromkeys(v.reviewer for v in ordered if v.reviewer))
    return ", ".join(names) or None


def agreement(conn: sa.Connection, *, server: str | None = None) -> list[dict[str, Any]]:
    """Cohen's kappa per cry project (module docstring): project, dataset, clips with two reviewers, raw
    agreement and kappa (None with fewer than two such clips, or when both reviewers always gave one
    same answer: kappa is undefined there)."""
    p, a = review_project, review_annotation
    query = sa.select(p.c.id, p.c.ls_project_id, p.c.dataset_id, p.c.server).where(p.c.task == "cry")
    if server is not None:
        query = query.where(p.c.server == server)
    projects = conn.execute(query.order_by(p.c.id)).all()
    names = {d.id: d.name for d in all_datasets(conn)}
    out = []
    for project in projects:
        rows = conn.execute(
            sa.select(a.c.ls_task_id, a.c.label, a.c.reviewer)
            .where(a.c.project_id == project.id, a.c.was_cancelled.is_(False), a.c.label.is_not(None))
            .order_by(a.c.ls_task_id, a.c.ls_annotation_id)
        ).all()
        firsts: dict[int, list[tuple[str, str | None]]] = {}
        for r in rows:
            pair = firsts.setdefault(r.ls_task_id, [])
            if len(pair) < 2 and all(r.reviewer != who for _, who in pair):
                pair.append((r.label, r.reviewer))
        pairs = [pair for pair in firsts.values() if len(pair) == 2]
        first = [pair[0][0] for pair in pairs]
        second = [pair[1][0] for pair in pairs]
        kappa = None
        if len(pairs) >= 2 and len(set(first) | set(second)) > 1:
            from sklearn.metrics import cohen_kappa_score  # only where there is something to score

            value = float(cohen_kappa_score(first, second, labels=["yes", "no", "unknown"]))
            kappa = None if value != value else value  # NaN: undefined
        out.append(
            {
                "project_id": project.ls_project_id,
                "server": project.server,
                "dataset": names.get(project.dataset_id),
                "task": "cry",
                "n_clips": len(pairs),
                "agreement": (sum(x == y for x, y in zip(first, second, strict=True)) / len(pairs))
                if pairs
                else None,
                "kappa": kappa,
            }
        )
    return out
