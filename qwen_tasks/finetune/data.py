"""The data of a fine-tune: which labelled clips are in scope, the stored train / held-out split, and the
training examples.

`prepare` is the first step of the loop and runs once per fine-tune: the labelled audio of a task from the
review views — a human label (Label Studio import) wins over the manifest's gold / reference (views
cry_gold, asr_reference); nothing the model itself said is ever a training answer. Only clips of the
train-split datasets in scope (`--dataset`, default all train datasets of the task) are used, and never a
clip of any `test` dataset, whatever its gold. The train / held-out split is by audio content (sha256),
stratified by label for cry, stored in `finetune_split` and kept, so held-out audio is never trained on by
any version. Too few labelled clips per class, or a single class, is refused with one line. Its result
(`TrainingData`: counts, scope, the training and held-out rows) is what training and evaluation use; they
do not look the data up again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.finetune.options import MAX_SECONDS, FinetuneOptions
from qwen_tasks.ingest import datasets as ds
from qwen_tasks.labelling import jobs
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import (
    asr_reference,
    audio,
    audio_file,
    cry_gold,
    dataset_audio,
    finetune_split,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Scope:
    """The datasets a fine-tune uses: name -> id of the train datasets it trains on (their clips, minus any
    clip of a test dataset) and of the test datasets it is evaluated on beside the held-out split."""

    train: dict[str, int]
    test: dict[str, int]


@dataclass(frozen=True)
class TrainingData:
    """What `prepare` computed, handed as it is to training and evaluation: the counts (`prepared`, what the
    CLI prints and the DAG's XCom carries), the dataset scope, and the rows on each side of the split."""

    prepared: Prepared
    scope: Scope
    train: tuple[Row, ...]
    heldout: tuple[Row, ...]

    @property
    def heldout_ids(self) -> list[int]:
        """The held-out audio ids: what the held-out evaluation runs label."""
        return sorted(r.audio_id for r in self.heldout)


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


def prepare(engine: Engine, options: FinetuneOptions) -> TrainingData:
    """Labelled rows split into (train, held-out), after the checks that make training meaningful; the
    split is stored. Training and evaluation take the result instead of preparing again."""
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
    return TrainingData(prepared, scope, tuple(train), tuple(heldout))


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


def load_examples(engine: Engine, rows: Sequence[Row]) -> tuple[list[Any], int]:
    """Decode the training audio through the same checks as labelling (allowed root, size, mtime)."""
    from qwen_tasks.finetune.trainer import Example
    from qwen_tasks.labelling.worker import AudioStorageUnavailable, load_clips

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
