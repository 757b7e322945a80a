"""The model version registry (table `model_version`): fine-tuned versions, the promotion gate, lookup.

Owns the rules for which version labels production audio: a version is registered right after
training (listed as `evaluating` until its held-out evaluation is stored), then is a `candidate` (it
beat the base on the held-out split by the margin) or `rejected` (it did not); `promote` makes it the one the
nightly DAG uses for its task (the previous promoted version is retired in the same transaction), and
is refused for a version that does not pass the gate unless forced — the force is recorded. Names are
what users type (`label --model NAME`); `find_model_version` finds the version a name stands for, and
`model_for` makes the one `ModelChoice` a `label` / a planned run is labelled with. The gate looks
at the held-out split only; a version's evaluations on test datasets (`model_version_test`) are reported
beside it (`list_versions`, view `model_version_evaluation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.records import ModelVersionStatus
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import model_version, model_version_evaluation

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # also a CHECK in 0004_model_version.sql
DEFAULT_MIN_IMPROVEMENT = 0.01


# What the gate compares per task: (metric name in run_metric, True when higher is better).
GATE_METRICS: dict[str, tuple[tuple[str, bool], ...]] = {
    "cry": (("score.roc_auc", True), ("score.f1", True)),
    "asr": (("error_rate", False),),
}
# F1 is stored as undefined when a run never says yes (precision 0/0); with gold labels present that is
# an F1 of 0 for the gate (sklearn's zero_division=0), not a reason to skip the comparison.
ZERO_WHEN_UNDEFINED = ("score.f1",)


def _gate_value(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if value is None and name in ZERO_WHEN_UNDEFINED and metrics.get("n_gold"):
        return 0.0
    return value


@dataclass(frozen=True)
class ModelVersion:
    """A row of model_version, as the rest of the code needs it."""

    id: int
    name: str
    task: str
    status: ModelVersionStatus
    base_model: str
    base_revision: str
    adapter_path: str
    adapter_sha256: str
    revision: str
    prompt_version: str
    request: dict[str, Any]
    metrics: dict[str, Any] | None
    base_run_id: int | None
    candidate_run_id: int | None
    forced: bool

    @classmethod
    def from_row(cls, row: Any) -> ModelVersion:
        return cls(
            id=row.id,
            name=row.name,
            task=row.task,
            status=ModelVersionStatus(row.status),
            base_model=row.base_model,
            base_revision=row.base_revision,
            adapter_path=row.adapter_path,
            adapter_sha256=row.adapter_sha256,
            revision=row.revision,
            prompt_version=row.prompt_version,
            request=dict(row.request or {}),
            metrics=row.metrics,
            base_run_id=row.base_run_id,
            candidate_run_id=row.candidate_run_id,
            forced=row.forced,
        )


@dataclass(frozen=True)
class GateResult:
    """Whether the candidate beats the base on every gate metric by `margin`; one reason per metric."""

    passed: bool
    margin: float
    reasons: list[str] = field(default_factory=list)
    compared: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "margin": self.margin,
            "reasons": self.reasons,
            "compared": self.compared,
        }


def check_name(name: str) -> str:
    import re

    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(
            f"model version name {name!r} must be 1-100 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )
    return name


def gate(task: str, base: dict[str, Any], candidate: dict[str, Any], margin: float) -> GateResult:
    """Compare held-out metrics (name -> value) of base and candidate for `task`."""
    reasons: list[str] = []
    compared: dict[str, dict[str, float | None]] = {}
    passed = True
    for name, higher_better in GATE_METRICS[task]:
        b, c = _gate_value(base, name), _gate_value(candidate, name)
        compared[name] = {"base": b, "candidate": c}
        if c is None:
            passed = False
            reasons.append(
                f"{name}: undefined for the candidate (no gold / reference on the held-out split?)"
            )
            continue
        if b is None:  # the base could not be scored: the candidate has nothing to beat
            reasons.append(f"{name}: base undefined, candidate {c:.4f}")
            continue
        gain = (c - b) if higher_better else (b - c)
        ok = gain >= margin
        passed = passed and ok
        better = "higher" if higher_better else "lower"
        reasons.append(
            f"{name}: base {b:.4f} -> candidate {c:.4f} ({better} is better; gain {gain:+.4f}, "
            f"{'meets' if ok else 'below'} the margin {margin:.4f})"
        )
    return GateResult(passed=passed, margin=margin, reasons=reasons, compared=compared)


# --- reading -----------------------------------------------------------------------------------------------


def get_version(engine: Engine | Connection, name: str) -> ModelVersion | None:
    query = sa.select(model_version).where(model_version.c.name == name)
    if isinstance(engine, Connection):
        row = engine.execute(query).one_or_none()
    else:
        with engine.connect() as conn:
            row = conn.execute(query).one_or_none()
    return None if row is None else ModelVersion.from_row(row)


def require_version(engine: Engine | Connection, name: str) -> ModelVersion:
    version = get_version(engine, name)
    if version is None:
        raise ConfigError(f"no model version named {name!r} (see: qwen-tasks models)")
    return version


def promoted_version(engine: Engine, task: str) -> ModelVersion | None:
    """The version the nightly run uses for `task`, if any was promoted."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(model_version).where(
                model_version.c.task == task, model_version.c.status == ModelVersionStatus.PROMOTED
            )
        ).one_or_none()
    return None if row is None else ModelVersion.from_row(row)


EVALUATION_FIGURES = ("roc_auc", "f1", "accuracy", "error_rate")


def evaluations(
    engine: Engine | Connection, names: list[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Version name -> its evaluations from the view `model_version_evaluation`: the held-out split
    first, then each test dataset by name; each {"evaluated_on", "dataset_id", run ids, "n_gold",
    "n_reference", "base": {roc_auc, f1, accuracy, error_rate}, "candidate": {...}}."""
    v = model_version_evaluation.c
    query = sa.select(model_version_evaluation).order_by(
        v.name, sa.case((v.dataset_id.is_(None), 0), else_=1), v.evaluated_on
    )
    if names is not None:
        query = query.where(v.name.in_(names))
    if isinstance(engine, Connection):
        rows = engine.execute(query).all()
    else:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        m = r._mapping
        out.setdefault(r.name, []).append(
            {
                "evaluated_on": r.evaluated_on,
                "dataset_id": r.dataset_id,
                "base_run_id": r.base_run_id,
                "candidate_run_id": r.candidate_run_id,
                "n_gold": None if r.n_gold is None else int(r.n_gold),
                "n_reference": None if r.n_reference is None else int(r.n_reference),
                "base": {k: m[f"base_{k}"] for k in EVALUATION_FIGURES},
                "candidate": {k: m[f"candidate_{k}"] for k in EVALUATION_FIGURES},
            }
        )
    return out


# Shown, never stored: a version row is inserted as `candidate` right after training, with no metrics
# until its held-out evaluation is stored (or for good, when the fine-tune was interrupted in between).
# Listing it as a candidate would claim it beat the base before that was measured.
EVALUATING = "evaluating"


def shown_status(status: str, metrics: dict[str, Any] | None) -> str:
    """The status `qwen-tasks models` shows: `evaluating` for a candidate with no evaluation stored yet."""
    return EVALUATING if status == ModelVersionStatus.CANDIDATE and metrics is None else status


def list_versions(engine: Engine, task: str | None = None) -> list[dict[str, Any]]:
    """Every version, newest first, with its held-out comparison and its evaluations (held-out and each
    test dataset, from `model_version_evaluation`) for `qwen-tasks models`; `status` is `shown_status`
    (the row's own is `stored_status`)."""
    query = sa.select(model_version).order_by(model_version.c.id.desc())
    if task is not None:
        query = query.where(model_version.c.task == task)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        evaluated = evaluations(conn, [r.name for r in rows])
    out = []
    for r in rows:
        gate_info = (r.metrics or {}).get("gate") or {}
        out.append(
            {
                "name": r.name,
                "task": r.task,
                "status": shown_status(r.status, r.metrics),
                "stored_status": r.status,
                "base_model": r.base_model,
                "revision": r.revision,
                "adapter_path": r.adapter_path,
                "created_at": r.created_at,
                "base_run_id": r.base_run_id,
                "candidate_run_id": r.candidate_run_id,
                "heldout": (r.counts or {}).get("heldout"),
                "train": (r.counts or {}).get("train"),
                "base": (r.metrics or {}).get("base"),
                "candidate": (r.metrics or {}).get("candidate"),
                "gate_passed": gate_info.get("passed"),
                "forced": r.forced,
                "status_reason": r.status_reason,
                "datasets": (r.counts or {}).get("datasets"),
                "test_datasets": [
                    e["evaluated_on"] for e in evaluated.get(r.name, []) if e["dataset_id"] is not None
                ],
                "evaluations": evaluated.get(r.name, []),
            }
        )
    return out


@dataclass(frozen=True)
class ModelChoice:
    """What a run of one task is labelled with, resolved once (`model_for`) and read by everything after
    it: planning records it per run (`planning.Plan.run_choices`), the CLI's "run elsewhere" decision reads
    `python`, the worker loads with `backend`. A base model (+ revision; a local path made absolute), and
    the adapter and name of a fine-tuned version when there is one; `backend` is the backend kind
    (`backends.detect_backend`, None for a model that cannot be used: loading it says why) and `python`
    the interpreter that must load it (None: this one; `backends.required_python`), both filled in from
    the model when not given. `params` is what the run stores for its workers (jobs.RunInfo.load_args)."""

    model: str
    revision: str
    adapter: str | None = None
    version: str | None = None
    backend: str | None = None
    python: Path | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            from qwen_tasks.labelling.backends import backend_kind, required_python

            object.__setattr__(self, "backend", backend_kind(self.model))
            object.__setattr__(self, "python", required_python(self.model))

    @property
    def params(self) -> dict[str, Any]:
        if not self.adapter:
            return {}
        return {"adapter": self.adapter, "base_revision": self.revision, "model_version": self.version}


def model_for(
    engine: Engine,
    task: str,
    model: str,
    revision: str = "",
    adapter: str | None = None,
    promoted: bool = True,
) -> ModelChoice:
    """The one rule for which model labels `task`: a registered version name (its base + adapter), else
    the model (a local path made absolute) with `adapter`, else — with `promoted` — the task's promoted
    version when it was trained on this very base model and revision, else the base model alone."""
    from qwen_tasks.labelling.allowed_models import check_allowed
    from qwen_tasks.labelling.backends.adapter import adapter_dir
    from qwen_tasks.labelling.options import absolute_model_path

    version = find_model_version(engine, model)
    if version is not None:
        if version.task != task:
            raise ConfigError(f"model version {model!r} was fine-tuned for {version.task}, not {task}")
        if adapter:
            raise ConfigError(f"{model} is a fine-tuned version: it brings its own adapter")
        # a version is its base plus its adapter: both are loaded, so both must be allowed
        check_allowed(f"model {model!r} is a fine-tuned version whose base", version.base_model)
        check_allowed(f"model {model!r} is a fine-tuned version whose adapter", version.adapter_path)
        return ModelChoice(version.base_model, version.base_revision, version.adapter_path, version.name)
    check_allowed("model", model)  # before absolute_model_path: a hub id stays itself, a path is resolved
    base = absolute_model_path(model)
    if adapter:
        check_allowed("adapter", adapter)
        return ModelChoice(base, revision, str(adapter_dir(adapter)))
    if promoted:
        current = promoted_version(engine, task)
        if current is not None and (current.base_model, current.base_revision) == (base, revision):
            why = (
                f"the promoted version {current.name!r} (skip it: promoted=false, --no-promoted): its adapter"
            )
            check_allowed(why, current.adapter_path)
            return ModelChoice(base, revision, current.adapter_path, current.name)
    return ModelChoice(base, revision)


def find_model_version(engine: Engine, model: str) -> ModelVersion | None:
    """The registered version called `model`, or None when `model` is a hub id / path (a name never
    contains '/'). Retired and rejected versions can still be labelled with on purpose."""
    if "/" in model or not model:
        return None
    return get_version(engine, model)


# --- writing -----------------------------------------------------------------------------------------------


def register(conn: Connection, values: dict[str, Any]) -> int:
    """Insert a version row (status from `values`); returns its id. A name in use is a ConfigError."""
    check_name(values["name"])
    if conn.execute(sa.select(model_version.c.id).where(model_version.c.name == values["name"])).first():
        raise ConfigError(f"model version {values['name']!r} exists already; choose another --name")
    return int(
        conn.execute(model_version.insert().values(**values).returning(model_version.c.id)).scalar_one()
    )


def set_status(
    engine: Engine, name: str, status: ModelVersionStatus, *, reason: str | None = None, forced: bool = False
) -> ModelVersion:
    """Move a version to `status` (promotion retires the task's previous promoted version)."""
    with transaction(engine) as conn:
        version = require_version(conn, name)
        values: dict[str, Any] = {"status": status, "status_reason": reason}
        if status is ModelVersionStatus.PROMOTED:
            conn.execute(
                model_version.update()
                .where(
                    model_version.c.task == version.task,
                    model_version.c.status == ModelVersionStatus.PROMOTED,
                    model_version.c.name != name,
                )
                .values(
                    status=ModelVersionStatus.RETIRED,
                    retired_at=sa.func.now(),
                    status_reason=f"replaced by {name}",
                )
            )
            values.update(promoted_at=sa.func.now(), forced=forced)
        if status is ModelVersionStatus.RETIRED:
            values["retired_at"] = sa.func.now()
        conn.execute(model_version.update().where(model_version.c.name == name).values(**values))
    return require_version(engine, name)


def promote(engine: Engine, name: str, *, force: bool = False) -> ModelVersion:
    """Make `name` the version the nightly run uses for its task; refused unless its evaluation passed the
    gate (stored with the version), or `force` (recorded on the row)."""
    version = require_version(engine, name)
    if version.status is ModelVersionStatus.PROMOTED:
        return version
    gate_info = (version.metrics or {}).get("gate")
    if gate_info is None and not force:
        raise ConfigError(
            f"{name} has no held-out evaluation yet (was its fine-tune interrupted?); use --force"
        )
    if gate_info is not None and not gate_info.get("passed") and not force:
        why = "; ".join(gate_info.get("reasons") or [])
        raise ConfigError(f"promotion of {name} refused: it does not beat the base on held-out audio ({why})")
    passed = bool(gate_info and gate_info.get("passed"))
    reason = "gate passed" if passed else "forced with --force despite the gate"
    return set_status(engine, name, ModelVersionStatus.PROMOTED, reason=reason, forced=force and not passed)


def retire(engine: Engine, name: str) -> ModelVersion:
    """Stop using `name` (the nightly run falls back to the base model, or another promoted version)."""
    require_version(engine, name)
    return set_status(engine, name, ModelVersionStatus.RETIRED, reason="retired by hand")
