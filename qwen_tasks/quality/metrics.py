"""Quality metrics of a labelling run, computed from the database and stored back in `run_metric`.

Why stored: reviewers and dashboards query `run_quality` in SQL, and a run's numbers must not change
silently when code changes. Re-running `compute_run_metrics` replaces them (after human review, for
example, since human labels override manifest gold labels and references).

Cry detection, per method (score / generate): accuracy over decided answers and strict accuracy
(unknown counted as wrong), precision/recall/F1 for "yes", the confusion matrix, the unknown rate,
and for p_yes the ROC AUC and a threshold sweep with the best-F1 threshold. ASR: corpus WER (word
languages) and CER (Chinese), per language, and the most frequent substitution pairs; per-utterance
scores go to `utterance_score` for the review queue. The same corpus rates under the official
Qwen2-Audio scoring are stored beside them as `wer_official` / `cer_official`. Both: counts and
throughput from label_job.

Per dataset and per manifest source: the same figures (the same functions, `_cry_metrics` /
`_asr_metrics`, over a subset of the run's rows) for the run's clips of each dataset it covered and each
manifest `source`, stored in `run_metric_group` (SQL: the `run_quality_by_dataset` view) in the same
transaction as the whole-run figures. A run's size does not set the memory used: cry figures are counts
aggregated in the database, ASR transcripts are scored in chunks into running totals (`_AsrTotals`, per
group). Each stored row says what it was computed from (`run_metric.inputs`), so `current_run_metrics`
(the report) reuses figures that are still current.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, REGCLASS
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.quality.calibration import run_figures as calibration_figures
from qwen_tasks.quality.scoring import CorpusTotals, UtteranceScore, score_utterance, top_pairs
from qwen_tasks.records import JobStatus
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import (
    asr_reference,
    audio_file,
    cry_answer,
    cry_gold,
    cry_run_clip,
    dataset,
    dataset_audio,
    label_failure,
    label_job,
    label_run,
    manifest_item,
    metric_inputs_version,
    run_dataset,
    run_metric,
    run_metric_group,
    transcription,
    utterance_score,
)

# The key figures of the per-dataset / per-source tables (`metrics`, `report`), per task: those the
# run_quality_by_dataset view has as columns.
GROUP_FIGURES: dict[str, tuple[str, ...]] = {
    "cry": ("n_results", "n_gold", "score.accuracy", "score.f1", "score.roc_auc", "generate.accuracy",
            "generate.f1", "generate.unknown_rate"),
    "asr": ("n_results", "n_reference", "wer", "cer", "error_rate"),
}  # fmt: skip
SWEEP = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))
TOP_PAIRS = 20
ASR_CHUNK = 5000  # transcripts scored per round trip (metrics of an ASR run)
# work_mem of the transaction that aggregates a cry run's clips (server memory, not ours): the counts have
# a few hundred groups, but PostgreSQL estimates hundreds of thousands (one per key combination) and, at
# the default 4 MB, sorted 1 M rows on disk to group them (2.2 s at 1 M answers); with room for the hash
# it estimates, it hashes them.
AGGREGATE_WORK_MEM = "64MB"


@dataclass
class _Metrics:
    """Name -> (value, details) in insertion order."""

    values: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, name: str, value: float | None, **details: Any) -> None:
        self.values[name] = _finite(value)
        self.details[name] = _jsonable(details)


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python, NaN/inf -> None (JSONB rejects NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- cry detection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryScores:
    """Scores of yes/no predictions against gold; `unknown` answers are counted apart."""

    tp: int
    fp: int
    fn: int
    tn: int
    unknown_yes: int  # gold yes, answer unknown
    unknown_no: int

    @property
    def decided(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def total(self) -> int:
        return self.decided + self.unknown_yes + self.unknown_no

    @property
    def accuracy(self) -> float | None:
        return (self.tp + self.tn) / self.decided if self.decided else None

    @property
    def accuracy_strict(self) -> float | None:
        return (self.tp + self.tn) / self.total if self.total else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 2 * p * r / (p + r) if p + r else 0.0


def binary_scores(gold: list[str], predicted: list[str]) -> BinaryScores:
    """Confusion counts (positive class "yes") via scikit-learn; 'unknown' predictions kept apart."""
    from sklearn.metrics import confusion_matrix

    if len(gold) != len(predicted):
        raise ValueError(f"gold and predicted differ in length: {len(gold)} vs {len(predicted)}")
    pairs = [(g, p) for g, p in zip(gold, predicted, strict=True) if p in ("yes", "no")]
    unknown_yes = sum(
        1 for g, p in zip(gold, predicted, strict=True) if p not in ("yes", "no") and g == "yes"
    )
    unknown_no = sum(1 for g, p in zip(gold, predicted, strict=True) if p not in ("yes", "no") and g == "no")
    if pairs:
        (tn, fp), (fn, tp) = confusion_matrix(
            [g for g, _ in pairs], [p for _, p in pairs], labels=["no", "yes"]
        ).tolist()
    else:
        tn = fp = fn = tp = 0
    return BinaryScores(tp, fp, fn, tn, unknown_yes, unknown_no)


def roc_auc(gold: list[str], p_yes: list[float]) -> float | None:
    """ROC AUC of p_yes for gold "yes"; None when gold has a single class (AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    y = [1 if g == "yes" else 0 for g in gold]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, p_yes))


def threshold_sweep(gold: list[str], p_yes: list[float], thresholds: tuple[float, ...] = SWEEP) -> list[dict]:
    """Precision/recall/F1/accuracy of "p_yes >= t" for each threshold t."""
    rows = []
    for t in thresholds:
        s = binary_scores(gold, ["yes" if p >= t else "no" for p in p_yes])
        rows.append(
            {"threshold": t, "precision": s.precision, "recall": s.recall, "f1": s.f1, "accuracy": s.accuracy}
        )
    return rows


def best_threshold(sweep: list[dict]) -> dict | None:
    """The sweep row with the highest F1 (ties: the threshold closest to 0.5); None without any F1."""
    rows = [r for r in sweep if r["f1"] is not None]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["f1"], -abs(r["threshold"] - 0.5)))


def _cry_rows(conn: Connection, run_id: int) -> list[Any]:
    """The run's cry answers (one row per clip and method) with their gold label (small runs, tests)."""
    q = (
        sa.select(
            cry_answer.c.audio_id,
            cry_answer.c.method,
            cry_answer.c.label,
            cry_answer.c.p_yes,
            cry_gold.c.gold_label,
        )
        .select_from(cry_answer.outerjoin(cry_gold, cry_gold.c.audio_id == cry_answer.c.audio_id))
        .where(cry_answer.c.run_id == run_id)
        .order_by(cry_answer.c.audio_id, cry_answer.c.method)
    )
    return list(conn.execute(q).all())


def _cry_metrics(rows: Sequence[Any], out: _Metrics) -> None:
    """Every cry figure over `rows` (_cry_rows), in Python: the reference `_cry_group_metrics` (which
    aggregates in the database) is tested against; used for runs without answers."""
    audio_ids = {r.audio_id for r in rows}
    out.add("n_results", len(audio_ids))
    with_gold = {r.audio_id for r in rows if r.gold_label is not None}
    out.add("n_gold", len(with_gold))
    by_method: dict[str, list] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method in ("score", "generate"):
        items = by_method.get(method)
        if not items:
            continue
        gold_items = [r for r in items if r.gold_label is not None]
        unknown = sum(1 for r in items if r.label == "unknown")
        out.add(f"{method}.n", len(items), with_gold=len(gold_items))
        out.add(f"{method}.unknown_rate", unknown / len(items), unknown=unknown, n=len(items))
        s = binary_scores([r.gold_label for r in gold_items], [r.label for r in gold_items])
        _binary_figures(out, method, s)
        scored = [r for r in gold_items if r.p_yes is not None]
        if not scored and any(r.p_yes is not None for r in items):
            out.add(f"{method}.roc_auc", None, n=0, note="undefined: no gold labels for these clips")
            out.add(f"{method}.best_threshold", None, best=None, sweep=[])
        if scored:
            gold, p = [r.gold_label for r in scored], [float(r.p_yes) for r in scored]
            out.add(
                f"{method}.roc_auc",
                roc_auc(gold, p),
                n=len(scored),
                classes=sorted(set(gold)),
                note=None if len(set(gold)) > 1 else "undefined: gold has a single class",
            )
            sweep = threshold_sweep(gold, p)
            best = best_threshold(sweep)
            out.add(
                f"{method}.best_threshold",
                best["threshold"] if best else None,
                best=best,
                sweep=sweep,
            )
    score = {r.audio_id: r.label for r in by_method.get("score", []) if r.label in ("yes", "no")}
    generate = {r.audio_id: r.label for r in by_method.get("generate", []) if r.label in ("yes", "no")}
    both = sorted(score.keys() & generate.keys())
    if both:
        agree = sum(score[a] == generate[a] for a in both)
        out.add("methods.agreement", agree / len(both), agree=agree, n=len(both))


# The whole run's figures are stored under this (grouping, group name); groups are ('dataset', name) and
# ('source', name).
WHOLE_RUN = ("run", "")


def _cry_clips(conn: Connection, run_id: int) -> sa.Subquery:
    """The run's clips (both methods' label and p_yes side by side, and the gold label), once for the whole
    run and once per group they are in (grouping, group_name): rows of `cry_run_clip` (kept by triggers,
    migration 0018), read by the run's key, not computed from its answers."""
    rc = cry_run_clip.c
    cols = (
        rc.audio_id,
        rc.gold_label.label("gold"),
        rc.s_label,
        rc.g_label,
        rc.s_label.is_not(None).label("has_s"),
        rc.g_label.is_not(None).label("has_g"),
        rc.s_p,
        rc.g_p,
    )
    covered = sa.select(run_dataset.c.dataset_id).where(run_dataset.c.run_id == run_id)
    has_covered = conn.execute(sa.select(sa.exists(covered))).scalar_one()
    by_dataset = (
        sa.select(sa.literal("dataset", sa.Text).label("grouping"), dataset.c.name.label("group_name"), *cols)
        .select_from(cry_run_clip)
        .join(dataset_audio, dataset_audio.c.audio_id == rc.audio_id)
        .join(dataset, dataset.c.id == dataset_audio.c.dataset_id)
        .where(rc.run_id == run_id)
    )
    if has_covered:
        by_dataset = by_dataset.where(dataset.c.id.in_(covered))
    by_source = sa.select(
        sa.literal("source", sa.Text).label("grouping"), rc.source.label("group_name"), *cols
    ).where(rc.run_id == run_id, rc.source.is_not(None))
    grouping, group_name = (sa.literal(v, sa.Text) for v in WHOLE_RUN)
    whole = sa.select(grouping.label("grouping"), group_name.label("group_name"), *cols).where(
        rc.run_id == run_id
    )
    return sa.union_all(whole, by_dataset, by_source).subquery("clips")


def run_answers(run_id: int, members: sa.Select | None = None) -> sa.Subquery:
    """The run's cry answers with their gold label, one row per clip and method (audio_id, method, label,
    p_yes, threshold, p_calibrated, gold_label), from `cry_run_clip`; `members`: a query of the audio ids
    to keep (None: all). What calibration's bins and the report read, instead of joining the run's answers
    to cry_gold."""
    rc = cry_run_clip.c
    where = [rc.run_id == run_id] + ([] if members is None else [rc.audio_id.in_(members)])
    return sa.union_all(
        *(
            sa.select(
                rc.audio_id,
                sa.literal(method, sa.Text).label("method"),
                label.label("label"),
                p.label("p_yes"),
                threshold.label("threshold"),
                calibrated.label("p_calibrated"),
                rc.gold_label,
            ).where(*where, label.is_not(None))
            for method, label, p, threshold, calibrated in (
                ("score", rc.s_label, rc.s_p, rc.s_threshold, rc.s_calibrated),
                ("generate", rc.g_label, rc.g_p, rc.g_threshold, rc.g_calibrated),
            )
        )
    ).subquery("answers")


def _cry_group_metrics(conn: Connection, run_id: int) -> dict[tuple[str, str], _Metrics]:
    """Every cry figure of the whole run and of each of its groups, aggregated in the database: the clips
    are counted by (gold, both methods' labels, which sweep thresholds each p_yes reaches), a few hundred
    rows whatever the run's size, and the ROC AUC is the Mann-Whitney statistic over the histogram of
    p_yes values (ties counted half). Same figures and details as `_cry_metrics` over the rows."""
    conn.execute(sa.select(sa.func.set_config("work_mem", AGGREGATE_WORK_MEM, True)))
    t = _cry_clips(conn, run_id).c
    thresholds = sa.cast(sa.literal([float(x) for x in SWEEP]), ARRAY(sa.Float))
    ks = sa.func.width_bucket(t.s_p, thresholds).label("ks")  # how many thresholds s_p reaches
    kg = sa.func.width_bucket(t.g_p, thresholds).label("kg")
    keys = (t.grouping, t.group_name, t.gold, t.s_label, t.g_label, t.has_s, t.has_g, ks, kg)
    counts = conn.execute(sa.select(*keys, sa.func.count().label("n")).group_by(*keys)).all()
    hist_rows = [
        sa.select(
            t.grouping, t.group_name, sa.literal(m, sa.Text).label("method"), p.label("p"), t.gold
        ).where(has, p.is_not(None), t.gold.is_not(None))
        for m, has, p in (("score", t.has_s, t.s_p), ("generate", t.has_g, t.g_p))
    ]
    scored = sa.union_all(*hist_rows).subquery("scored")
    sc = scored.c
    hist = (
        sa.select(
            sc.grouping,
            sc.group_name,
            sc.method,
            sc.p,
            sa.func.count().filter(sc.gold == "yes").label("pos"),
            sa.func.count().filter(sc.gold == "no").label("neg"),
        )
        .group_by(sc.grouping, sc.group_name, sc.method, sc.p)
        .subquery("hist")
    )
    h = hist.c
    below = sa.func.coalesce(
        sa.func.sum(h.neg).over(
            partition_by=(h.grouping, h.group_name, h.method), order_by=h.p, rows=(None, -1)
        ),
        0,
    )
    ranked = sa.select(
        h.grouping, h.group_name, h.method, (h.pos * (below + h.neg * 0.5)).label("wins")
    ).subquery()
    r = ranked.c
    auc_wins = {
        (w.grouping, w.group_name, w.method): float(w.wins)
        for w in conn.execute(
            sa.select(r.grouping, r.group_name, r.method, sa.func.sum(r.wins).label("wins")).group_by(
                r.grouping, r.group_name, r.method
            )
        )
    }
    by_group: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in counts:
        by_group[(row.grouping, row.group_name)].append(row)
    out: dict[tuple[str, str], _Metrics] = {}
    for key in sorted(by_group):
        rows = by_group[key]
        m = out[key] = _Metrics()
        m.add("n_results", sum(x.n for x in rows))
        m.add("n_gold", sum(x.n for x in rows if x.gold is not None))
        for method, has, label, k in (
            ("score", "has_s", "s_label", "ks"),
            ("generate", "has_g", "g_label", "kg"),
        ):
            mine = [(x.gold, getattr(x, label), getattr(x, k), x.n) for x in rows if getattr(x, has)]
            if mine:
                _cry_method_figures(m, method, _MethodCounts.of(mine), auc_wins.get((*key, method)))
        both = [x for x in rows if x.s_label in ("yes", "no") and x.g_label in ("yes", "no")]
        n_both = sum(x.n for x in both)
        if n_both:
            agree = sum(x.n for x in both if x.s_label == x.g_label)
            m.add("methods.agreement", agree / n_both, agree=agree, n=n_both)
    return out


@dataclass
class _MethodCounts:
    """One method's counts over a group's clips (from `_cry_group_metrics`' grouped counts)."""

    n: int = 0
    with_gold: int = 0
    unknown: int = 0
    with_p: int = 0
    pos: int = 0
    neg: int = 0
    confusion: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    reached: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))  # (gold, k) -> n

    @classmethod
    def of(cls, rows: list[tuple[str | None, str, int | None, int]]) -> _MethodCounts:
        c = cls()
        for gold, label, k, n in rows:
            c.n += n
            c.unknown += n if label == "unknown" else 0
            c.with_p += n if k is not None else 0
            if gold is None:
                continue
            c.with_gold += n
            c.confusion[(gold, label if label in ("yes", "no") else "unknown")] += n
            if k is not None:
                c.pos += n if gold == "yes" else 0
                c.neg += n if gold == "no" else 0
                c.reached[(gold, k)] += n
        return c

    def scores(self) -> BinaryScores:
        f = self.confusion
        return BinaryScores(
            f[("yes", "yes")], f[("no", "yes")], f[("yes", "no")], f[("no", "no")],
            f[("yes", "unknown")], f[("no", "unknown")],
        )  # fmt: skip

    def at(self, index: int, gold: str) -> int:
        """Clips of this gold whose p_yes reaches threshold number `index` (p_yes >= SWEEP[index])."""
        return sum(n for (g, k), n in self.reached.items() if g == gold and k > index)


def _cry_method_figures(out: _Metrics, method: str, c: _MethodCounts, wins: float | None) -> None:
    """One method's figures from its counts (as `_cry_metrics` computes them from rows)."""
    out.add(f"{method}.n", c.n, with_gold=c.with_gold)
    out.add(f"{method}.unknown_rate", c.unknown / c.n, unknown=c.unknown, n=c.n)
    _binary_figures(out, method, c.scores())
    n_scored = c.pos + c.neg
    if not n_scored and c.with_p:
        out.add(f"{method}.roc_auc", None, n=0, note="undefined: no gold labels for these clips")
        out.add(f"{method}.best_threshold", None, best=None, sweep=[])
    if n_scored:
        classes = sorted(x for x, k in (("no", c.neg), ("yes", c.pos)) if k)
        auc = wins / (c.pos * c.neg) if c.pos and c.neg and wins is not None else None
        out.add(
            f"{method}.roc_auc",
            auc,
            n=n_scored,
            classes=classes,
            note=None if len(classes) > 1 else "undefined: gold has a single class",
        )
        sweep = []
        for k, t in enumerate(SWEEP):
            tp, fp = c.at(k, "yes"), c.at(k, "no")
            st = BinaryScores(tp, fp, c.pos - tp, c.neg - fp, 0, 0)
            sweep.append(
                {
                    "threshold": t,
                    "precision": st.precision,
                    "recall": st.recall,
                    "f1": st.f1,
                    "accuracy": st.accuracy,
                }
            )
        best = best_threshold(sweep)
        out.add(f"{method}.best_threshold", best["threshold"] if best else None, best=best, sweep=sweep)


def _binary_figures(out: _Metrics, method: str, s: BinaryScores) -> None:
    out.add(f"{method}.accuracy", s.accuracy, correct=s.tp + s.tn, decided=s.decided)
    out.add(f"{method}.accuracy_strict", s.accuracy_strict, correct=s.tp + s.tn, n=s.total)
    out.add(f"{method}.precision", s.precision)
    out.add(f"{method}.recall", s.recall)
    out.add(f"{method}.f1", s.f1)
    out.add(
        f"{method}.confusion",
        s.decided,
        tp=s.tp,
        fp=s.fp,
        fn=s.fn,
        tn=s.tn,
        unknown_gold_yes=s.unknown_yes,
        unknown_gold_no=s.unknown_no,
        matrix={"rows": "gold no, gold yes", "cols": "predicted no, predicted yes"},
    )


# --- ASR ----------------------------------------------------------------------------------------------


class _AsrItem(NamedTuple):
    """One transcript of a run, scored against its reference (scores None without one)."""

    audio_id: int
    reference_source: str | None
    score: UtteranceScore | None
    official: UtteranceScore | None  # the Qwen2-Audio eval_audio/evaluate_asr.py scoring


def _asr_rows(conn: Connection, run_id: int) -> list[_AsrItem]:
    """The run's transcripts, each scored once (our scoring and the official one)."""
    q = (
        sa.select(
            transcription.c.audio_id,
            transcription.c.text,
            asr_reference.c.reference_text,
            asr_reference.c.language,
            asr_reference.c.source,
        )
        .select_from(
            transcription.outerjoin(asr_reference, asr_reference.c.audio_id == transcription.c.audio_id)
        )
        .where(transcription.c.run_id == run_id)
        .order_by(transcription.c.audio_id)
    )
    return [_scored(r) for r in conn.execute(q)]


def _scored(r: Any) -> _AsrItem:
    """One transcript row (audio_id, text, reference_text, language, source) scored both ways."""
    if r.reference_text is None:
        return _AsrItem(r.audio_id, None, None, None)
    return _AsrItem(
        r.audio_id,
        r.source,
        score_utterance(r.reference_text, r.text, r.language),
        score_utterance(r.reference_text, r.text, r.language, mode="official"),
    )


class _AsrTotals:
    """Every ASR figure of a stream of scored transcripts (a run, or one of its groups), kept as running
    sums, so a run is scored chunk by chunk in bounded memory (the substitution pairs are counted, not
    listed: their number grows with the vocabulary, not with the run)."""

    def __init__(self) -> None:
        self.n_results = 0
        self.n_reference = 0
        self.ours: dict[str, CorpusTotals] = defaultdict(CorpusTotals)  # unit ->
        self.official: dict[str, CorpusTotals] = defaultdict(CorpusTotals)
        self.all = CorpusTotals()
        self.languages: dict[str, CorpusTotals] = defaultdict(CorpusTotals)
        self.language_unit: dict[str, str] = {}  # the unit of a language's first utterance
        self.n_pairs = 0
        self.pairs: Counter[tuple[str, str]] = Counter()

    def add(self, item: _AsrItem) -> None:
        self.n_results += 1
        if item.score is None:
            return
        s = item.score
        self.n_reference += 1
        self.ours[s.unit].add(s)
        self.all.add(s)
        self.languages[s.language].add(s)
        self.language_unit.setdefault(s.language, s.unit)
        self.n_pairs += len(s.pairs)
        self.pairs.update(s.pairs)
        if item.official is not None:
            self.official[item.official.unit].add(item.official)

    def figures(self, out: _Metrics) -> None:
        out.add("n_results", self.n_results)
        out.add("n_reference", self.n_reference)
        for name, unit in (("wer", "word"), ("cer", "char")):
            c = self.ours[unit].score() if unit in self.ours else None
            if c is not None and c.n_utterances:
                out.add(name, c.error_rate, **c.as_dict())
        for name, unit in (("wer_official", "word"), ("cer_official", "char")):
            c = self.official[unit].score() if unit in self.official else None
            if c is not None and c.n_utterances:
                out.add(name, c.error_rate, **c.as_dict(), scoring="Qwen2-Audio eval_audio/evaluate_asr.py")
        if self.n_reference:
            c = self.all.score()
            out.add(
                "error_rate",
                c.error_rate,
                **c.as_dict(),
                note="edits / reference units, words and chars mixed",
            )
        for lang in sorted(self.languages):
            c = self.languages[lang].score()
            out.add(f"{lang}.error_rate", c.error_rate, unit=self.language_unit[lang], **c.as_dict())
        if self.n_reference:
            top = top_pairs(self.pairs, TOP_PAIRS)
            out.add(
                "substitutions",
                self.n_pairs,
                top=[{"reference": r, "hypothesis": h, "count": n} for r, h, n in top],
            )


def _asr_metrics(items: Iterable[_AsrItem], out: _Metrics) -> None:
    """Every ASR figure over `items` (_asr_rows: a whole run, or the clips of one of its groups)."""
    totals = _AsrTotals()
    for item in items:
        totals.add(item)
    totals.figures(out)


def _asr_streamed(conn: Connection, run_id: int) -> dict[tuple[str, str], _Metrics]:
    """The figures of the whole run (WHOLE_RUN) and of each of its groups (_run_groups' rule), its
    transcripts read and scored `ASR_CHUNK` at a time from a server-side cursor, each chunk's
    utterance_score rows written as it goes: memory does not grow with the run."""
    t = transcription.c
    groups = _asr_group_columns(conn, run_id)
    q = (
        sa.select(
            t.audio_id,
            t.text,
            asr_reference.c.reference_text,
            asr_reference.c.language,
            asr_reference.c.source,
            *groups,
        )
        .select_from(transcription.outerjoin(asr_reference, asr_reference.c.audio_id == t.audio_id))
        .where(t.run_id == run_id)
        .order_by(t.audio_id)
    )
    totals: dict[tuple[str, str], _AsrTotals] = defaultdict(_AsrTotals)
    totals[WHOLE_RUN] = _AsrTotals()  # a run without transcripts still has its (zero) figures
    conn.execute(sa.delete(utterance_score).where(utterance_score.c.run_id == run_id))
    # options of this statement only (Connection.execution_options would stream the inserts too)
    result = conn.execute(q, execution_options={"stream_results": True, "yield_per": ASR_CHUNK})
    for chunk in result.partitions():
        items = [_scored(r) for r in chunk]
        for r, item in zip(chunk, items, strict=True):
            totals[WHOLE_RUN].add(item)
            for name in r.datasets or ():
                totals[("dataset", name)].add(item)
            if r.source_group is not None:
                totals[("source", r.source_group)].add(item)
        rows = _utterance_rows(run_id, items)
        if rows:
            conn.execute(sa.insert(utterance_score), rows)
    out: dict[tuple[str, str], _Metrics] = {}
    for key in sorted(totals, key=lambda k: (k != WHOLE_RUN, k)):
        out[key] = _Metrics()
        totals[key].figures(out[key])
    return out


def _asr_group_columns(conn: Connection, run_id: int) -> list[sa.ColumnElement]:
    """Per transcript, its groups as _run_groups defines them: `datasets` (names; only the datasets the
    run covered when it has run_dataset rows) and `source_group` (the source of its latest asr manifest
    line with one)."""
    t = transcription.c
    covered = sa.select(run_dataset.c.dataset_id).where(run_dataset.c.run_id == run_id)
    has_covered = conn.execute(sa.select(sa.exists(covered))).scalar_one()
    names = (
        sa.select(dataset.c.name)
        .join(dataset_audio, dataset_audio.c.dataset_id == dataset.c.id)
        .where(dataset_audio.c.audio_id == t.audio_id)
    )
    if has_covered:
        names = names.where(dataset.c.id.in_(covered))
    source = (
        sa.select(manifest_item.c.source)
        .join(audio_file, audio_file.c.id == manifest_item.c.audio_file_id)
        .where(
            audio_file.c.audio_id == t.audio_id,
            manifest_item.c.kind == "asr",
            manifest_item.c.source.is_not(None),
        )
        .order_by(manifest_item.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return [sa.func.array(names.scalar_subquery()).label("datasets"), source.label("source_group")]


def _utterance_rows(run_id: int, items: Sequence[_AsrItem]) -> list[dict]:
    """utterance_score rows of the scored transcripts."""
    return [
        {
            "run_id": run_id,
            "audio_id": i.audio_id,
            "language": i.score.language,
            "unit": i.score.unit,
            "reference_source": i.reference_source,
            "n_ref": i.score.n_ref,
            "substitutions": i.score.substitutions,
            "deletions": i.score.deletions,
            "insertions": i.score.insertions,
            "error_rate": i.score.error_rate,
        }
        for i in items
        if i.score is not None
    ]


# --- per dataset and per manifest source ----------------------------------------------------------------


def _run_groups(
    conn: Connection, run_id: int, task: str, audio_ids: set[int]
) -> dict[tuple[str, str], set[int]]:
    """(grouping, group name) -> the run's clips in that group.

    'dataset': each dataset the run covered (run_dataset), or, for a run without run_dataset rows (planned
    before datasets existed), every dataset its clips belong to. 'source': the `source` of the clip's
    manifest line of the task's kind (aqa for cry, asr for asr), the latest such line with a source, as
    cry_gold / asr_reference pick the latest line with a gold label / reference. Clips with no source are
    in no source group; a group with none of the run's clips is left out."""
    groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    if not audio_ids:
        return groups
    covered = sa.select(run_dataset.c.dataset_id).where(run_dataset.c.run_id == run_id)
    has_covered = conn.execute(sa.select(sa.exists(covered))).scalar_one()
    members = (
        sa.select(dataset.c.name, dataset_audio.c.audio_id)
        .join(dataset_audio, dataset_audio.c.dataset_id == dataset.c.id)
        .where(dataset_audio.c.audio_id.in_(sorted(audio_ids)))
    )
    if has_covered:
        members = members.where(dataset.c.id.in_(covered))
    for name, audio_id in conn.execute(members):
        groups[("dataset", name)].add(audio_id)
    kind = "aqa" if task == "cry" else "asr"
    sources = (
        sa.select(audio_file.c.audio_id, manifest_item.c.source)
        .distinct(audio_file.c.audio_id)
        .join(audio_file, audio_file.c.id == manifest_item.c.audio_file_id)
        .where(
            manifest_item.c.kind == kind,
            manifest_item.c.source.is_not(None),
            audio_file.c.audio_id.in_(sorted(audio_ids)),
        )
        .order_by(audio_file.c.audio_id, manifest_item.c.id.desc())
    )
    for audio_id, source in conn.execute(sources):
        groups[("source", source)].add(audio_id)
    return groups


def _group_metrics(
    conn: Connection, run_id: int, task: str, rows: Sequence[Any]
) -> dict[tuple[str, str], _Metrics]:
    """The run's figures over the clips of each of its groups (_run_groups), by the same functions as the
    whole run's: `rows` are _cry_rows or _asr_rows."""
    figures = _cry_metrics if task == "cry" else _asr_metrics
    out = {}
    for key, members in sorted(_run_groups(conn, run_id, task, {r.audio_id for r in rows}).items()):
        out[key] = _Metrics()
        figures([r for r in rows if r.audio_id in members], out[key])
    return out


# --- shared -------------------------------------------------------------------------------------------


def _truncated(conn: Connection, run_id: int, task: str, out: _Metrics) -> None:
    """Generated text that hit its token budget (no end-of-sequence token): ASR `truncated`, cry
    `generate.truncated`; value = count, details n and rate. Absent when nothing was generated."""
    if task == "asr":
        t = transcription.c
        name, query = "truncated", sa.select(sa.func.count(), sa.func.count().filter(t.truncated))
        query = query.where(t.run_id == run_id)
    else:  # the generate answers, from cry_run_clip (one row per clip)
        rc = cry_run_clip.c
        name = "generate.truncated"
        query = sa.select(sa.func.count(rc.g_label), sa.func.count().filter(rc.g_truncated))
        query = query.where(rc.run_id == run_id)
    n, hit = conn.execute(query).one()
    if n:
        out.add(name, hit, n=n, rate=hit / n)


def _throughput(conn: Connection, run_id: int, out: _Metrics) -> None:
    j = label_job.c
    row = conn.execute(
        sa.select(
            sa.func.count().label("jobs"),
            sa.func.coalesce(sa.func.sum(j.n_items), 0).label("items"),
            sa.func.coalesce(sa.func.sum(j.audio_seconds), 0.0).label("audio_seconds"),
            sa.func.sum(j.process_seconds).label("busy_seconds"),
            sa.func.min(j.started_at).label("first_start"),
            sa.func.max(j.finished_at).label("last_finish"),
        ).where(j.run_id == run_id, j.status == JobStatus.DONE)
    ).one()
    failed = conn.execute(
        sa.select(sa.func.count()).select_from(label_failure).where(label_failure.c.run_id == run_id)
    ).scalar_one()
    out.add("n_failed", failed)
    if not row.jobs or row.first_start is None or row.last_finish is None:
        return
    wall = (row.last_finish - row.first_start).total_seconds()
    details = {
        "jobs_done": row.jobs,
        "items": row.items,
        "audio_seconds": row.audio_seconds,
        "wall_seconds": wall,
        "busy_seconds": row.busy_seconds,
    }
    if wall > 0:
        out.add("throughput.items_per_s", row.items / wall, **details)
        out.add("throughput.audio_s_per_s", row.audio_seconds / wall, **details)
    if row.audio_seconds and row.busy_seconds is not None:
        out.add(
            "throughput.rtf",
            row.busy_seconds / row.audio_seconds,
            **details,
            note="processing seconds per audio second (lower is faster)",
        )


def compute_run_metrics(engine: Engine, run_id: int) -> dict[str, Any]:
    """Compute, store (replacing earlier values) and return the metrics of one run.

    Returns a flat mapping: "run_id", "task", "model", then metric name -> value (None when undefined,
    e.g. ROC AUC with a single gold class). Details (confusion matrix, sweep, pairs) are in run_metric.
    """
    with transaction(engine) as conn:
        run = conn.execute(
            sa.select(label_run.c.id, label_run.c.task, label_run.c.model).where(label_run.c.id == run_id)
        ).one_or_none()
        if run is None:
            raise ConfigError(f"run {run_id} does not exist")
        inputs = _inputs(conn, run_id)  # read first: a change while computing makes the figures stale
        out = _Metrics()
        if run.task == "cry":
            # aggregated in the database: memory does not grow with the run
            groups = _cry_group_metrics(conn, run_id)
            whole = groups.pop(WHOLE_RUN, None)
            if whole is None:  # a run without answers
                _cry_metrics([], out)
            else:
                out.values.update(whole.values)
                out.details.update(whole.details)
        else:
            # scored in chunks, utterance_score written as it goes: memory does not grow with the run
            groups = _asr_streamed(conn, run_id)
            whole = groups.pop(WHOLE_RUN)
            out.values.update(whole.values)
            out.details.update(whole.details)
        _truncated(conn, run_id, run.task, out)
        _throughput(conn, run_id, out)
        if run.task == "cry":  # ECE and coverage (quality.calibration)
            for name, value, details in calibration_figures(conn, run_id, out.details, run_answers(run_id)):
                out.add(name, value, **details)
        _store_groups(conn, run_id, groups)
        conn.execute(sa.delete(run_metric).where(run_metric.c.run_id == run_id))
        conn.execute(
            sa.insert(run_metric),
            [
                {
                    "run_id": run_id,
                    "name": name,
                    "value": value,
                    "details": out.details[name],
                    "inputs": inputs,
                }
                for name, value in out.values.items()
            ],
        )
    return {"run_id": run.id, "task": run.task, "model": run.model, **out.values}


def _store_groups(conn: Connection, run_id: int, groups: dict[tuple[str, str], _Metrics]) -> None:
    conn.execute(sa.delete(run_metric_group).where(run_metric_group.c.run_id == run_id))
    rows = [
        {
            "run_id": run_id,
            "grouping": grouping,
            "group_name": group_name,
            "name": name,
            "value": value,
            "details": m.details[name],
        }
        for (grouping, group_name), m in groups.items()
        for name, value in m.values.items()
    ]
    if rows:
        conn.execute(sa.insert(run_metric_group), rows)


# Bump when the figures compute_run_metrics stores change (a new figure, a new definition): figures
# stored by an older version are then recomputed by `current_run_metrics`, not reused.
FIGURES_VERSION = 1


def _inputs(conn: Connection, run_id: int) -> str:
    """What a run's figures are computed from, as one string: the figures' version, the run's row
    (status, counts, purpose, end), its answers, failures and jobs, and the counter every change of gold
    labels, manifest lines, files and datasets bumps (migration 0011). Equal strings: same figures."""
    r = label_run.c
    rc = cry_run_clip.c  # one row per clip, both methods: the run's cry answers, counted without reading them
    answers = sa.union_all(
        sa.select((sa.func.count(rc.s_label) + sa.func.count(rc.g_label)).label("n")).where(
            rc.run_id == run_id
        ),
        sa.select(sa.func.count().label("n")).where(transcription.c.run_id == run_id),
    ).subquery()
    jobs = label_job.c
    row = conn.execute(
        sa.select(
            r.status,
            r.purpose,
            r.n_labelled,
            r.n_failed,
            r.finished_at,
            sa.select(sa.func.sum(answers.c.n)).scalar_subquery(),
            sa.select(sa.func.count()).where(label_failure.c.run_id == run_id).scalar_subquery(),
            sa.select(sa.func.count())
            .where(jobs.run_id == run_id, jobs.status == JobStatus.DONE.value)
            .scalar_subquery(),
            sa.select(sa.func.max(jobs.finished_at)).where(jobs.run_id == run_id).scalar_subquery(),
            sa.func.pg_sequence_last_value(sa.cast(metric_inputs_version.name, REGCLASS)),
        ).where(r.id == run_id)
    ).one()
    return "|".join(str(v) for v in (FIGURES_VERSION, *row))


def current_run_metrics(engine: Engine, run_id: int) -> dict[str, dict[str, Any]]:
    """The run's stored metrics (the shape of load_run_metrics) when they were computed from what the
    database holds now (`run_metric.inputs`), else computed and stored first: a report of a finished run
    reads its figures instead of recomputing them over every answer."""
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(sa.func.array_agg(sa.distinct(run_metric.c.inputs))).where(
                run_metric.c.run_id == run_id
            )
        ).scalar()
        current = stored == [_inputs(conn, run_id)]
    if not current:
        compute_run_metrics(engine, run_id)
    return load_run_metrics(engine, run_id)


def load_run_metrics(engine: Engine, run_id: int) -> dict[str, dict[str, Any]]:
    """Stored metrics of a run: name -> {"value", "details"} (empty when never computed)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(run_metric.c.name, run_metric.c.value, run_metric.c.details)
            .where(run_metric.c.run_id == run_id)
            .order_by(run_metric.c.name)
        ).all()
    return {r.name: {"value": r.value, "details": r.details} for r in rows}


def load_group_metrics(
    engine: Engine | Connection, run_id: int, grouping: str | None = None
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Stored per-group metrics of a run: grouping ('dataset' / 'source') -> group name -> metric name
    -> {"value", "details"}, the shape of load_run_metrics per group (empty when none)."""
    g = run_metric_group.c
    query = sa.select(g.grouping, g.group_name, g.name, g.value, g.details).where(g.run_id == run_id)
    if grouping is not None:
        query = query.where(g.grouping == grouping)
    query = query.order_by(g.grouping, g.group_name, g.name)
    if isinstance(engine, Connection):
        rows = engine.execute(query).all()
    else:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r.grouping, {}).setdefault(r.group_name, {})[r.name] = {
            "value": r.value,
            "details": r.details,
        }
    return out


def require_datasets(engine: Engine, names: Sequence[str]) -> dict[str, int]:
    """name -> id of the named datasets; ConfigError naming an unknown one (ingest.datasets.resolve)."""
    from qwen_tasks.ingest.datasets import resolve

    if not names:
        return {}
    return {d.name: d.id for d in resolve(engine, names)}
