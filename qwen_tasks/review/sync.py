"""Live review with a Label Studio server: `review push` sends clips to review, `review pull` brings the
reviewers' answers back (the DAG qwen_audio_review_sync runs both hourly).

Push, per dataset of the task: find or create the dataset's project (`label_studio_server`), adopt any
task Label Studio holds that we did not record (a push killed after Label Studio created tasks and before
our commit), ask the review queue (`review.queue.rank`) for clips, give Label Studio a storage that
serves their audio (Local Files under its document root, or S3 on a clip's bucket), and import them as
tasks with the model's answer as a prediction. Each batch's Label Studio task ids are committed with it
(review_task), so a clip is never pushed twice to one project; the queue never offers a clip already
reviewed for the task.

Pull, per project: list its tasks and annotations, write what is new or has a newer updated_at than the
stored copy, delete what Label Studio no longer has (review_annotation), and re-resolve the human label of
each clip touched (`review.resolution`), all in one transaction per project: pulling twice changes
nothing, and a pull killed half way leaves every project either pulled or not.

`SyncOptions` declares push's options once (`options_spec`): `qwen-tasks review push`'s flags and the
review-sync DAG's Params are both generated from it.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks import options_spec
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets, sources
from qwen_tasks.labelling.jobs import get_run
from qwen_tasks.options_spec import Spec, option
from qwen_tasks.records import Task
from qwen_tasks.review import queue
from qwen_tasks.review.label_studio import (
    CHOICE_OF,
    FROM_NAME,
    calibrations,
    choice_label,
    text_value,
    upsert_human_label,
)
from qwen_tasks.review.label_studio_server import AudioSource, Server, audio_source, project_title
from qwen_tasks.review.resolution import Vote, resolve
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import (
    audio,
    audio_path,
    cry_answer,
    current_label,
    human_label,
    label_run,
    review_annotation,
    review_project,
    review_task,
)

log = logging.getLogger(__name__)

# human_label.source of the labels the live sync resolved (review-import writes "label-studio")
SOURCE = "label-studio-sync"
BATCH = 100  # tasks per Label Studio import call, committed together
DEFAULT_STRATEGY = queue.Strategy.UNCERTAINTY  # `review push` and the DAG's default ranking
DEFAULT_LIMIT = 100  # new clips per project and push


@dataclass(frozen=True)
class SyncOptions:
    """What a push (and a pull) covers, one declaration per option (`options_spec`): the review-sync
    DAG's Params and `qwen-tasks review push`'s flags are generated from these, and checked again here
    (the REST API and `dags test` can send anything). Field names are the DAG's Param keys (a public
    contract: do not rename); `push --task` takes one task, declared by the command."""

    tasks: tuple[str, ...] = option(
        (Task.CRY.value, Task.ASR.value),
        Spec("enum_list", "Tasks", "Tasks to push and pull", choices=Task, flag="--task", cli=False),
    )
    datasets: tuple[str, ...] = option(
        (),
        Spec(
            "list",
            "Datasets",
            "Datasets to push and pull: one project each (one per line in the form; --dataset is repeatable)",
            nullable=True,
            flag="--dataset",
            default_text="every dataset of each task",
        ),
    )
    strategy: str = option(
        DEFAULT_STRATEGY.value,
        Spec("enum", "Strategy", "How the review queue ranks clips (docs/review.md)", choices=queue.Strategy),
    )
    limit: int = option(
        DEFAULT_LIMIT,
        Spec("int", "Limit", "At most this many new clips per project and push", minimum=1),
    )
    random_share: float = option(
        queue.DEFAULT_RANDOM_SHARE,
        Spec(
            "float",
            "Random share",
            "Share of each push drawn uniformly (unbiased quality estimates)",
            minimum=0,
            maximum=1,
        ),
    )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, flags: bool = False) -> SyncOptions:
        """Checked options from DAG params, or from CLI flags keyed by field name (`flags`: errors name
        the flag); a missing key or None takes the default."""
        return cls(**options_spec.from_mapping(cls, raw, flags=flags))

    @classmethod
    def param_specs(cls) -> dict[str, tuple[Any, dict[str, Any]]]:
        """name -> (default, Param keyword arguments): the review-sync DAG's Params."""
        return options_spec.param_specs(cls)

    def push_args(self) -> dict[str, Any]:
        """`push`'s keyword arguments for one task (the CLI and the DAG push the same way)."""
        return {
            "dataset_names": self.datasets,
            "strategy": queue.Strategy(self.strategy),
            "limit": self.limit,
            "random_share": self.random_share,
        }


# --- push ------------------------------------------------------------------------------------------


@dataclass
class PushSummary:
    """What a push did, per project and in total; `skipped` names each clip not pushed and why."""

    task: str
    projects: list[dict[str, Any]] = field(default_factory=list)
    pushed: int = 0
    adopted: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "pushed": self.pushed,
            "adopted": self.adopted,
            "skipped": self.skipped,
            "projects": self.projects,
        }


def _project_row(conn: sa.Connection, server: str, dataset_id: int, task: str) -> Any:
    p = review_project
    return conn.execute(
        sa.select(p).where(p.c.server == server, p.c.dataset_id == dataset_id, p.c.task == task)
    ).one_or_none()


def _record_project(engine: Engine, server: Server, d: datasets.Dataset, task: str) -> tuple[int, int]:
    """(our review_project id, Label Studio's project id) of dataset `d`, created or found again. A project
    that Label Studio lost (deleted) takes its tasks and annotations with it, here too."""
    url = server.config.url
    with engine.connect() as conn:
        row = _project_row(conn, url, d.id, task)
    ls_id = server.ensure_project(row.ls_project_id if row is not None else None, d.name, task)
    with transaction(engine) as conn:
        stmt = pg_insert(review_project).values(
            server=url, dataset_id=d.id, task=task, ls_project_id=ls_id, title=project_title(d.name, task)
        )
        project_id = conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[review_project.c.server, review_project.c.dataset_id, review_project.c.task],
                set_={"ls_project_id": stmt.excluded.ls_project_id, "title": stmt.excluded.title},
            ).returning(review_project.c.id)
        ).scalar_one()
        if row is not None and row.ls_project_id != ls_id:
            gone = conn.execute(
                sa.delete(review_annotation)
                .where(review_annotation.c.project_id == project_id)
                .returning(review_annotation.c.audio_id)
            ).scalars()
            conn.execute(sa.delete(review_task).where(review_task.c.project_id == project_id))
            _resolve_clips(conn, task, set(gone))
    return project_id, ls_id


def _adopt(engine: Engine, server: Server, project_id: int, ls_id: int) -> int:
    """Record Label Studio tasks of the project that we have no row for (by data.audio_id)."""
    tasks = server.tasks(ls_id)
    with transaction(engine) as conn:
        known = set(
            conn.execute(sa.select(review_task.c.ls_task_id).where(review_task.c.project_id == project_id))
            .scalars()
            .all()
        )
        rows = []
        for t in tasks:
            data = t.get("data") or {}
            audio_id = data.get("audio_id")
            if t["id"] in known or not isinstance(audio_id, int):
                continue
            if conn.execute(sa.select(audio.c.id).where(audio.c.id == audio_id)).scalar() is None:
                continue  # not a clip of this database (a task someone added by hand)
            rows.append(
                {
                    "project_id": project_id,
                    "audio_id": audio_id,
                    "ls_task_id": t["id"],
                    "run_id": data.get("run_id") if isinstance(data.get("run_id"), int) else None,
                }
            )
        if rows:
            stmt = pg_insert(review_task).values(rows)
            conn.execute(stmt.on_conflict_do_nothing())
    return len(rows)


def _model_version(run: Any) -> str:
    """The prediction's model_version: the registered version's name, else model@revision."""
    name = (run.params or {}).get("model_version")
    return str(name) if name else (f"{run.model}@{run.revision}" if run.revision else run.model)


def _task_payload(
    conn: sa.Connection, clip: queue.QueuedClip, source: AudioSource, path: str, dataset: str
) -> dict[str, Any]:
    """One Label Studio task: the audio, our ids, what the reviewer is shown, the model's answer as a
    prediction."""
    task = Task(clip.task).value
    run = conn.execute(sa.select(label_run).where(label_run.c.id == clip.run_id)).one()
    model = conn.execute(
        sa.select(current_label).where(
            current_label.c.audio_id == clip.audio_id, current_label.c.task == task
        )
    ).one()
    data: dict[str, Any] = {
        "audio": source.url,
        "audio_id": clip.audio_id,
        "path": path,
        "task": task,
        "run_id": clip.run_id,
        "dataset": dataset,
        "queued": clip.reason,
    }
    if task == "cry":
        raw = conn.execute(
            sa.select(cry_answer.c.raw_answer).where(
                cry_answer.c.run_id == clip.run_id,
                cry_answer.c.audio_id == clip.audio_id,
                cry_answer.c.method == "generate",
            )
        ).scalar()
        data |= {"question": get_run(conn, run.id).request.question, "p_yes": model.p_yes, "answer": raw}
        data |= calibrations(conn, [(clip.run_id, clip.audio_id)]).get((clip.run_id, clip.audio_id), {})
        value: dict[str, Any] = {"choices": [CHOICE_OF[model.model_label or "unknown"]]}
        kind = "choices"
    else:
        value, kind = {"text": [model.model_text or ""]}, "textarea"
    prediction: dict[str, Any] = {
        "model_version": _model_version(run),
        "result": [{"from_name": FROM_NAME[task], "to_name": "audio", "type": kind, "value": value}],
    }
    if model.p_yes is not None:
        prediction["score"] = float(model.p_yes)
    return {"data": data, "predictions": [prediction]}


def _ensure_storages(server: Server, ls_id: int, storages: dict[str, list[str]]) -> None:
    """Give the project a storage for each place its new clips' audio lives: a Local Files storage per
    folder, an S3 import storage per bucket (prefix: the deepest folder holding all its clips there), read
    with the credentials we read the bucket with (`sources.s3_access`)."""
    access = None
    for place, paths in sorted(storages.items()):
        if not place.startswith("s3://"):
            server.ensure_local_storage(ls_id, place)
            continue
        if access is None:
            access = sources.s3_access()
        bucket = place.removeprefix("s3://")
        folders = [posixpath.dirname(p.removeprefix(place + "/")) for p in paths]
        prefix = posixpath.commonpath(folders) if all(folders) else ""
        server.ensure_s3_storage(ls_id, bucket, prefix, access)


def push(
    engine: Engine,
    server: Server,
    *,
    task: str,
    dataset_names: Sequence[str] = (),
    strategy: queue.Strategy = DEFAULT_STRATEGY,
    limit: int = DEFAULT_LIMIT,
    random_share: float = queue.DEFAULT_RANDOM_SHARE,
    seed: int | None = None,
) -> PushSummary:
    """Push up to `limit` clips per dataset of `task` (all its datasets, or those named) to review."""
    task = Task(task).value
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if not 0.0 <= random_share <= 1.0:
        raise ConfigError(f"--random-share must be in [0, 1], got {random_share}")
    summary = PushSummary(task=task)
    for d in datasets.resolve(engine, list(dataset_names), task=task):
        project_id, ls_id = _record_project(engine, server, d, task)
        adopted = _adopt(engine, server, project_id, ls_id)
        with engine.connect() as conn:
            pushed_ids = set(
                conn.execute(sa.select(review_task.c.audio_id).where(review_task.c.project_id == project_id))
                .scalars()
                .all()
            )
            ranked = queue.rank(
                conn,
                task=Task(task),
                dataset_ids=[d.id],
                strategy=strategy,
                limit=limit + len(pushed_ids),
                random_share=random_share,
                seed=seed,
            )
            clips = [c for c in ranked if c.audio_id not in pushed_ids][:limit]
            paths = dict(
                conn.execute(
                    sa.select(audio_path.c.audio_id, audio_path.c.path).where(
                        audio_path.c.audio_id.in_([c.audio_id for c in clips])
                    )
                ).all()
            )
            ready: list[tuple[queue.QueuedClip, dict[str, Any]]] = []
            storages: dict[str, list[str]] = {}  # local folder or s3://bucket -> the clips it serves
            for clip in clips:
                path = paths.get(clip.audio_id)
                try:
                    if path is None:
                        raise ValueError(f"audio {clip.audio_id}: no readable path")
                    source = audio_source(path, server.config.document_root)
                except ValueError as exc:
                    summary.skipped.append(str(exc))
                    continue
                storages.setdefault(source.storage_path, []).append(path)
                ready.append((clip, _task_payload(conn, clip, source, path, d.name)))
        _ensure_storages(server, ls_id, storages)
        pushed = 0
        for start in range(0, len(ready), BATCH):
            batch = ready[start : start + BATCH]
            ids = server.import_tasks(ls_id, [payload for _, payload in batch])
            with transaction(engine) as conn:
                conn.execute(
                    pg_insert(review_task)
                    .values(
                        [
                            {
                                "project_id": project_id,
                                "audio_id": clip.audio_id,
                                "ls_task_id": ls_task,
                                "run_id": clip.run_id,
                            }
                            for (clip, _), ls_task in zip(batch, ids, strict=True)
                        ]
                    )
                    .on_conflict_do_nothing()
                )
                queue.record_queued(conn, [clip for clip, _ in batch], f"label-studio project {ls_id}")
            pushed += len(batch)
        with transaction(engine) as conn:
            conn.execute(
                sa.update(review_project)
                .where(review_project.c.id == project_id)
                .values(last_push_at=sa.func.now())
            )
        summary.pushed += pushed
        summary.adopted += adopted
        summary.projects.append(
            {
                "dataset": d.name,
                "project_id": ls_id,
                "title": project_title(d.name, task),
                "pushed": pushed,
                "adopted": adopted,
                "in_project": len(pushed_ids) + pushed,
            }
        )
        log.info("%s: pushed %d clip(s) to project %d", project_title(d.name, task), pushed, ls_id)
    return summary


# --- pull ------------------------------------------------------------------------------------------


@dataclass
class PullSummary:
    """What a pull changed: annotations new / updated / deleted, human labels written / removed."""

    projects: list[dict[str, Any]] = field(default_factory=list)
    new: int = 0
    updated: int = 0
    deleted: int = 0
    labels_written: int = 0
    labels_removed: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "updated": self.updated,
            "deleted": self.deleted,
            "labels_written": self.labels_written,
            "labels_removed": self.labels_removed,
            "errors": self.errors,
            "projects": self.projects,
        }


def _when(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _annotation_row(
    ann: dict[str, Any], task: str, audio_id: int, ls_task_id: int, emails: dict[int, str]
) -> dict[str, Any]:
    """A Label Studio annotation as a review_annotation row; ValueError for an answer we cannot read."""
    label = text = None
    cancelled = bool(ann.get("was_cancelled"))
    for result in ann.get("result") or []:
        value = result.get("value") or {}
        if task == "cry" and "choices" in value:
            label = choice_label(value["choices"])
        elif task == "asr" and "text" in value:
            text = text_value(value["text"])
    if not cancelled and label is None and text is None:
        cancelled = True  # submitted empty: no answer, counted like a skip
    who = ann.get("completed_by")
    who = who.get("id") if isinstance(who, dict) else who
    updated = _when(ann.get("updated_at")) or _when(ann.get("created_at"))
    if updated is None:
        raise ValueError("no updated_at")
    return {
        "ls_annotation_id": int(ann["id"]),
        "ls_task_id": ls_task_id,
        "audio_id": audio_id,
        "task": task,
        "label": label,
        "text": text,
        "was_cancelled": cancelled,
        "reviewer": emails.get(who) or (None if who is None else str(who)),
        "lead_time_s": ann.get("lead_time"),
        "ls_created_at": _when(ann.get("created_at")),
        "ls_updated_at": updated,
    }


def _resolve_clips(conn: sa.Connection, task: str, audio_ids: set[int]) -> tuple[int, int]:
    """Write the resolved human label of each clip (only where it changes); remove the sync's label of a
    clip with no annotation left. Returns (written, removed)."""
    written = removed = 0
    a, h = review_annotation, human_label
    for audio_id in sorted(audio_ids):
        votes = [
            Vote(r.label, r.text, r.reviewer, r.ls_updated_at, r.ls_annotation_id)
            for r in conn.execute(
                sa.select(a).where(a.c.audio_id == audio_id, a.c.task == task, a.c.was_cancelled.is_(False))
            ).all()
        ]
        resolved = resolve(task, votes)
        if resolved is None:
            removed += conn.execute(
                sa.delete(h).where(h.c.audio_id == audio_id, h.c.task == task, h.c.source == SOURCE)
            ).rowcount
            continue
        values = {"audio_id": audio_id, "task": task, "label": resolved.label, "text": resolved.text,
                  "reviewer": resolved.reviewer, "source": SOURCE}  # fmt: skip
        written += upsert_human_label(conn, values, only_if_changed=True)
    return written, removed


def pull(
    engine: Engine, server: Server, *, task: str | None = None, dataset_names: Sequence[str] = ()
) -> PullSummary:
    """Bring every project's annotations (of `task`, of the named datasets) up to date here."""
    if task is not None:
        task = Task(task).value
    ids = [d.id for d in datasets.resolve(engine, list(dataset_names), task=task)] if dataset_names else None
    p = review_project
    query = sa.select(p).where(p.c.server == server.config.url).order_by(p.c.id)
    if task is not None:
        query = query.where(p.c.task == task)
    if ids is not None:
        query = query.where(p.c.dataset_id.in_(ids))
    with engine.connect() as conn:
        projects = conn.execute(query).all()
    summary = PullSummary()
    if not projects:
        return summary
    emails = server.user_emails()
    for project in projects:
        tasks = server.tasks(project.ls_project_id)
        figures = {"new": 0, "updated": 0, "deleted": 0, "labels_written": 0, "labels_removed": 0}
        with transaction(engine) as conn:
            audio_of = dict(
                conn.execute(
                    sa.select(review_task.c.ls_task_id, review_task.c.audio_id).where(
                        review_task.c.project_id == project.id
                    )
                ).all()
            )
            stored = {
                r.ls_annotation_id: (r.ls_updated_at, r.audio_id)
                for r in conn.execute(
                    sa.select(
                        review_annotation.c.ls_annotation_id,
                        review_annotation.c.ls_updated_at,
                        review_annotation.c.audio_id,
                    ).where(review_annotation.c.project_id == project.id)
                ).all()
            }
            seen: set[int] = set()
            touched: set[int] = set()
            for t in tasks:
                audio_id = audio_of.get(t["id"])
                if audio_id is None:
                    continue  # not pushed by us (push adopts ours by data.audio_id)
                for ann in t.get("annotations") or []:
                    try:
                        row = _annotation_row(ann, project.task, audio_id, t["id"], emails)
                    except (ValueError, TypeError, KeyError) as exc:
                        summary.errors.append(
                            f"{project.title}: task {t['id']} annotation {ann.get('id')}: {exc}"
                        )
                        if ann.get("id") is not None:
                            seen.add(int(ann["id"]))  # keep what we have; never delete on a bad read
                        continue
                    ann_id = row["ls_annotation_id"]
                    seen.add(ann_id)
                    before = stored.get(ann_id)
                    if before is not None and before[0] == row["ls_updated_at"]:
                        continue  # unchanged since the last pull
                    stmt = pg_insert(review_annotation).values(project_id=project.id, **row)
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=list(review_annotation.primary_key),
                            set_={k: stmt.excluded[k] for k in row if k != "ls_annotation_id"}
                            | {"pulled_at": sa.func.now()},
                        )
                    )
                    figures["new" if before is None else "updated"] += 1
                    touched.add(audio_id)
            gone = [ann_id for ann_id in stored if ann_id not in seen]
            if gone:
                conn.execute(
                    sa.delete(review_annotation).where(
                        review_annotation.c.project_id == project.id,
                        review_annotation.c.ls_annotation_id.in_(gone),
                    )
                )
                touched |= {stored[ann_id][1] for ann_id in gone}
                figures["deleted"] = len(gone)
            written, removed = _resolve_clips(conn, project.task, touched)
            figures["labels_written"], figures["labels_removed"] = written, removed
            conn.execute(sa.update(p).where(p.c.id == project.id).values(last_pull_at=sa.func.now()))
        for name, value in figures.items():
            setattr(summary, name, getattr(summary, name) + value)
        summary.projects.append({"project_id": project.ls_project_id, "title": project.title, **figures})
    return summary
