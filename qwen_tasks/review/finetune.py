"""Fine-tune from reviewed labels: training rows, the stored split, training, held-out evaluation, gate.

The loop `qwen-tasks finetune` and the `qwen_audio_finetune` DAG run, one function per step:
1. `prepare`: the labelled audio of a task from the review views — a human label (Label Studio import)
   wins over the manifest's gold / reference (views cry_gold, asr_reference); nothing the model itself
   said is ever a training answer. Only clips of the train-split datasets in scope (`--dataset`, default
   all train datasets of the task) are used, and never a clip of any `test` dataset, whatever its gold.
   The train / held-out split is by audio content (sha256), stratified by label for cry, stored in
   `finetune_split` and kept, so held-out audio is never trained on by any version. Too few labelled
   clips per class, or a single class, is refused with one line.
2. `train_version`: LoRA on the training part only (`qwen_tasks.review.trainer`), with the labelling prompt of
   the run that will use it; the adapter is written atomically and registered (`model_version`).
3. `evaluate_version`: two real labelling runs (purpose 'evaluation') over the held-out audio — the base
   model, and base + adapter loaded from disk through the normal backend path — and their metrics; the
   same two runs over each test dataset's labelled clips (`model_version_test`), reported side by side.
4. `decide`: the gate (`registry.gate`, on the held-out split only) sets `candidate` or `rejected`;
   promotion is optional.
Only ids, names and counts go between steps (XCom in the DAG).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.config import Device
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets as ds
from qwen_tasks.labelling import jobs, registry
from qwen_tasks.labelling.allowed_models import check_allowed
from qwen_tasks.progress import ProgressLog
from qwen_tasks.quality.calibration import check_method, check_target_precision
from qwen_tasks.records import (
    MAX_QUESTION_CHARS,
    QUESTION_PATTERN,
    CalibrationMethod,
    LabelRequest,
    ModelVersionStatus,
    RunStatus,
    question_problem,
)
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import (
    asr_reference,
    audio,
    audio_file,
    cry_gold,
    cry_question,
    dataset_audio,
    finetune_split,
    model_version,
    model_version_test,
)

log = logging.getLogger(__name__)

TASKS = ("cry", "asr")
MAX_SECONDS = 30.0  # one encoder window: a longer clip has no per-window label to learn from


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `qwen-tasks finetune` takes; the DAG's Params are generated from these defaults."""

    task: str = "cry"
    base: str = ""  # hub id or path; "" = QWEN_TASKS_MODEL
    base_revision: str = ""
    name: str = ""  # "" = <task>-<UTC timestamp>
    epochs: int = 2
    lr: float = 3e-3
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("lm", "projector")
    batch_size: int = 8
    max_clips: int | None = None
    datasets: tuple[str, ...] = ()  # train scope; () = every train dataset labelled for the task
    test_datasets: tuple[str, ...] = ()  # () = every test dataset of the task with labelled clips
    min_clips: int = 20
    heldout_fraction: float = 0.33
    min_improvement: float = registry.DEFAULT_MIN_IMPROVEMENT
    promote: bool = False
    device: str = "auto"
    dtype: str | None = None
    question: str = LabelRequest(task="cry").question
    language: str = "en"
    eval_method: str = "both"  # cry: score only, or score + generate (shows whether answers got decisive)
    # cry: the decision rule fitted on the version's held-out evaluation run (quality.calibration)
    calibration: str = "platt"  # none, platt or isotonic
    target_precision: float | None = None  # None: the max-F1 threshold
    seed: int = 0
    out_dir: str = ""  # "" = $QWEN_TASKS_HOME/models/<name>

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be cry or asr, got {self.task!r}")
        if self.min_clips < 1:
            raise ConfigError(f"--min-clips must be >= 1, got {self.min_clips}")
        if self.max_clips is not None and self.max_clips < 2:
            raise ConfigError(f"--max-clips must be >= 2, got {self.max_clips}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")
        if self.min_improvement < 0:
            raise ConfigError(f"--min-improvement must be >= 0, got {self.min_improvement}")
        if self.eval_method not in ("score", "both"):
            raise ConfigError(f"--eval-method must be score or both, got {self.eval_method!r}")
        check_method(self.calibration)
        check_target_precision(self.target_precision)
        if self.name:
            registry.check_name(self.name)
        for flag, names in (("--dataset", self.datasets), ("--test-dataset", self.test_datasets)):
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad:
                raise ConfigError(f"{flag} takes dataset names, got {bad[0]!r}")
        problem = question_problem(self.question) if isinstance(self.question, str) else "is not a string"
        if problem:
            raise ConfigError(f"--question {problem}")
        check_allowed("--base", self.base or None)  # "" = QWEN_TASKS_MODEL, checked in resolved()
        self.train_config()  # validates the hyper-parameters

    def train_config(self) -> Any:
        from qwen_tasks.review.trainer import TrainConfig

        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            rank=self.rank,
            alpha=self.alpha,
            targets=tuple(self.targets),
            seed=self.seed,
        )

    def request(self) -> LabelRequest:
        """The labelling request the version is trained for (its prompt is the training prompt)."""
        try:
            return LabelRequest(task=self.task, language=self.language, question=self.question)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def eval_request(self) -> LabelRequest:
        """What the held-out runs ask; cry adds `generate`: the report then shows whether answers got
        decisive. Decoding is `label`'s default for the task (LabelOptions.max_new_tokens: None = the
        task's budget per window), so the gate measures what `label` will do with the version."""
        from qwen_tasks.labelling.options import LabelOptions

        methods = ("score", "generate") if self.task == "cry" and self.eval_method == "both" else ("score",)
        return replace(self.request(), methods=methods, max_new_tokens=LabelOptions().max_new_tokens)

    def resolved(self) -> FinetuneOptions:
        """Defaults filled in from the environment: base model and version name."""
        from qwen_tasks.config import get_settings

        base = self.base or get_settings().model
        check_allowed("--base", base)
        name = self.name or f"{self.task}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        return replace(self, base=base, name=name)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> FinetuneOptions:
        """From DAG params / JSON (unknown keys ignored; lists for tuples)."""
        known = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"fine-tune params: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        out["datasets"] = list(self.datasets)
        out["test_datasets"] = list(self.test_datasets)
        return out


def dag_param_specs(settings: Any = None) -> dict[str, dict[str, Any]]:
    """JSON-schema specs of the `qwen_audio_finetune` DAG's Params, from FinetuneOptions' own defaults
    (the UI form and the CLI cannot disagree). Read at DAG parse time: environment only. `auto_promote` is
    the option `promote`; optional values are nullable, and null means the CLI's default."""
    from qwen_tasks.config import get_settings
    from qwen_tasks.labelling.options import form_number_schema as _number  # a form that never clamps

    d = FinetuneOptions()
    base = (settings or get_settings()).model
    return {
        "task": {"default": d.task, "type": "string", "enum": list(TASKS), "title": "Task"},
        "base": {
            "default": base,
            "type": "string",
            "minLength": 1,
            "title": "Base model",
            "description": "Hub id or local path (default: QWEN_TASKS_MODEL).",
        },
        "name": {
            "default": None,
            "type": ["null", "string"],
            "pattern": f"^{registry.NAME_PATTERN}$",
            "title": "Version name",
            "description": "Empty: <task>-<DAG run id>.",
        },
        "question": {
            "default": None,
            "type": ["null", "string"],
            "maxLength": MAX_QUESTION_CHARS,
            "pattern": QUESTION_PATTERN,
            "title": "Cry question",
            "description": "The yes/no question the version is trained and evaluated with (cry). Empty: "
            f"{d.question!r}. At most {MAX_QUESTION_CHARS} characters, no control characters.",
        },
        "epochs": {
            "default": d.epochs,
            **_number("integer"),
            "minimum": 1,
            "maximum": 100,
            "title": "Epochs",
        },
        "lr": {"default": d.lr, **_number("number"), "exclusiveMinimum": 0, "maximum": 1, "title": "LR"},
        "rank": {"default": d.rank, **_number("integer"), "minimum": 1, "maximum": 256, "title": "LoRA rank"},
        "max_clips": {"default": None, **_number("integer", True), "minimum": 2, "title": "Max clips"},
        "datasets": {
            "default": list(d.datasets),
            "type": "array",
            "items": {"type": "string", "pattern": f"^{registry.NAME_PATTERN}$"},
            "title": "Train datasets",
            "description": "Train on these train-split datasets only. Empty: every train dataset "
            "of the task.",
        },
        "test_datasets": {
            "default": list(d.test_datasets),
            "type": "array",
            "items": {"type": "string", "pattern": f"^{registry.NAME_PATTERN}$"},
            "title": "Test datasets",
            "description": "Also evaluate on these test datasets (never trained on). Empty: every test "
            "dataset of the task with labelled clips.",
        },
        "min_improvement": {
            "default": d.min_improvement,
            **_number("number"),
            "minimum": 0,
            "maximum": 1,
            "title": "Min improvement",
            "description": "Gate: the candidate must beat the base on held-out audio by this margin.",
        },
        "calibration": {
            "default": d.calibration,
            "type": "string",
            "enum": [m.value for m in CalibrationMethod],
            "title": "Calibration",
            "description": "cry: the probability calibration fitted on the version's held-out run beside "
            "its decision threshold (none, platt or isotonic).",
        },
        "target_precision": {
            "default": d.target_precision,
            **_number("number", True),
            "exclusiveMinimum": 0,
            "maximum": 1,
            "title": "Target precision",
            "description": "cry: the lowest threshold whose held-out precision reaches this. Empty: the "
            "threshold that maximises F1.",
        },
        "auto_promote": {"default": False, "type": "boolean", "title": "Promote if it passes the gate"},
        "device": {"default": "auto", "type": "string", "enum": [d.value for d in Device], "title": "Device"},
    }


def options_from_params(params: dict[str, Any], run_name: str = "") -> FinetuneOptions:
    """FinetuneOptions from the DAG's params (validated again: the REST API can send anything)."""
    import re

    raw = {k: v for k, v in params.items() if k in dag_param_specs() and v is not None}
    if raw.get("question") == "":
        del raw["question"]  # an emptied form field: the default question
    raw["promote"] = bool(raw.pop("auto_promote", False))
    if not raw.get("name") and run_name:
        raw["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{raw.get('task', 'cry')}-{run_name}").strip("-")[
            :100
        ]
    return FinetuneOptions.from_mapping(raw)


@dataclass(frozen=True)
class Row:
    """One labelled audio: its answer (gold label or reference transcript) and where that comes from."""

    audio_id: int
    sha256: str
    duration_s: float
    answer: str
    source: str  # human | manifest

    @property
    def cls(self) -> str:
        """Stratification class: the label for cry; one class for ASR."""
        return self.answer if self.answer in ("yes", "no") else "all"


@dataclass
class Prepared:
    """What `prepare` found: counts per part and class, and why clips were left out."""

    task: str
    train: dict[str, int] = field(default_factory=dict)
    heldout: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)  # the train datasets in scope
    test_datasets: list[str] = field(default_factory=list)  # evaluated on beside the held-out split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- 1. data and split ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """The datasets a fine-tune uses: name -> id of the train datasets it trains on (their clips, minus any
    clip of a test dataset) and of the test datasets it is evaluated on beside the held-out split."""

    train: dict[str, int]
    test: dict[str, int]


def _labelled(task: str, language: str) -> Any:
    """SELECT audio_id of the audio with a training answer for `task` (gold label / reference)."""
    if task == "cry":
        return sa.select(cry_gold.c.audio_id)
    return sa.select(asr_reference.c.audio_id).where(
        asr_reference.c.reference_text.is_not(None),
        sa.or_(asr_reference.c.language.is_(None), asr_reference.c.language == language),
    )


def resolve_scope(engine: Engine, options: FinetuneOptions) -> Scope:
    """Check the dataset names (`--dataset`, `--test-dataset`) and fill in the defaults; one-line
    ConfigError for an unknown name, a name of the wrong split, or a dataset not labelled for the task."""
    task = options.task
    with engine.connect() as conn:
        known = {d.name: d for d in ds.all_datasets(conn)}
        checks = (("--dataset", options.datasets, "train"), ("--test-dataset", options.test_datasets, "test"))
        for flag, names, split in checks:
            for name in names:
                d = known.get(name)
                if d is not None and d.split != split:
                    why = (
                        "its clips are never trained on (evaluate on it with --test-dataset)"
                        if split == "train"
                        else "ingest it with --split test to evaluate on it (--dataset trains on it)"
                    )
                    raise ConfigError(f"{flag} {name!r} is a {d.split} dataset: {why}")
        train = ds.resolve(conn, options.datasets, task=task, split="train", what="--dataset")
        test = ds.resolve(conn, options.test_datasets, task=task, split="test", what="--test-dataset")
        labelled_sets = set(
            conn.execute(
                sa.select(dataset_audio.c.dataset_id)
                .where(dataset_audio.c.audio_id.in_(_labelled(task, options.language)))
                .distinct()
            ).scalars()
        )
    for d in test:
        if options.test_datasets and d.id not in labelled_sets:
            raise ConfigError(
                f"--test-dataset {d.name!r}: none of its clips has a "
                f"{'gold label' if task == 'cry' else 'reference transcript'}; nothing to evaluate on"
            )
    scope = Scope(
        {d.name: d.id for d in train},
        {d.name: d.id for d in test if options.test_datasets or d.id in labelled_sets},
    )
    if not scope.train:
        raise ConfigError(
            f"cannot fine-tune {task}: no train dataset is labelled for {task} (ingest audio with "
            f"--dataset NAME --tasks {task})"
        )
    return scope


def _in_datasets(ids: Sequence[int]) -> Any:
    """The audio (audio.c.id) belongs to one of the dataset ids."""
    return audio.c.id.in_(ds.members(ids))


def labelled_rows(
    engine: Engine, options: FinetuneOptions, scope: Scope | None = None
) -> tuple[list[Row], dict[str, int]]:
    """Labelled audio of the task (human first, then manifests) in the train scope's datasets and in no
    test dataset, with a readable path, <= 30 s. Skipped counts say why the other labelled clips are out."""
    scope = scope or resolve_scope(engine, options)
    if options.task == "cry":
        query = sa.select(
            cry_gold.c.audio_id,
            cry_gold.c.gold_label.label("answer"),
            cry_gold.c.source,
            audio.c.sha256,
            audio.c.duration_s,
        ).join(audio, audio.c.id == cry_gold.c.audio_id)
    else:
        query = (
            sa.select(
                asr_reference.c.audio_id,
                asr_reference.c.reference_text.label("answer"),
                asr_reference.c.source,
                audio.c.sha256,
                audio.c.duration_s,
            )
            .join(audio, audio.c.id == asr_reference.c.audio_id)
            .where(
                asr_reference.c.reference_text.is_not(None),
                sa.or_(asr_reference.c.language.is_(None), asr_reference.c.language == options.language),
            )
        )
    readable = sa.exists().where(audio_file.c.audio_id == audio.c.id, audio_file.c.status == "ok")
    query = query.add_columns(
        readable.label("readable"),
        audio.c.id.in_(ds.in_test_dataset()).label("in_test"),
        _in_datasets(list(scope.train.values())).label("in_scope"),
    )
    skipped = {"in_test_dataset": 0, "outside_datasets": 0, "over_30s": 0, "no_readable_file": 0}
    rows: list[Row] = []
    with engine.connect() as conn:
        for r in conn.execute(query.order_by(audio.c.id)):
            if r.in_test:  # a test clip is never trained on, whatever its gold and other datasets
                skipped["in_test_dataset"] += 1
            elif not r.in_scope:
                skipped["outside_datasets"] += 1
            elif not r.readable:
                skipped["no_readable_file"] += 1
            elif float(r.duration_s) > MAX_SECONDS:
                skipped["over_30s"] += 1
            else:
                answer = r.answer.strip() if options.task == "asr" else r.answer
                rows.append(Row(int(r.audio_id), r.sha256, float(r.duration_s), answer, r.source))
    return rows, skipped


def split_key(task: str, sha256: str) -> str:
    """Order within a class: a hash of the content, so the split depends on the audio, not on ids."""
    return hashlib.sha256(f"{task}:{sha256}".encode()).hexdigest()


def assign_split(engine: Engine, task: str, rows: Sequence[Row], fraction: float) -> dict[int, str]:
    """audio_id -> 'train' | 'heldout' for `rows`: stored assignments are kept, new audio is assigned so
    each class keeps about `fraction` held out (lowest split keys first). Serialised per task. A clip of a
    test dataset is never assigned (checked again here, under the lock) and is left out of the result:
    its stored 'train' row, if it joined a test set later, is ignored."""
    with transaction(engine) as conn:
        conn.execute(
            sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(f"qwen_tasks.split:{task}", 0)))
        )
        if rows:
            in_test = set(
                conn.execute(
                    sa.select(dataset_audio.c.audio_id).where(
                        dataset_audio.c.audio_id.in_([r.audio_id for r in rows]),
                        dataset_audio.c.audio_id.in_(ds.in_test_dataset()),
                    )
                ).scalars()
            )
            rows = [r for r in rows if r.audio_id not in in_test]
        query = sa.select(finetune_split.c.audio_id, finetune_split.c.part).where(
            finetune_split.c.task == task
        )
        stored = {int(a): str(p) for a, p in conn.execute(query).all()}
        by_class: dict[str, list[Row]] = {}
        for row in rows:
            by_class.setdefault(row.cls, []).append(row)
        new: list[dict[str, Any]] = []
        for members in by_class.values():
            held = sum(1 for m in members if stored.get(m.audio_id) == "heldout")
            need = max(0, round(fraction * len(members)) - held)
            fresh = sorted(
                (m for m in members if m.audio_id not in stored), key=lambda m: split_key(task, m.sha256)
            )
            for k, m in enumerate(fresh):
                new.append({"task": task, "audio_id": m.audio_id, "part": "heldout" if k < need else "train"})
        if new:
            conn.execute(pg_insert_ignore(finetune_split), new)
        stored.update({n["audio_id"]: n["part"] for n in new})
    return {row.audio_id: stored[row.audio_id] for row in rows}


def pg_insert_ignore(table: sa.Table) -> Any:
    from sqlalchemy.dialects.postgresql import insert

    return insert(table).on_conflict_do_nothing()


def _counts(rows: Sequence[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.cls] = out.get(r.cls, 0) + 1
    return dict(sorted(out.items()))


def prepare(engine: Engine, options: FinetuneOptions) -> tuple[Prepared, list[Row], list[Row]]:
    """Labelled rows split into (train, held-out), after the checks that make training meaningful."""
    scope = resolve_scope(engine, options)
    rows, skipped = labelled_rows(engine, options, scope)
    counts = _counts(rows)
    what = "labelled clips" if options.task == "cry" else "clips with a reference transcript"
    if options.task == "cry":
        if len(counts) < 2:
            only = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
            raise ConfigError(
                f"cannot fine-tune cry: only one class among the {what} ({only}); a detector needs both yes "
                "and no examples (review more audio or add a manifest with gold labels)"
            )
        short = {k: v for k, v in counts.items() if v < options.min_clips}
        if short:
            have = ", ".join(f"{k} {v}" for k, v in counts.items())
            raise ConfigError(
                f"cannot fine-tune cry: too few {what} ({have}); need at least {options.min_clips} per class "
                "(--min-clips)"
            )
    elif len(rows) < options.min_clips:
        raise ConfigError(
            f"cannot fine-tune asr: {len(rows)} {what} in language {options.language!r}; need at least "
            f"{options.min_clips} (--min-clips)"
        )
    parts = assign_split(engine, options.task, rows, options.heldout_fraction)
    joined_test = [r for r in rows if r.audio_id not in parts]  # joined a test set since labelled_rows
    if joined_test:
        skipped["in_test_dataset"] += len(joined_test)
        rows = [r for r in rows if r.audio_id in parts]
    train = [r for r in rows if parts[r.audio_id] == "train"]
    heldout = [r for r in rows if parts[r.audio_id] == "heldout"]
    if options.max_clips is not None and len(train) > options.max_clips:
        train = _stratified_head(train, options.max_clips, options.task)
        skipped["over_max_clips"] = len([r for r in rows if parts[r.audio_id] == "train"]) - len(train)
    if not train or not heldout or len(_counts(heldout)) < len(counts):
        raise ConfigError(
            f"cannot fine-tune {options.task}: the split left {len(train)} training and {len(heldout)} "
            "held-out clips; every class needs both (label more audio or change --heldout-fraction)"
        )
    sources: dict[str, int] = {}
    for r in train:
        sources[r.source] = sources.get(r.source, 0) + 1
    prepared = Prepared(
        options.task,
        _counts(train),
        _counts(heldout),
        skipped,
        dict(sorted(sources.items())),
        list(scope.train),
        list(scope.test),
    )
    return prepared, train, heldout


def _stratified_head(rows: Sequence[Row], n: int, task: str) -> list[Row]:
    """The first `n` rows by split key, taken round-robin over classes (keeps the label balance)."""
    by_class: dict[str, list[Row]] = {}
    for r in sorted(rows, key=lambda r: split_key(task, r.sha256)):
        by_class.setdefault(r.cls, []).append(r)
    out: list[Row] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def heldout_ids(engine: Engine, options: FinetuneOptions, scope: Scope | None = None) -> list[int]:
    """Held-out audio of the task in the train scope that currently has a label (what the held-out
    evaluation runs label): the stored split's 'heldout' side of `labelled_rows`."""
    rows, _ = labelled_rows(engine, options, scope)
    with engine.connect() as conn:
        held = set(
            conn.execute(
                sa.select(finetune_split.c.audio_id).where(
                    finetune_split.c.task == options.task, finetune_split.c.part == "heldout"
                )
            ).scalars()
        )
    return sorted(r.audio_id for r in rows if r.audio_id in held)


def evaluation_set_ids(engine: Engine, options: FinetuneOptions, dataset_id: int) -> list[int]:
    """The clips of a (test) dataset with a gold label / reference for the task and a readable path: what
    its evaluation runs label."""
    readable = sa.exists().where(
        audio_file.c.audio_id == dataset_audio.c.audio_id, audio_file.c.status == "ok"
    )
    with engine.connect() as conn:
        return sorted(
            int(a)
            for a in conn.execute(
                sa.select(dataset_audio.c.audio_id).where(
                    dataset_audio.c.dataset_id == dataset_id,
                    dataset_audio.c.audio_id.in_(_labelled(options.task, options.language)),
                    readable,
                )
            ).scalars()
        )


def data_digest(options: FinetuneOptions, train: Sequence[Row], prompt_version: str) -> str:
    """sha256 over what the adapter learned from: base, prompt version and (audio sha256, answer) pairs."""
    payload = json.dumps(
        {"base": options.base, "prompt": prompt_version, "rows": sorted((r.sha256, r.answer) for r in train)},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --- 2. train and register ------------------------------------------------------------------------------


@dataclass
class Trained:
    """A trained, registered version; `backend` holds the in-memory model (adapter applied, unmerged)."""

    name: str
    adapter_path: str
    adapter_sha256: str
    revision: str
    prepared: Prepared
    result: Any
    backend: Any = None


def _load_examples(engine: Engine, rows: Sequence[Row]) -> tuple[list[Any], int]:
    """Decode the training audio through the same checks as labelling (allowed root, size, mtime)."""
    from qwen_tasks.labelling.worker import AudioStorageUnavailable, load_clips
    from qwen_tasks.review.trainer import Example

    with engine.connect() as conn:
        items = jobs.audio_items(conn, [r.audio_id for r in rows])
    try:
        clips, failures = load_clips(items)
    except AudioStorageUnavailable as exc:
        raise ConfigError(f"cannot read the training audio: {exc}") from None
    for audio_id, why in list(failures.items())[:5]:
        log.warning("training audio %s left out: %s", audio_id, why)
    answers = {r.audio_id: r.answer for r in rows}
    return [Example(c.audio_id, c.waveform, answers[c.audio_id]) for c in clips], len(failures)


def _models_dir(options: FinetuneOptions) -> Path:
    from qwen_tasks.config import get_settings

    return (
        Path(options.out_dir).expanduser().resolve()
        if options.out_dir
        else get_settings().home / "models" / options.name
    )


def _clear_interrupted(engine: Engine, name: str) -> None:
    """A version row without an evaluation is what a killed fine-tune leaves; the same name starts over."""
    version = registry.get_version(engine, name)
    if version is None:
        return
    if version.metrics is not None or version.status is not ModelVersionStatus.CANDIDATE:
        raise ConfigError(f"model version {name!r} exists already; choose another --name")
    log.warning("model version %s was interrupted before its evaluation; training it again", name)
    with transaction(engine) as conn:
        conn.execute(model_version.delete().where(model_version.c.name == name))


def train_version(
    engine: Engine,
    options: FinetuneOptions,
    *,
    progress: Callable[[Any], None] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
    keep_backend: bool = False,
) -> Trained:
    """Prepare the data, train a LoRA adapter on the training part, save it and register it (status
    `candidate`, no metrics yet). Nothing is registered until the adapter is on disk."""
    from qwen_tasks.labelling.backends import load_backend
    from qwen_tasks.labelling.backends.adapter import adapter_digest, adapter_revision
    from qwen_tasks.review.trainer import save_adapter, train

    options = options.resolved()
    _clear_interrupted(engine, options.name)
    prepared, train_rows, _ = prepare(engine, options)
    if on_prepared is not None:
        on_prepared(prepared)
    request = options.request()
    backend = load_backend(
        options.base, revision=options.base_revision, device=options.device, dtype=options.dtype
    )
    info = backend.loaded_model_info(request)
    examples, unreadable = _load_examples(engine, train_rows)
    if unreadable:
        prepared.skipped["unreadable"] = unreadable
    if not examples:
        raise ConfigError("none of the training audio could be read (see the warnings above)")
    peft_model, result = train(
        backend, backend.prompt_text(request), examples, options.train_config(), progress=progress
    )
    target = _models_dir(options)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_adapter(peft_model, staging)
        (staging / "QWEN_TASKS_VERSION.json").write_text(
            json.dumps({"name": options.name, "task": options.task, "base": options.base}, indent=2) + "\n"
        )
        if target.exists():
            shutil.rmtree(target)  # a killed earlier attempt of this name (no registry row points at it)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sha = adapter_digest(target)
    revision = adapter_revision(options.base_revision, sha)
    digest = data_digest(options, train_rows, info.prompt_version)
    with transaction(engine) as conn:
        registry.register(
            conn,
            {
                "name": options.name,
                "task": options.task,
                "base_model": info.model,
                "base_revision": options.base_revision,
                "adapter_path": str(target),
                "adapter_sha256": sha,
                "revision": revision,
                "prompt_version": info.prompt_version,
                "request": {**asdict(request), "methods": list(request.methods)},
                "data_digest": digest,
                "counts": {
                    "train": prepared.train,
                    "heldout": prepared.heldout,
                    "skipped": prepared.skipped,
                    "sources": prepared.sources,
                    "examples": len(examples),
                    "datasets": prepared.datasets,
                },
                "hyperparams": {
                    **options.train_config().to_dict(),
                    "max_clips": options.max_clips,
                    "heldout_fraction": options.heldout_fraction,
                    "min_clips": options.min_clips,
                    "datasets": list(options.datasets),
                    "test_datasets": list(options.test_datasets),
                    "device": info.device,
                    "dtype": info.dtype,
                },
                "loss_curve": {"step": result.losses, "epoch": result.epoch_losses},
                "train_seconds": result.seconds,
                "status": ModelVersionStatus.CANDIDATE,
            },
        )
    trained = Trained(options.name, str(target), sha, revision, prepared, result)
    if keep_backend:
        trained.backend = backend
    else:
        del backend, peft_model
        _free_memory()
    return trained


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


# --- 3. evaluate and 4. decide ------------------------------------------------------------------------------


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
    plan = jobs.plan_run(
        engine,
        task=version.task,
        model_info=info,
        request=request,
        batch_size=opts.batch_size * 2,
        max_batch_seconds=240.0,
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
    _free_memory()
    metrics = {role: compute_run_metrics(engine, run_id) for role, run_id in runs.items()}
    return runs, {role: {k: m.get(k) for k in KEEP_METRICS if k in m} for role, m in metrics.items()}


def evaluate_version(engine: Engine, name: str, options: FinetuneOptions) -> dict[str, Any]:
    """Label the held-out audio with the base model and with the version (two real runs), compute and
    store their metrics and the gate decision on the version; then the same two runs on each test dataset
    (`model_version_test`, metrics["test"][name]), reported beside the held-out figures. The gate decides
    on the held-out split only: a test set is a fixed yardstick, not a second gate. Returns run ids,
    metrics and the gate."""
    version = registry.require_version(engine, name)
    opts = replace(
        options,
        task=version.task,
        question=version.request.get("question", options.question),
        language=version.request.get("language", options.language),
    )
    scope = resolve_scope(engine, opts)
    ids = heldout_ids(engine, opts, scope)
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
    from qwen_tasks.labelling.options import DEFAULT_QUESTION

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


@dataclass
class FinetuneSummary:
    """`qwen-tasks finetune --json`."""

    name: str
    task: str
    status: str
    adapter_path: str
    revision: str
    train: dict[str, int]
    heldout: dict[str, int]
    skipped: dict[str, int]
    train_seconds: float
    steps: int
    final_loss: float | None
    base_run_id: int | None = None
    candidate_run_id: int | None = None
    base: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    # test dataset name -> {"dataset_id", "base_run_id", "candidate_run_id", "base": {..}, "candidate": {..}}
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    # cry: the stored decision rule {"id", "method", "threshold", "objective", "note", "heldout": {...}}
    calibration: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)  # the train datasets in scope
    promoted: bool = False
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_finetune(
    engine: Engine,
    options: FinetuneOptions,
    *,
    progress: Callable[[Any], None] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> FinetuneSummary:
    """The whole loop: prepare, train, register, evaluate base and candidate, gate, promote if asked."""
    started = time.perf_counter()
    options = options.resolved()
    trained = train_version(engine, options, progress=progress, on_prepared=on_prepared)
    if on_step is not None:
        tests = "".join(f", then on test dataset {n}" for n in trained.prepared.test_datasets)
        on_step(
            f"adapter saved to {trained.adapter_path}; evaluating base and candidate on held-out audio{tests}"
        )
    evaluation = evaluate_version(engine, trained.name, options)
    promoted = False
    if options.promote and evaluation["gate"]["passed"]:
        registry.promote(engine, trained.name)
        promoted = True
    version = registry.require_version(engine, trained.name)
    return FinetuneSummary(
        name=trained.name,
        task=options.task,
        status=str(version.status),
        adapter_path=trained.adapter_path,
        revision=trained.revision,
        train=trained.prepared.train,
        heldout=trained.prepared.heldout,
        skipped=trained.prepared.skipped,
        train_seconds=trained.result.seconds,
        steps=trained.result.steps,
        final_loss=trained.result.epoch_losses[-1] if trained.result.epoch_losses else None,
        base_run_id=evaluation["base_run_id"],
        candidate_run_id=evaluation["candidate_run_id"],
        base=evaluation["base"],
        candidate=evaluation["candidate"],
        gate=evaluation["gate"],
        test=evaluation["test"],
        calibration=evaluation["calibration"],
        datasets=trained.prepared.datasets,
        promoted=promoted,
        wall_seconds=time.perf_counter() - started,
    )
