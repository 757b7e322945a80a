"""The review queue: which unreviewed clips of a task a reviewer should see first, and why.

A reviewer's hour is the scarcest resource of the labelling loop, so clips are ranked by a strategy
(`Strategy`): where the model is unsure (`uncertainty`), where two of its answers disagree
(`disagreement`), or where the manifest's gold is probably wrong (`gold-conflict`, cleanlab's label-issue
finder over out-of-sample probabilities). Every queue also mixes in a uniform, seeded `random` share
(`DEFAULT_RANDOM_SHARE`), so quality estimates made from reviewed labels can use an unbiased sample:
each clip's `strategy` and `reason` say which part it came from, and `record_queued` stores them
(table `review_queued`, migration 0015) when the queue is sent somewhere (a Label Studio project, a file).

Rules every strategy shares: a clip with a `human_label` row for the task is never returned; the scope is
the clips of the given datasets (`ingest.datasets.members`); the label a clip is ranked by is its current
production label (`current_label`: the newest `purpose = 'label'` run, the `score` row for cry when that
run has one), and its decision threshold is the `threshold` that answer was decided with, compared with
the probability it was decided on (`p_calibrated` where a calibration rule decided it, else `p_yes`).
The list comes back in the order to review: the strategy's clips by falling priority, the random clips
spread evenly between them (`priority` compares clips of one strategy only; random clips have priority 0).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import sqlalchemy as sa

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.datasets import members
from qwen_tasks.quality.scoring import score_utterance
from qwen_tasks.records import LabelRequest, Task
from qwen_tasks.store.schema import (
    asr_reference,
    audio_path,
    cry_answer,
    cry_gold,
    current_label,
    finetune_split,
    human_label,
    label_run,
    review_queued,
    transcription,
    utterance_score,
)


class Strategy(StrEnum):
    """How a review queue is ranked (`qwen-tasks review queue --strategy`)."""

    UNCERTAINTY = "uncertainty"
    DISAGREEMENT = "disagreement"
    GOLD_CONFLICT = "gold-conflict"
    RANDOM = "random"


DEFAULT_RANDOM_SHARE = 0.10  # of every queue, drawn uniformly so quality estimates stay unbiased
DEFAULT_QUEUE_LIMIT = 100  # clips per queue when the caller gives no --limit
DEFAULT_THRESHOLD = LabelRequest("cry").yes_threshold  # a generate-only answer was decided without one
PRODUCTION = "label"  # label_run.purpose of the runs whose labels are reviewed (not 'evaluation')


@dataclass(frozen=True)
class QueuedClip:
    """One clip of a ranked queue: the run whose label the reviewer is shown, and why it was queued."""

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
    exclude_destination: str | None = None,
) -> list[QueuedClip]:
    """Up to `limit` unreviewed clips of `task` (in `dataset_ids`' datasets; None: every clip), ranked by
    `strategy`, with round(`limit` x `random_share`) of them a uniform random sample of the other
    candidates (all of them for `Strategy.RANDOM`). `seed` makes the random part repeatable;
    `exclude_destination` leaves out clips already recorded as queued to that destination."""
    task, strategy = Task(task), Strategy(strategy)
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if not 0.0 <= random_share <= 1.0:
        raise ConfigError(f"--random-share must be between 0 and 1, got {random_share}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    scope = _Scope(task, None if dataset_ids is None else list(dataset_ids), exclude_destination)
    n_random = limit if strategy is Strategy.RANDOM else math.floor(limit * random_share + 0.5)
    ranked = [] if strategy is Strategy.RANDOM else _RANKERS[strategy](conn, scope, limit - n_random)
    drawn = _random(conn, scope, n_random, seed, {c.audio_id for c in ranked})
    return _interleave(ranked, drawn, limit - n_random)


def record_queued(conn: sa.Connection, clips: Sequence[QueuedClip], destination: str) -> None:
    """Store why each clip was queued and where it went (`review_queued`), in the caller's transaction."""
    if not destination:
        raise ConfigError("destination of a review queue must not be empty")
    if clips:
        conn.execute(
            review_queued.insert(),
            [
                {
                    "audio_id": c.audio_id,
                    "task": c.task.value,
                    "run_id": c.run_id,
                    "strategy": c.strategy.value,
                    "reason": c.reason,
                    "priority": c.priority,
                    "destination": destination,
                }
                for c in clips
            ],
        )


def clip_details(conn: sa.Connection, clips: Sequence[QueuedClip]) -> list[_Details]:
    """What a reviewer is shown of each queued clip, in the clips' order: path, run_id, audio_id,
    `reasons` ([its reason]), and cry: label (score's, else generate's), p_yes, raw_answer, gold_label;
    asr: transcript, reference_text, error_rate (utterance_score, when metrics were computed)."""
    if not clips:
        return []
    ids = sa.literal(sorted({c.audio_id for c in clips}), sa.ARRAY(sa.BigInteger))
    runs = sa.literal(sorted({c.run_id for c in clips if c.run_id is not None}), sa.ARRAY(sa.BigInteger))
    if clips[0].task is Task.CRY:
        s, g = cry_answer.alias("s"), cry_answer.alias("g")
        pairs = sa.select(cry_answer.c.run_id, cry_answer.c.audio_id).distinct().subquery()
        query = (
            sa.select(
                pairs.c.run_id,
                pairs.c.audio_id,
                audio_path.c.path,
                sa.func.coalesce(s.c.label, g.c.label).label("label"),
                s.c.p_yes,
                g.c.raw_answer,
                cry_gold.c.gold_label,
                sa.null().label("transcript"),
                sa.null().label("reference_text"),
                sa.null().label("error_rate"),
            )
            .outerjoin(
                s,
                (s.c.run_id == pairs.c.run_id) & (s.c.audio_id == pairs.c.audio_id) & (s.c.method == "score"),
            )
            .outerjoin(
                g,
                (g.c.run_id == pairs.c.run_id)
                & (g.c.audio_id == pairs.c.audio_id)
                & (g.c.method == "generate"),
            )
            .outerjoin(cry_gold, cry_gold.c.audio_id == pairs.c.audio_id)
        )
    else:
        t, u = transcription, utterance_score
        pairs = t
        query = (
            sa.select(
                t.c.run_id,
                t.c.audio_id,
                audio_path.c.path,
                sa.null().label("label"),
                sa.null().label("p_yes"),
                sa.null().label("raw_answer"),
                sa.null().label("gold_label"),
                t.c.text.label("transcript"),
                asr_reference.c.reference_text,
                u.c.error_rate,
            )
            .outerjoin(u, (u.c.run_id == t.c.run_id) & (u.c.audio_id == t.c.audio_id))
            .outerjoin(asr_reference, asr_reference.c.audio_id == t.c.audio_id)
        )
    query = query.outerjoin(audio_path, audio_path.c.audio_id == pairs.c.audio_id).where(
        pairs.c.audio_id == sa.any_(ids), pairs.c.run_id == sa.any_(runs)
    )
    found = {(r.run_id, r.audio_id): r for r in conn.execute(query).all()}
    out = []
    for c in clips:
        row = found[(c.run_id, c.audio_id)]
        out.append(_Details(**row._asdict(), reasons=[c.reason]))
    return out


@dataclass(frozen=True)
class _Details:
    run_id: int
    audio_id: int
    path: str | None
    label: str | None
    p_yes: float | None
    raw_answer: str | None
    gold_label: str | None
    transcript: str | None
    reference_text: str | None
    error_rate: float | None
    reasons: list[str]


# --- candidates -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    task: Task
    dataset_ids: list[int] | None
    exclude_destination: str | None

    def where(self, audio_id: sa.ColumnElement[Any]) -> list[sa.ColumnElement[bool]]:
        """The clips a queue may hold: of the scope's datasets, never reviewed for the task, and not
        already queued to `exclude_destination`."""
        out: list[sa.ColumnElement[bool]] = [
            ~sa.exists().where(human_label.c.audio_id == audio_id, human_label.c.task == self.task.value)
        ]
        if self.dataset_ids is not None:
            out.append(audio_id.in_(members(self.dataset_ids)))
        if self.exclude_destination is not None:
            out.append(
                ~sa.exists().where(
                    review_queued.c.audio_id == audio_id,
                    review_queued.c.task == self.task.value,
                    review_queued.c.destination == self.exclude_destination,
                )
            )
        return out


def _current(scope: _Scope) -> sa.Select:
    """The current production label of each candidate clip (current_label's model part)."""
    c = current_label
    return sa.select(c.c.audio_id, c.c.run_id, c.c.method, c.c.p_yes).where(
        c.c.task == scope.task.value, c.c.run_id.is_not(None), *scope.where(c.c.audio_id)
    )


def _decided_p(answer: sa.FromClause) -> sa.Label:
    """The probability a cry answer was decided on, as `p_yes`: `p_calibrated` where a calibration rule
    decided it (its `threshold` is on that scale), else the raw `p_yes`."""
    return sa.func.coalesce(answer.c.p_calibrated, answer.c.p_yes).label("p_yes")


def _cry_current(scope: _Scope) -> sa.Select:
    """Per candidate cry clip: its current answer's run, label, p_yes and threshold, its gold, and whether
    its p_yes is in-sample (the run is a fine-tuned version's and the clip in the fine-tune training
    split, `finetune_split.part = 'train'`)."""
    cur = _current(scope).subquery()
    a = cry_answer
    in_train = sa.exists().where(
        finetune_split.c.task == scope.task.value,
        finetune_split.c.audio_id == cur.c.audio_id,
        finetune_split.c.part == "train",
    )
    return (
        sa.select(
            cur.c.audio_id,
            cur.c.run_id,
            a.c.label,
            _decided_p(a),
            sa.func.coalesce(a.c.threshold, DEFAULT_THRESHOLD).label("threshold"),
            cry_gold.c.gold_label,
            cry_gold.c.source.label("gold_source"),
            (label_run.c.params["model_version"].astext.is_not(None) & in_train).label("in_sample"),
        )
        .join(
            a, (a.c.run_id == cur.c.run_id) & (a.c.audio_id == cur.c.audio_id) & (a.c.method == cur.c.method)
        )
        .join(label_run, label_run.c.id == cur.c.run_id)
        .outerjoin(cry_gold, cry_gold.c.audio_id == cur.c.audio_id)
        .order_by(cur.c.audio_id)
    )


def _asr_current(scope: _Scope) -> sa.Select:
    """Per candidate ASR clip: its current transcript, mean token log-prob and manifest reference."""
    cur = _current(scope).subquery()
    t = transcription
    return (
        sa.select(
            cur.c.audio_id,
            cur.c.run_id,
            t.c.text,
            t.c.mean_logprob,
            asr_reference.c.reference_text,
            asr_reference.c.language,
            asr_reference.c.source.label("reference_source"),
        )
        .join(t, (t.c.run_id == cur.c.run_id) & (t.c.audio_id == cur.c.audio_id))
        .outerjoin(asr_reference, asr_reference.c.audio_id == cur.c.audio_id)
        .order_by(cur.c.audio_id)
    )


def _clip(scope: _Scope, row: sa.Row, strategy: Strategy, reason: str, priority: float) -> QueuedClip:
    return QueuedClip(int(row.audio_id), scope.task, int(row.run_id), strategy, reason, float(priority))


def _by_priority(n: int, clips: list[QueuedClip]) -> list[QueuedClip]:
    """The first `n` by highest priority; equal priorities (to 1e-9: |0.8 − 0.5| and |0.2 − 0.5| differ
    in binary) by audio id, so a queue is repeatable."""
    return sorted(clips, key=lambda c: (-round(c.priority, 9), c.audio_id))[:n]


# --- uncertainty ----------------------------------------------------------------------------------------


def _uncertainty(conn: sa.Connection, scope: _Scope, n: int) -> list[QueuedClip]:
    """cry: p_yes closest to the threshold its answer was decided with (priority 1 − 2·|p − t|, 1 at the
    threshold). asr: lowest mean token log-probability first (priority −mean_logprob); transcripts
    without one (written before 0015, or by the original Qwen-Audio backend) are not ranked. Ordered and
    cut to `n` in SQL (distances rounded to 1e-9, then audio id, as `_by_priority` does)."""
    out = []
    if scope.task is Task.CRY:
        query = _cry_current(scope)
        col = query.selected_columns
        gap = sa.func.round(sa.cast(sa.func.abs(col.p_yes - col.threshold), sa.Numeric), 9)
        for r in conn.execute(
            query.where(col.p_yes.is_not(None)).order_by(None).order_by(gap, col.audio_id).limit(n)
        ):
            distance = abs(r.p_yes - r.threshold)
            reason = f"p_yes {r.p_yes:.3f} is {distance:.3f} from the threshold {r.threshold:.3g}"
            out.append(
                _clip(scope, r, Strategy.UNCERTAINTY, f"{reason} (answer {r.label})", 1.0 - 2.0 * distance)
            )
    else:
        query = _asr_current(scope)
        col = query.selected_columns
        worst = sa.func.round(sa.cast(col.mean_logprob, sa.Numeric), 9)
        for r in conn.execute(
            query.where(col.mean_logprob.is_not(None)).order_by(None).order_by(worst, col.audio_id).limit(n)
        ):
            probability = math.exp(r.mean_logprob)
            reason = f"mean token log-prob {r.mean_logprob:.3f} (token probability {probability:.3f})"
            out.append(_clip(scope, r, Strategy.UNCERTAINTY, reason, -r.mean_logprob))
    return out


# --- disagreement ---------------------------------------------------------------------------------------


def _version_answers(conn: sa.Connection, scope: _Scope) -> dict[int, list[sa.Row]]:
    """Per candidate clip: the newest production answer of each model version (model, revision) that
    labelled it (cry: its score row when that run has one), newest version first."""
    r = label_run
    if scope.task is Task.CRY:
        a = cry_answer
        cols = [a.c.label, a.c.p_yes, sa.null().label("text")]
        order = [a.c.audio_id, r.c.model, r.c.revision, a.c.run_id.desc(), (a.c.method == "score").desc()]
    else:
        a = transcription
        cols = [sa.null().label("label"), sa.null().label("p_yes"), a.c.text]
        order = [a.c.audio_id, r.c.model, r.c.revision, a.c.run_id.desc()]
    rows = conn.execute(
        sa.select(a.c.audio_id, a.c.run_id, r.c.model, r.c.revision, *cols)
        .distinct(a.c.audio_id, r.c.model, r.c.revision)
        .join(r, r.c.id == a.c.run_id)
        .where(r.c.purpose == PRODUCTION, *scope.where(a.c.audio_id))
        .order_by(*order)
    ).all()
    out: dict[int, list[sa.Row]] = defaultdict(list)
    for row in rows:
        out[int(row.audio_id)].append(row)
    return {k: sorted(v, key=lambda x: -x.run_id) for k, v in out.items()}


def _methods_disagree(conn: sa.Connection, scope: _Scope) -> dict[int, tuple[float, str]]:
    """cry: clips whose current run answered yes/no by both methods, differently: audio -> (priority
    2·|p_yes − threshold| of the score answer, capped at 1: a sure score contradicted matters most)."""
    cur = _current(scope).subquery()
    s, g = cry_answer.alias("s"), cry_answer.alias("g")
    rows = conn.execute(
        sa.select(
            cur.c.audio_id,
            s.c.label,
            _decided_p(s),
            s.c.threshold,
            g.c.label.label("generated"),
            g.c.raw_answer,
        )
        .join(s, (s.c.run_id == cur.c.run_id) & (s.c.audio_id == cur.c.audio_id) & (s.c.method == "score"))
        .join(g, (g.c.run_id == cur.c.run_id) & (g.c.audio_id == cur.c.audio_id) & (g.c.method == "generate"))
        .where(s.c.label.in_(("yes", "no")), g.c.label.in_(("yes", "no")), s.c.label != g.c.label)
    ).all()
    out = {}
    for r in rows:
        threshold = DEFAULT_THRESHOLD if r.threshold is None else r.threshold
        p = threshold if r.p_yes is None else r.p_yes
        out[int(r.audio_id)] = (
            min(1.0, 2.0 * abs(p - threshold)),
            f"score says {r.label} (p_yes {p:.3f}) but generate answered {r.generated}: {r.raw_answer!r}",
        )
    return out


def _disagreement(conn: sa.Connection, scope: _Scope, n: int) -> list[QueuedClip]:
    """cry: `score` and `generate` of the clip's current run disagree (yes vs no), or the newest answers
    of two model versions do (priority |p_a − p_b|, 1 without p_yes); asr: two versions' transcripts
    differ (priority: the error rate of one against the other). A clip's strongest disagreement counts."""
    found: dict[int, tuple[float, str]] = _methods_disagree(conn, scope) if scope.task is Task.CRY else {}
    for audio_id, answers in _version_answers(conn, scope).items():
        newest = answers[0]
        for other in answers[1:]:
            if scope.task is Task.CRY:
                if newest.label not in ("yes", "no") or other.label not in ("yes", "no"):
                    continue
                if newest.label == other.label:
                    continue
                both = newest.p_yes is not None and other.p_yes is not None
                strength = abs(newest.p_yes - other.p_yes) if both else 1.0
                what = f"{newest.label} vs {other.label}"
            else:
                strength = score_utterance(newest.text or "", other.text).error_rate or 0.0
                if strength <= 0.0:
                    continue
                what = f"transcripts differ, error rate {strength:.3f} between them"
            reason = (
                f"{_version(newest)} (run {newest.run_id}) and {_version(other)} (run {other.run_id}): {what}"
            )
            if strength > found.get(audio_id, (-1.0, ""))[0]:
                found[audio_id] = (strength, reason)
    runs = {int(r.audio_id): r for r in conn.execute(_current(scope)).all()}
    return _by_priority(
        n,
        [_clip(scope, runs[a], Strategy.DISAGREEMENT, why, p) for a, (p, why) in found.items() if a in runs],
    )


def _version(row: sa.Row) -> str:
    return f"{row.model}@{row.revision}" if row.revision else str(row.model)


# --- gold conflict --------------------------------------------------------------------------------------


def _gold_conflict(conn: sa.Connection, scope: _Scope, n: int) -> list[QueuedClip]:
    """cry: manifest gold labels with an out-of-sample p_yes (in-sample ones, see `_cry_current`, are
    left out) go through cleanlab: `rank.get_label_quality_scores` (self-confidence: the model's
    probability of the gold label, adjusted by each class's average confidence) ranks them, lowest
    first, and the queue holds those that
    `filter.find_label_issues` flags or whose decided answer contradicts the gold (priority 1 − label
    quality). asr: manifest references against the current transcript, priority = its error rate × the
    transcript's confidence exp(mean_logprob) (1 when not recorded); error rate 0 is no conflict."""
    if scope.task is Task.ASR:
        out = []
        for r in conn.execute(_asr_current(scope)):
            if r.reference_source != "manifest" or r.reference_text is None:
                continue
            error = score_utterance(r.reference_text, r.text, r.language).error_rate
            if not error:
                continue
            confidence = 1.0 if r.mean_logprob is None else math.exp(r.mean_logprob)
            reason = f"error rate {error:.3f} against the manifest reference, confidence {confidence:.3f}"
            out.append(_clip(scope, r, Strategy.GOLD_CONFLICT, reason, error * confidence))
        return _by_priority(n, out)
    rows = [
        r
        for r in conn.execute(_cry_current(scope))
        if r.gold_source == "manifest"
        and r.gold_label in ("yes", "no")
        and r.p_yes is not None
        and not r.in_sample
    ]
    if not rows:
        return []
    labels = np.array([1 if r.gold_label == "yes" else 0 for r in rows])
    p = np.clip(np.array([r.p_yes for r in rows], dtype=float), 0.0, 1.0)
    probs = np.column_stack([1.0 - p, p])
    quality = _label_quality(labels, probs)
    flagged = _label_issues(labels, probs)
    out = []
    for r, q, flag in zip(rows, quality, flagged, strict=True):
        decided = "yes" if r.p_yes >= r.threshold else "no"
        if not flag and decided == r.gold_label:
            continue
        why = "cleanlab flags a label issue" if flag else f"the answer ({decided}) contradicts it"
        reason = f"manifest gold {r.gold_label}, p_yes {r.p_yes:.3f}: label quality {q:.3f}, {why}"
        out.append(_clip(scope, r, Strategy.GOLD_CONFLICT, reason, 1.0 - float(q)))
    return _by_priority(n, out)


def _label_quality(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    from cleanlab.rank import get_label_quality_scores

    # adjust_pred_probs: each class's probabilities minus that class's average self-confidence first, so
    # a model that says yes too readily does not push every "no" gold up the queue (bench/review.py:
    # flips found in the first 10 % rise from 52 % to 68 % for such a model, unchanged for a calibrated one)
    return get_label_quality_scores(labels, probs, method="self_confidence", adjust_pred_probs=True)


def _label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's confident-learning filter (per-class thresholds: it copes with a miscalibrated model);
    it needs both classes, else nothing is flagged and contradiction alone decides."""
    if len(set(labels.tolist())) < 2:
        return np.zeros(len(labels), dtype=bool)
    from cleanlab.filter import find_label_issues

    return find_label_issues(labels, probs, n_jobs=1)


_RANKERS = {
    Strategy.UNCERTAINTY: _uncertainty,
    Strategy.DISAGREEMENT: _disagreement,
    Strategy.GOLD_CONFLICT: _gold_conflict,
}


# --- random ---------------------------------------------------------------------------------------------


def _random(conn: sa.Connection, scope: _Scope, n: int, seed: int, taken: set[int]) -> list[QueuedClip]:
    """`n` clips drawn uniformly (ordered by md5 of seed and audio id: repeatable for a seed) from the
    candidates with a current production label, leaving out `taken`."""
    if n <= 0:
        return []
    cur = _current(scope).subquery()
    key = sa.func.md5(sa.literal(f"{seed}:") + sa.cast(cur.c.audio_id, sa.Text))
    query = sa.select(cur.c.audio_id, cur.c.run_id).order_by(key, cur.c.audio_id).limit(n)
    if taken:
        query = query.where(cur.c.audio_id != sa.all_(sa.literal(sorted(taken), sa.ARRAY(sa.BigInteger))))
    reason = f"uniform random sample (seed {seed}), for unbiased quality estimates"
    return [_clip(scope, r, Strategy.RANDOM, reason, 0.0) for r in conn.execute(query).all()]


def _interleave(ranked: list[QueuedClip], drawn: list[QueuedClip], n_ranked: int) -> list[QueuedClip]:
    """The ranked clips in order with the random ones spread evenly between them as the queue was planned
    (`n_ranked` ranked clips for len(drawn) random ones), so a reviewer who stops early has still seen
    the random share; random clips planned past the last ranked clip (the strategy found fewer) follow
    it."""
    if not drawn:
        return list(ranked)
    ratio = n_ranked / len(drawn)
    out: list[QueuedClip] = []
    taken = 0
    for k, clip in enumerate(drawn):
        upto = min(len(ranked), math.floor((k + 0.5) * ratio + 0.5))
        out.extend(ranked[taken:upto])
        taken = max(taken, upto)
        out.append(clip)
    return out + ranked[taken:]
