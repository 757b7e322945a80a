"""Datasets: named sets of audio with a split and the tasks they are labelled for.

Why: a team's database holds several piles of audio (an ASR corpus, a cry set, a fixed test set). Every
later stage is scoped by them: `label` labels a task's datasets only, metrics are reported per dataset,
and a clip of any `test` dataset is never a fine-tuning row, so two versions can be compared on the same
untouched audio.

Ingest names the dataset of each source it is given (`--dataset NAME`, else the manifest's file stem or
the folder's name), checks the split before anything is written (a dataset has one split for life), and
records membership by content (`dataset_audio`) at the end of the run, for every ok file of the source:
re-ingesting is idempotent, and membership is never removed by an ingest (a clip that was ever in a test
set stays there). Tables: sql/migrations/0007_datasets.sql.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.records import AudioStatus, Task
from qwen_tasks.store.schema import (
    audio_file,
    dataset,
    dataset_audio,
    dataset_source,
    dataset_summary,
    manifest_item,
)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # the CHECK constraint of dataset.name
_NAME_RE = re.compile(NAME_PATTERN)
_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


class Split(StrEnum):
    """dataset.split: `test` sets are fixed evaluation sets, never trained on."""

    TRAIN = "train"
    TEST = "test"


class SourceKind(StrEnum):
    """dataset_source.kind: what ingest was given."""

    FOLDER = "folder"
    FILE = "file"
    MANIFEST = "manifest"


# A manifest's kind gives its dataset's task: reference transcripts label ASR, audio-QA lines the cry task.
TASK_OF_MANIFEST_KIND = {"asr": Task.ASR.value, "aqa": Task.CRY.value}


def check_name(name: str, what: str = "--dataset") -> str:
    """A dataset name as given by a user: letters, digits, `.`, `_`, `-`, at most 100 characters."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a valid dataset name (letters, digits, '.', '_', '-'; starting with a "
            "letter or digit; at most 100 characters)"
        )
    return name


def default_name(path: str | Path, kind: SourceKind) -> str:
    """The name a source gets without --dataset: a manifest's file stem, a folder's name, the folder of
    a single audio file; characters a name cannot hold become '-'."""
    p = Path(os.path.abspath(path))
    base = p.stem if kind == SourceKind.MANIFEST else (p.name if kind == SourceKind.FOLDER else p.parent.name)
    name = _INVALID.sub("-", base).lstrip("-._")[:100]
    return name or "dataset"


def check_tasks(tasks: Iterable[str], what: str = "--tasks") -> tuple[str, ...]:
    out = tuple(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    bad = [t for t in out if t not in set(Task)]
    if not out or bad:
        raise ConfigError(f"{what} must name tasks among {[t.value for t in Task]}, got {list(tasks)!r}")
    return out


def check_split(split: str, what: str = "--split") -> str:
    if split not in set(Split):
        raise ConfigError(f"{what} must be train or test, got {split!r}")
    return split


@dataclass
class Source:
    """One thing ingest was given, and the dataset it goes to."""

    kind: SourceKind
    location: str  # absolute path, as stored (audio_file.path / manifest_item.manifest_path)
    dataset: str
    tasks: tuple[str, ...]


@dataclass
class DatasetPlan:
    """The datasets one ingest run writes to: validated before any file is touched."""

    split: str | None  # None: keep an existing dataset's split, new ones are train
    sources: list[Source] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(s.dataset for s in self.sources))

    def tasks_of(self, name: str) -> tuple[str, ...]:
        tasks: dict[str, None] = {}
        for s in self.sources:
            if s.dataset == name:
                tasks.update(dict.fromkeys(s.tasks))
        return tuple(t for t in Task if t in tasks)


def plan_sources(
    folders: Sequence[str],
    files: Sequence[str],
    manifests: Sequence[tuple[str, str | None]],
    *,
    name: str | None,
    split: str | None,
    tasks: Sequence[str] | None,
    manifest_kinds: dict[str, set[str]],
) -> DatasetPlan:
    """Which dataset each source goes to, and with which tasks. `manifest_kinds`: manifest path -> the
    kinds of its valid lines (used when its kind was inferred per line). Explicit `tasks` apply to every
    source; otherwise a manifest gives its kind's task and a folder or file both tasks."""
    if name is not None:
        check_name(name)
    if split is not None:
        check_split(split)
    explicit = check_tasks(tasks) if tasks else None
    plan = DatasetPlan(split=split)
    for folder in folders:
        plan.sources.append(
            Source(SourceKind.FOLDER, folder, name or default_name(folder, SourceKind.FOLDER),
                   explicit or tuple(Task))
        )  # fmt: skip
    for file in files:
        plan.sources.append(
            Source(
                SourceKind.FILE, file, name or default_name(file, SourceKind.FILE), explicit or tuple(Task)
            )
        )
    for path, kind in manifests:
        kinds = {kind} if kind else manifest_kinds.get(path, set())
        task_set = explicit or tuple(t for t in Task if t in {TASK_OF_MANIFEST_KIND[k] for k in kinds})
        plan.sources.append(
            Source(SourceKind.MANIFEST, path, name or default_name(path, SourceKind.MANIFEST),
                   task_set or tuple(Task))
        )  # fmt: skip
    return plan


def check_splits(conn: Connection, plan: DatasetPlan) -> None:
    """Refuse, before anything is written, to move an existing dataset to another split: a test set
    that becomes train would hand its clips to the next fine-tune."""
    if plan.split is None or not plan.sources:
        return
    rows = conn.execute(
        sa.select(dataset.c.name, dataset.c.split).where(dataset.c.name.in_(plan.names))
    ).all()
    for row in rows:
        if row.split != plan.split:
            raise ConfigError(
                f"dataset {row.name!r} is a {row.split} dataset; it cannot become {plan.split} (a dataset "
                f"keeps its split: ingest into another --dataset name)"
            )


def record(conn: Connection, plan: DatasetPlan) -> list[dict[str, Any]]:
    """Create or update the datasets, their sources and their members (the ok files of each source, by
    content). Idempotent; returns per dataset: name, split, tasks, clips added by this run."""
    if not plan.sources:
        return []
    out: list[dict[str, Any]] = []
    for name in plan.names:
        stored = conn.execute(
            sa.select(dataset.c.tasks).where(dataset.c.name == name).with_for_update()
        ).scalar_one_or_none()
        union = set(stored or ()) | set(plan.tasks_of(name))  # a dataset's tasks only grow
        tasks = [t for t in Task if t in union]
        stmt = pg_insert(dataset).values(name=name, split=plan.split or Split.TRAIN.value, tasks=tasks)
        dataset_id, split, stored_tasks = conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["name"], set_={"tasks": stmt.excluded.tasks, "updated_at": sa.func.now()}
            ).returning(dataset.c.id, dataset.c.split, dataset.c.tasks)
        ).one()
        added = 0
        for source in (s for s in plan.sources if s.dataset == name):
            conn.execute(
                pg_insert(dataset_source)
                .values(dataset_id=dataset_id, kind=source.kind.value, location=source.location)
                .on_conflict_do_update(
                    index_elements=["dataset_id", "location"], set_={"last_ingested_at": sa.func.now()}
                )
            )
            added += _add_members(conn, dataset_id, source)
        out.append(
            {
                "name": name,
                "split": split,
                "tasks": sorted(stored_tasks, key=tuple(Task).index),
                "clips_added": added,
            }
        )
    return out


def _add_members(conn: Connection, dataset_id: int, source: Source) -> int:
    """INSERT ... SELECT the audio of a source's ok files not yet members; returns how many were added."""
    f = audio_file
    if source.kind == SourceKind.MANIFEST:
        files = (
            sa.select(f.c.audio_id)
            .join(manifest_item, manifest_item.c.audio_file_id == f.c.id)
            .where(manifest_item.c.manifest_path == source.location)
        )
    elif source.kind == SourceKind.FOLDER:
        prefix = source.location.rstrip("/") + "/"
        files = sa.select(f.c.audio_id).where(f.c.path.startswith(prefix, autoescape=True))
    else:
        files = sa.select(f.c.audio_id).where(f.c.path == source.location)
    files = files.where(f.c.status == AudioStatus.OK, f.c.audio_id.is_not(None)).distinct()
    new = files.where(
        ~sa.exists().where(dataset_audio.c.dataset_id == dataset_id, dataset_audio.c.audio_id == f.c.audio_id)
    ).subquery()
    stmt = (
        pg_insert(dataset_audio)
        .from_select(
            ["dataset_id", "audio_id"], sa.select(sa.literal(dataset_id, sa.BigInteger), new.c.audio_id)
        )
        .on_conflict_do_nothing()
        .returning(dataset_audio.c.audio_id)
    )
    return len(conn.execute(stmt).all())


# --- reading datasets (later stages) -------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    id: int
    name: str
    split: str
    tasks: tuple[str, ...]


def all_datasets(conn: Connection | Engine) -> list[Dataset]:
    query = sa.select(dataset.c.id, dataset.c.name, dataset.c.split, dataset.c.tasks).order_by(dataset.c.name)
    if isinstance(conn, Engine):
        with conn.connect() as c:
            rows = c.execute(query).all()
    else:
        rows = conn.execute(query).all()
    return [Dataset(int(r.id), r.name, r.split, tuple(r.tasks)) for r in rows]


def resolve(
    conn: Connection | Engine,
    names: Sequence[str],
    *,
    task: str | None = None,
    split: str | None = None,
    what: str = "--dataset",
) -> list[Dataset]:
    """The datasets `names` (every dataset when empty), filtered to those labelled for `task` and of
    `split` when given. An unknown name is a ConfigError naming it and the known ones; a named dataset
    that does not fit `task` / `split` is an error too (the user asked for it explicitly)."""
    known = {d.name: d for d in all_datasets(conn)}
    if not names:
        return [
            d
            for d in known.values()
            if (task is None or task in d.tasks) and (split is None or d.split == split)
        ]
    out = []
    for name in dict.fromkeys(names):
        d = known.get(name)
        if d is None:
            shown = ", ".join(sorted(known)) or "none yet: qwen-tasks ingest ... --dataset NAME"
            raise ConfigError(f"{what} {name!r}: no such dataset (known: {shown})")
        if task is not None and task not in d.tasks:
            raise ConfigError(f"{what} {name!r} is not labelled for {task} (its tasks: {', '.join(d.tasks)})")
        if split is not None and d.split != split:
            raise ConfigError(f"{what} {name!r} is a {d.split} dataset, not {split}")
        out.append(d)
    return out


def members(dataset_ids: Sequence[int]) -> sa.Select:
    """SELECT audio_id of the members of these datasets (a subquery for `audio.id IN (...)`)."""
    return sa.select(dataset_audio.c.audio_id).where(
        dataset_audio.c.dataset_id == sa.any_(sa.literal(list(dataset_ids), sa.ARRAY(sa.BigInteger)))
    )


def in_test_dataset() -> sa.Select:
    """SELECT audio_id of every clip of any test dataset: never a training row."""
    return (
        sa.select(dataset_audio.c.audio_id)
        .join(dataset, dataset.c.id == dataset_audio.c.dataset_id)
        .where(dataset.c.split == Split.TEST.value)
    )


def summary_rows(engine: Engine) -> list[dict[str, Any]]:
    """The dataset_summary view as JSON-able dicts (what `qwen-tasks datasets` prints), by name."""
    v = dataset_summary
    with engine.connect() as conn:
        rows = conn.execute(sa.select(v).order_by(v.c.name)).mappings().all()
    return [{**r, "tasks": list(r["tasks"]), "created_at": r["created_at"].isoformat()} for r in rows]
