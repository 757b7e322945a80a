"""Calibrated yes/no decisions: fit a cry `score` decision rule on held-out labels, and measure calibration.

Why: a fine-tuned version can rank clips perfectly (ROC AUC 1.0) and still write wrong labels when its
scores sit on the wrong side of a fixed 0.5. Here a rule is fitted on reviewed / gold labels the model
was not trained on — optionally a probability calibration (Platt: logistic regression on logit(p_yes),
two parameters, the default because it is safe with few labels; isotonic: a monotone step curve, for
many labels), then the threshold on the calibrated probability that maximises F1, or the lowest one that
reaches a target precision. The rule is stored (`labelling.decision`, table decision_calibration) and
labelling applies it with `records.Calibration.apply`, the same code that evaluated it here.

Also here: ECE over 10 equal-width bins and the reliability diagram, binned in SQL (`width_bucket`, one
row per bin whatever the run's size), and accuracy shown with its coverage (decided / total clips with
gold), so an accuracy over one decided clip cannot read as perfect.

`CalibrateOptions` declares `qwen-tasks calibrate`'s options once (`options_spec`: its flags are
generated from it); the calibration method and the target precision are declared here once
(`CALIBRATION`, `TARGET_PRECISION`), and `finetune.options.FinetuneOptions` reuses them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from qwen_tasks import options_spec
from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling import decision
from qwen_tasks.options_spec import Spec, option
from qwen_tasks.records import Calibration, CalibrationMethod, Task, logit
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import cry_answer, cry_gold, dataset_audio, finetune_split, label_run

DEFAULT_METHOD = CalibrationMethod.PLATT
ECE_BINS = 10
MIN_PER_CLASS = 1  # a rule needs at least one gold yes and one gold no
PLATT_C = 1.0  # sklearn's default L2 strength: keeps a and b finite when held-out scores separate perfectly


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold on (calibrated) scores and its figures on the labels it was chosen on."""

    threshold: float
    objective: str  # "max_f1" or "precision>=P"
    precision: float | None
    recall: float
    f1: float
    accuracy: float
    note: str | None = None


def check_method(method: str) -> str:
    if method not in set(CalibrationMethod):
        raise ConfigError(f"--calibration must be none, platt or isotonic, got {method!r}")
    return str(method)


def check_target_precision(value: float | None) -> float | None:
    """--target-precision: None, or a precision in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"--target-precision must be in (0, 1], got {value}")
    return value


def _check_task(task: str) -> str:
    if task != Task.CRY:
        raise ConfigError(f"--task must be cry (yes/no decisions), got {task!r}")
    return str(task)


# The two options `calibrate` and `finetune` (and its DAG's form) share, declared once.
CALIBRATION = Spec(
    "enum",
    "Calibration",
    "cry: the probability calibration fitted on held-out labels beside the decision threshold (platt is "
    "safe with few labels)",
    choices=CalibrationMethod,
    check=check_method,
)
TARGET_PRECISION = Spec(
    "float",
    "Target precision",
    "cry: the lowest threshold whose held-out precision reaches this",
    nullable=True,
    exclusive_minimum=0,
    maximum=1,
    check=check_target_precision,
    default_text="the threshold that maximises F1",
)


@dataclass(frozen=True)
class CalibrateOptions:
    """What `qwen-tasks calibrate` takes, one declaration per option (`options_spec`; its flags are
    generated from these): which run the rule is fitted on, and how."""

    task: str = option(
        Task.CRY.value,
        Spec("enum", "Task", "cry (the only task with yes/no decisions)", choices=(Task.CRY,),
             check=_check_task, dag=False),
    )  # fmt: skip
    model: str = option(
        "",
        Spec("str", "Base model", "Hub id or path", nullable=True, setting="model", dag=False),
    )
    revision: str = option(
        "",
        Spec("str", "Revision", "Pinned revision of the base model", nullable=True, dag=False,
             default_text="the default branch"),
    )  # fmt: skip
    version: str | None = option(
        None,
        Spec("str", "Version", "A fine-tuned version: refit on its held-out evaluation run", nullable=True,
             dag=False, default_text="none: the base model's run"),
    )  # fmt: skip
    run: int | None = option(
        None,
        Spec("int", "Run", "Fit on this cry run of the base model (one run per question)", nullable=True,
             minimum=1, dag=False, default_text="its latest"),
    )  # fmt: skip
    dataset: str | None = option(
        None,
        Spec("str", "Dataset", "Fit on (and apply to) this dataset's clips only", nullable=True, dag=False,
             default_text="every dataset"),
    )  # fmt: skip
    calibration: str = option(DEFAULT_METHOD.value, CALIBRATION)
    target_precision: float | None = option(None, TARGET_PRECISION)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> CalibrateOptions:
        """From CLI flags keyed by field name (missing or None: the default); errors name the flag."""
        return cls(**options_spec.from_mapping(cls, flags, flags=True))


def candidate_thresholds(scores: Sequence[float]) -> np.ndarray:
    """Every distinct decision "score >= t" the labels can tell apart: the lowest score (all yes) and the
    midpoints between consecutive distinct scores (a midpoint, not a score itself, so a new clip scoring
    like a held-out one falls on the same side)."""
    v = np.unique(np.asarray(scores, dtype=float))
    return np.concatenate([v[:1], (v[:-1] + v[1:]) / 2.0])


def _figures_at(scores: np.ndarray, gold_yes: np.ndarray, t: float) -> dict[str, float | None]:
    pred = scores >= t
    tp = int(np.sum(pred & gold_yes))
    fp = int(np.sum(pred & ~gold_yes))
    fn = int(np.sum(~pred & gold_yes))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float(np.mean(pred == gold_yes))}


def select_threshold(
    scores: Sequence[float], gold_yes: Sequence[bool], target_precision: float | None = None
) -> ThresholdChoice:
    """Max F1 over `candidate_thresholds` (ties: the threshold closest to 0.5); with `target_precision`,
    the lowest threshold whose precision reaches it — none reaching it keeps the max-F1 one, with a note."""
    s, g = np.asarray(scores, dtype=float), np.asarray(gold_yes, dtype=bool)
    rows = [(float(t), _figures_at(s, g, float(t))) for t in candidate_thresholds(s)]
    t_best, f_best = max(rows, key=lambda r: (r[1]["f1"], -abs(r[0] - 0.5)))
    best = ThresholdChoice(t_best, "max_f1", **f_best)  # type: ignore[arg-type]
    if target_precision is None:
        return best
    reaching = [(t, f) for t, f in rows if f["precision"] is not None and f["precision"] >= target_precision]
    if not reaching:
        return replace(
            best,
            note=f"no threshold reaches precision {target_precision:g} on these labels; kept the max-F1 one",
        )
    t, f = min(reaching, key=lambda r: r[0])
    return ThresholdChoice(t, f"precision>={target_precision:g}", **f)  # type: ignore[arg-type]


def fit_calibration(p_yes: Sequence[float], gold_yes: Sequence[bool], method: str) -> Calibration:
    """The probability map only (threshold 0.5 until `select_threshold` picks one)."""
    method = check_method(method)
    p = np.asarray(p_yes, dtype=float)
    y = np.asarray(gold_yes, dtype=int)
    if method == CalibrationMethod.PLATT:
        from sklearn.linear_model import LogisticRegression

        z = np.array([[logit(v)] for v in p])
        model = LogisticRegression(C=PLATT_C).fit(z, y)
        return Calibration(None, method, 0.5, a=float(model.coef_[0][0]), b=float(model.intercept_[0]))
    if method == CalibrationMethod.ISOTONIC:
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return Calibration(None, method, 0.5, x=tuple(model.X_thresholds_), y=tuple(model.y_thresholds_))
    return Calibration(None, method, 0.5)


@dataclass(frozen=True)
class Fitted:
    """A fitted rule (not stored yet) and its figures on the labels it was fitted on."""

    calibration: Calibration
    choice: ThresholdChoice
    n_labels: int
    n_yes: int
    heldout: dict[str, Any] = field(default_factory=dict)


def fit_rule(
    p_yes: Sequence[float],
    gold_yes: Sequence[bool],
    method: str = DEFAULT_METHOD,
    target_precision: float | None = None,
) -> Fitted:
    """Calibration, then threshold on the calibrated scores; both classes are needed."""
    check_target_precision(target_precision)
    n_yes = int(sum(bool(g) for g in gold_yes))
    n = len(gold_yes)
    if n_yes < MIN_PER_CLASS or n - n_yes < MIN_PER_CLASS:
        raise ConfigError(
            f"calibration needs held-out gold labels of both classes, got {n_yes} yes and {n - n_yes} no"
        )
    cal = fit_calibration(p_yes, gold_yes, method)
    calibrated = [cal.apply(p) for p in p_yes]
    choice = select_threshold(calibrated, gold_yes, target_precision)
    cal = replace(cal, threshold=choice.threshold)
    g = np.asarray(gold_yes, dtype=bool)
    raw = _figures_at(np.asarray(p_yes, dtype=float), g, 0.5)
    heldout = {
        "threshold": choice.threshold,
        "precision": choice.precision,
        "recall": choice.recall,
        "f1": choice.f1,
        "accuracy": choice.accuracy,
        "accuracy_at_0.5": raw["accuracy"],
        "f1_at_0.5": raw["f1"],
        "ece_raw": ece(bins_of(p_yes, gold_yes)),
        "ece_calibrated": ece(bins_of(calibrated, gold_yes)),
    }
    return Fitted(cal, choice, n, n_yes, heldout)


# --- reading held-out labels and storing the rule -------------------------------------------------------


def scored_gold(
    conn: Connection, run_id: int, dataset_id: int | None = None, exclude_train: bool = True
) -> tuple[list[float], list[bool]]:
    """(p_yes, gold is yes) of the run's `score` answers with a gold label (human label first, then the
    manifest's: view cry_gold), optionally of one dataset's clips, never of a clip any fine-tune trained on
    (`finetune_split` part 'train'): those scores say nothing about new audio."""
    a = cry_answer.c
    query = (
        sa.select(a.p_yes, cry_gold.c.gold_label)
        .join(cry_gold, cry_gold.c.audio_id == a.audio_id)
        .where(a.run_id == run_id, a.method == "score", a.p_yes.is_not(None))
        .where(cry_gold.c.gold_label.in_(("yes", "no")))
        .order_by(a.audio_id)
    )
    if dataset_id is not None:
        members = sa.select(dataset_audio.c.audio_id).where(dataset_audio.c.dataset_id == dataset_id)
        query = query.where(a.audio_id.in_(members))
    if exclude_train:
        trained = sa.select(finetune_split.c.audio_id).where(
            finetune_split.c.task == "cry", finetune_split.c.part == "train"
        )
        query = query.where(a.audio_id.not_in(trained))
    rows = conn.execute(query).all()
    return [float(r.p_yes) for r in rows], [r.gold_label == "yes" for r in rows]


def calibrate_run(
    engine: Engine,
    run_id: int,
    *,
    method: str = DEFAULT_METHOD,
    target_precision: float | None = None,
    model_version_id: int | None = None,
    dataset_id: int | None = None,
) -> tuple[Calibration, Fitted]:
    """Fit a rule on the held-out gold labels of run `run_id`'s score answers and store it for the run's
    model (the version `model_version_id`, else the run's base model + revision, for `dataset_id` or for
    every dataset) and prompt (label_run.prompt_template). Returns the stored rule (with its id) and
    the fit."""
    with transaction(engine) as conn:
        run = conn.execute(
            sa.select(
                label_run.c.model, label_run.c.revision, label_run.c.prompt_template, label_run.c.task
            ).where(label_run.c.id == run_id)
        ).one_or_none()
        if run is None or run.task != "cry":
            raise ConfigError(f"run {run_id} is not a cry run; nothing to calibrate")
        p, gold = scored_gold(conn, run_id, dataset_id)
        if not p:
            raise ConfigError(
                f"run {run_id} has no score answers with a held-out gold / reviewed label to calibrate on "
                "(label with --method score or both; review or ingest gold labels)"
            )
        fitted = fit_rule(p, gold, method, target_precision)
        stored = decision.store(
            conn,
            fitted.calibration,
            {
                "model_version_id": model_version_id,
                "model": run.model,
                "revision": run.revision,
                "prompt_template": run.prompt_template,
                "dataset_id": dataset_id,
                "objective": fitted.choice.objective,
                "target_precision": target_precision,
                "n_labels": fitted.n_labels,
                "n_yes": fitted.n_yes,
                "source_run_id": run_id,
                "heldout": fitted.heldout,
                "note": fitted.choice.note,
            },
        )
    return stored, fitted


# --- ECE, reliability, coverage -------------------------------------------------------------------------


def bins_of(p: Sequence[float], gold_yes: Sequence[bool]) -> list[dict[str, float]]:
    """The reliability bins of in-memory scores (the fitted labels only; runs are binned in SQL)."""
    out: dict[int, list] = {}
    for v, g in zip(p, gold_yes, strict=True):
        k = min(int(v * ECE_BINS), ECE_BINS - 1)
        out.setdefault(k, []).append((v, g))
    return [
        {
            "bin": k,
            "n": len(vs),
            "mean_p": sum(v for v, _ in vs) / len(vs),
            "frac_yes": sum(g for _, g in vs) / len(vs),
        }
        for k, vs in sorted(out.items())
    ]


def ece(bins: Sequence[dict[str, float]]) -> float | None:
    """Expected calibration error: the clip-weighted mean |mean p - share of gold yes| over the bins."""
    n = sum(b["n"] for b in bins)
    if not n:
        return None
    return sum(b["n"] * abs(b["mean_p"] - b["frac_yes"]) for b in bins) / n


def run_bins(conn: Connection, answers: Any) -> list[dict[str, float]]:
    """Reliability bins of `answers` (a subquery with method, p_yes, p_calibrated, gold_label): the
    `score` answers with a gold label, by the probability they were decided with (p_calibrated when
    calibrated, else p_yes), in 10 equal-width bins counted by the database."""
    a = answers.c
    p = sa.func.coalesce(a.p_calibrated, a.p_yes)
    k = (sa.func.least(sa.func.width_bucket(p, 0.0, 1.0, ECE_BINS), ECE_BINS) - 1).label("bin")
    rows = conn.execute(
        sa.select(
            k,
            sa.func.count().label("n"),
            sa.func.avg(p).label("mean_p"),
            sa.func.avg(sa.case((a.gold_label == "yes", 1.0), else_=0.0)).label("frac_yes"),
        )
        .where(a.method == "score", p.is_not(None), a.gold_label.in_(("yes", "no")))
        .group_by(k)
        .order_by(k)
    ).all()
    return [
        {"bin": int(r.bin), "n": int(r.n), "mean_p": float(r.mean_p), "frac_yes": float(r.frac_yes)}
        for r in rows
    ]


def any_calibrated(conn: Connection, answers: Any) -> bool:
    """Whether some answer of `answers` (a subquery with p_calibrated) was decided with a calibration."""
    a = answers.c
    return bool(conn.execute(sa.select(sa.exists().where(a.p_calibrated.is_not(None)))).scalar_one())


def _run_answers(run_id: int) -> Any:
    c = cry_answer.c
    return (
        sa.select(c.method, c.p_yes, c.p_calibrated, cry_gold.c.gold_label)
        .select_from(cry_answer.outerjoin(cry_gold, cry_gold.c.audio_id == c.audio_id))
        .where(c.run_id == run_id)
        .subquery("answers")
    )


def run_figures(
    conn: Connection, run_id: int, details: dict[str, dict[str, Any]], answers: Any = None
) -> list[tuple[str, Any, dict]]:
    """Extra figures of a cry run for run_metric: `score.ece` (bins in its details) and, per method,
    `<method>.coverage` = decided / clips with gold (from the accuracy figures' details). `answers`: the
    run's answers with their gold label as `run_bins` reads them (default: joined here)."""
    out: list[tuple[str, Any, dict]] = []
    answers = _run_answers(run_id) if answers is None else answers
    bins = run_bins(conn, answers)
    if bins:
        of = "p_calibrated" if any_calibrated(conn, answers) else "p_yes"
        out.append(("score.ece", ece(bins), {"bins": bins, "of": of}))
    for method in ("score", "generate"):
        decided = (details.get(f"{method}.accuracy") or {}).get("decided")
        total = (details.get(f"{method}.accuracy_strict") or {}).get("n")
        if decided is not None and total:
            out.append((f"{method}.coverage", decided / total, {"decided": decided, "total": total}))
    return out


def shown(name: str, value: float | None, details: dict[str, dict[str, Any]]) -> str:
    """A metric as printed: an accuracy with its coverage next to it, e.g.
    `1.000 (coverage 1/66 = 1.5 %)`; other figures to 4 significant digits."""
    if value is None:
        return "—"
    method, _, figure = name.partition(".")
    cov = details.get(f"{method}.coverage") if figure in ("accuracy", "accuracy_strict") else None
    if cov:
        share = cov["decided"] / cov["total"]
        return f"{value:.3f} (coverage {cov['decided']}/{cov['total']} = {share:.1%})".replace("%", " %")
    return f"{value:.4g}"


def draw_reliability(ax: Any, bins: Sequence[dict[str, float]], of: str) -> None:
    """The reliability diagram on a matplotlib axis: share of gold yes against mean probability per bin
    (marker size ~ clips), with the diagonal a calibrated model would follow."""
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", label="perfectly calibrated")
    xs = [b["mean_p"] for b in bins]
    ys = [b["frac_yes"] for b in bins]
    sizes = [20 + 200 * b["n"] / max(1, max(c["n"] for c in bins)) for b in bins]
    ax.plot(xs, ys, color="#d62728", linewidth=1)
    ax.scatter(xs, ys, s=sizes, color="#d62728", label=f"{of} (ECE {ece(bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend()
