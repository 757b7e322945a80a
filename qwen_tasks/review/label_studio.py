"""Human review round trip (Label Studio) and the fine-tune export built from reviewed labels.

Export: the review queue of a run becomes Label Studio tasks, each with the audio reference and the
model's answer as a pre-annotation (prediction), so a reviewer only confirms or corrects it. Import:
a Label Studio export (JSON or JSON-MIN) becomes `human_label` rows (upsert per audio and task), which
the views and metrics then prefer over model labels and manifest gold. One bad task is reported with
the file and the reason and skipped; it never sinks the rest of the file.

Fine-tune export: human labels (and optionally confident model labels) in the Qwen2-Audio chat format,
for the small fine-tune that teaches the model to answer this question with a bare "Yes." / "No.".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest import datasets
from qwen_tasks.labelling.jobs import get_run, latest_run_ids
from qwen_tasks.records import DEFAULT_LANGUAGE, DEFAULT_QUESTION, LabelRequest, Task
from qwen_tasks.review import queue
from qwen_tasks.store.database import transaction
from qwen_tasks.store.schema import (
    asr_reference,
    audio,
    audio_file,
    audio_path,
    cry_answer,
    cry_gold,
    human_label,
    label_run,
    review_queue,
)

FROM_NAME = {"cry": "cry", "asr": "transcription"}
CANT_TELL = "Can't tell"  # the reviewer's "unknown" (docs/review.md: how `unknown` is used)
CHOICE_OF = {"yes": "Yes", "no": "No", "unknown": CANT_TELL}
LABEL_OF_CHOICE = {
    "yes": "yes",
    "y": "yes",
    "true": "yes",
    "是": "yes",
    "no": "no",
    "n": "no",
    "false": "no",
    "否": "no",
    "can't tell": "unknown",
    "unsure": "unknown",  # the choice's name before "Can't tell" (older exports)
    "unknown": "unknown",
    "skip": "unknown",
}


# The review_queue columns an export reads (not all of the view's: is_latest_run and gold_source are for
# SQL users), kept to what the query has always fetched.
REVIEW_COLUMNS = (
    "run_id", "task", "audio_id", "path", "reasons", "label", "p_yes", "threshold", "generate_label",
    "raw_answer", "gold_label", "transcript", "reference_text", "error_rate", "priority",
)  # fmt: skip


def _check_task(task: str) -> str:
    if task not in set(Task):
        raise ConfigError(f"task must be one of {', '.join(Task)}, got {task!r}")
    return task


def label_config(task: str) -> str:
    """The Label Studio labelling interface (XML) matching the exported and pushed tasks of `task`: cry
    shows the question the run asked ($question) and offers Yes / No / Can't tell; asr a text area that
    the model's transcript (the task's prediction) pre-fills."""
    if _check_task(task) == "cry":
        return (
            "<View>\n"
            '  <Header value="$question"/>\n'
            '  <Audio name="audio" value="$audio"/>\n'
            '  <Choices name="cry" toName="audio" choice="single-radio" showInline="true" required="true">\n'
            '    <Choice value="Yes"/>\n    <Choice value="No"/>\n    <Choice value="Can&apos;t tell"/>\n'
            "  </Choices>\n"
            "</View>\n"
        )
    return (
        "<View>\n"
        '  <Audio name="audio" value="$audio"/>\n'
        '  <Header value="Correct the transcript (the model\'s is pre-filled)"/>\n'
        '  <TextArea name="transcription" toName="audio" rows="4" editable="true" maxSubmissions="1"/>\n'
        "</View>\n"
    )


LOCAL_FILES_PREFIX = "/data/local-files/?d="  # Label Studio's local file serving (docs/review.md)


def audio_reference(path: str, audio_root: str | None = None, audio_prefix: str | None = None) -> str:
    """What Label Studio loads: the path, relative to `audio_root` if given, behind `audio_prefix`.

    For Label Studio's local file serving the prefix is "/data/local-files/?d=" and `audio_root` is
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: `?d=` is relative to that root, and the file must lie in a
    subfolder of it (a Local Files storage on the project covers that subfolder; the root itself is
    refused), so /srv/ls/audio/a.wav under root /srv/ls becomes /data/local-files/?d=audio/a.wav.
    """
    local_files = bool(audio_prefix) and "local-files/?d=" in (audio_prefix or "")
    if local_files and not audio_root:
        raise ConfigError(
            "--audio-prefix for Label Studio local files needs --audio-root: the folder set as "
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (?d= paths are relative to it)"
        )
    ref = path
    if audio_root:
        root = audio_root.rstrip("/") + "/"
        if not path.startswith(root):
            raise ConfigError(f"{path}: not under --audio-root {audio_root}")
        ref = path[len(root) :]
        if local_files and "/" not in ref:
            raise ConfigError(
                f"{path}: directly in --audio-root {audio_root}; Label Studio serves local files only "
                "from a subfolder of its document root (give the document root, not the audio folder)"
            )
    if audio_prefix:
        return audio_prefix + quote(ref, safe="/")
    return ref


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    config: Path
    run_id: int | None
    tasks: int

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "config": str(self.config), "run_id": self.run_id, "tasks": self.tasks}


def export_label_studio(
    engine: Engine,
    out: Path,
    task: str,
    run_id: int | None = None,
    audio_root: str | None = None,
    audio_prefix: str | None = None,
    limit: int | None = None,
    question: str | None = None,
    dataset: str | None = None,
    strategy: str | None = None,
    random_share: float | None = None,
    seed: int | None = None,
) -> ExportSummary:
    """Write the review queue of `run_id` (default: the task's latest run; with `dataset`, the latest that
    covered it) as Label Studio tasks JSON; with `dataset`, only that dataset's clips.

    Items are ordered by priority (disagreement with gold first). With `strategy`, the clips are instead
    the ranked queue of `review.queue.rank` (over every run's current labels; `limit` defaults to
    `DEFAULT_QUEUE_LIMIT`) and are recorded in `review_queued` with destination `file:<out>`. The labelling
    config goes next to `out` as `<stem>.label_config.xml`.
    """
    _check_task(task)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    scope = datasets.resolve(engine, [dataset], task=task)[0] if dataset is not None else None
    if strategy is not None:
        if run_id is not None:
            raise ConfigError("--strategy ranks every run's current labels: leave out --run")
        return _export_ranked(
            engine, Path(out), task, strategy, limit=limit or queue.DEFAULT_QUEUE_LIMIT,
            audio_root=audio_root, audio_prefix=audio_prefix, question=question,
            dataset_ids=None if scope is None else [scope.id],
            random_share=queue.DEFAULT_RANDOM_SHARE if random_share is None else random_share, seed=seed,
        )  # fmt: skip
    if random_share is not None:
        raise ConfigError("--random-share needs --strategy")
    with engine.connect() as conn:
        if run_id is None:  # the task's newest run, whatever its state: the one review_queue calls latest
            covering = scope.id if scope is not None else None
            run_id = next(iter(latest_run_ids(conn, tasks=[task], dataset_id=covering)), None)
        run = None
        if run_id is not None:
            run = conn.execute(sa.select(label_run).where(label_run.c.id == run_id)).one_or_none()
            if run is None:
                raise ConfigError(f"run {run_id} does not exist")
            if run.task != task:
                raise ConfigError(f"run {run_id} is a {run.task} run, not {task}")
            # the reviewer answers the question this run asked, not the default one
            question = question or get_run(conn, run_id).request.question
        q = review_queue
        rows = (
            conn.execute(
                sa.select(*(q.c[name] for name in REVIEW_COLUMNS))
                .where(q.c.run_id == run_id, q.c.task == task)
                .where(q.c.audio_id.in_(datasets.members([scope.id])) if scope is not None else sa.true())
                .order_by(q.c.priority.desc(), q.c.audio_id)
                .limit(limit)
            ).all()
            if run is not None
            else []
        )
        calibrated = calibrations(conn, [(r.run_id, r.audio_id) for r in rows]) if task == "cry" else {}
    tasks = [
        _task(r, task, run, question, audio_root, audio_prefix, calibrated.get((r.run_id, r.audio_id)))
        for r in rows
        if r.path is not None
    ]
    return _write_tasks(Path(out), task, tasks, run_id)


def calibrations(
    conn: sa.Connection, clips: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, Any]]:
    """(run id, audio id) -> `calibration_id`, `threshold` and `p_calibrated` of the clip's score answer in
    that run, for the clips whose label a calibrated decision rule decided (cry_answer.calibration_id);
    clips decided by the plain threshold are absent. What a reviewer's task shows beside p_yes."""
    pairs = sorted(set(clips))
    if not pairs:
        return {}
    c = cry_answer.c
    rows = conn.execute(
        sa.select(c.run_id, c.audio_id, c.calibration_id, c.threshold, c.p_calibrated).where(
            c.method == "score",
            c.calibration_id.is_not(None),
            sa.tuple_(c.run_id, c.audio_id).in_(pairs),
        )
    ).all()
    return {
        (r.run_id, r.audio_id): {
            "calibration_id": r.calibration_id,
            "threshold": r.threshold,
            "p_calibrated": r.p_calibrated,
        }  # fmt: skip
        for r in rows
    }


def _task(
    r: Any,
    task: str,
    run: Any,
    question: str | None,
    audio_root: str | None,
    audio_prefix: str | None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One Label Studio task: the clip's audio and context (with the calibrated rule that decided its
    label, from `calibrations`), the model's answer as its prediction."""
    data: dict[str, Any] = {
        "audio": audio_reference(r.path, audio_root, audio_prefix),
        "path": r.path,
        "audio_id": r.audio_id,
        "run_id": r.run_id,
        "task": task,
        "reasons": ", ".join(r.reasons),
    }
    if task == "cry":
        data |= {
            "question": question,
            "p_yes": r.p_yes,
            "gold_label": r.gold_label,
            "answer": r.raw_answer,
        } | (calibration or {})
        result = {
            "from_name": FROM_NAME[task],
            "to_name": "audio",
            "type": "choices",
            "value": {"choices": [CHOICE_OF.get(r.label or "unknown", CANT_TELL)]},
        }
        score = r.p_yes
    else:
        data |= {"reference": r.reference_text, "error_rate": r.error_rate}
        result = {
            "from_name": FROM_NAME[task],
            "to_name": "audio",
            "type": "textarea",
            "value": {"text": [r.transcript or ""]},
        }
        score = None if r.error_rate is None else max(0.0, 1.0 - r.error_rate)
    prediction: dict[str, Any] = {
        "model_version": f"{run.model} {run.prompt_version} run {run.id}",
        "result": [result],
    }
    if score is not None:
        prediction["score"] = score
    return {"data": data, "predictions": [prediction]}


def _write_tasks(out: Path, task: str, tasks: list[dict[str, Any]], run_id: int | None) -> ExportSummary:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    config = out.with_name(f"{out.stem}.label_config.xml")
    config.write_text(label_config(task), encoding="utf-8")
    return ExportSummary(out=out, config=config, run_id=run_id, tasks=len(tasks))


def _export_ranked(
    engine: Engine, out: Path, task: str, strategy: str, *, limit: int, audio_root: str | None,
    audio_prefix: str | None, question: str | None, dataset_ids: list[int] | None, random_share: float,
    seed: int | None,
) -> ExportSummary:  # fmt: skip
    """`export_label_studio` with `strategy`: the ranked queue as tasks, each with its strategy and reason
    (as `reasons`), recorded in `review_queued` with destination `file:<out>` in one transaction."""
    try:
        chosen = queue.Strategy(strategy)
    except ValueError:
        raise ConfigError(
            f"--strategy must be one of {', '.join(queue.Strategy)}, got {strategy!r}"
        ) from None
    destination = f"file:{out.resolve()}"
    with transaction(engine) as conn:
        clips = queue.rank(
            conn, task=Task(task), dataset_ids=dataset_ids, strategy=chosen, limit=limit,
            random_share=random_share, seed=seed,
        )  # fmt: skip
        rows = queue.clip_details(conn, clips)
        runs = {
            r.id: r
            for r in conn.execute(
                sa.select(label_run).where(label_run.c.id.in_({c.run_id for c in clips}))
            ).all()
        }
        questions = {i: question or get_run(conn, i).request.question for i in runs} if task == "cry" else {}
        calibrated = calibrations(conn, [(c.run_id, c.audio_id) for c in clips]) if task == "cry" else {}
        tasks = []
        for clip, r in zip(clips, rows, strict=True):
            if r.path is None:
                continue  # no readable path any more: nothing a reviewer could listen to
            item = _task(r, task, runs[clip.run_id], questions.get(clip.run_id), audio_root, audio_prefix,
                         calibrated.get((clip.run_id, clip.audio_id)))  # fmt: skip
            item["data"] |= {"strategy": clip.strategy.value, "priority": clip.priority}
            tasks.append(item)
        kept = {t["data"]["audio_id"] for t in tasks}
        queue.record_queued(conn, [c for c in clips if c.audio_id in kept], destination)
        return _write_tasks(out, task, tasks, None)


# --- import -------------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import did; `errors` name the file, the task and the reason.

    `imported` counts audio-and-task labels written (a task once, however many JSON-MIN rows it has).
    """

    path: Path
    imported: int = 0
    unannotated: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "imported": self.imported,
            "unannotated": self.unannotated,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class _Review:
    audio_id: int | None
    path: str | None
    task: str
    label: str | None
    text: str | None
    reviewer_name: str | None  # an e-mail or user name, when the export carries one
    reviewer_id: str | None  # Label Studio's numeric user id (all a default export may carry)
    order: tuple[str, int]  # (updated_at, annotation id): the latest annotation of a task wins
    key: str | None  # Label Studio's task id: JSON-MIN has one row per annotation of a task


class _Skip(Exception):
    """This task carries no finished annotation (not an error)."""


def _annotation(item: dict[str, Any]) -> dict[str, Any]:
    """The latest non-cancelled annotation of a full-format task."""
    annotations = [
        a for a in item.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    if not annotations:
        raise _Skip
    return max(annotations, key=_annotation_order)


def _annotation_order(annotation: dict[str, Any]) -> tuple[str, int]:
    raw_id = annotation.get("annotation_id", annotation.get("id"))
    number = int(raw_id) if isinstance(raw_id, int | str) and str(raw_id).isdigit() else 0
    return str(annotation.get("updated_at") or annotation.get("created_at") or ""), number


_EMAIL = re.compile(r"[^\s,<>]+@[^\s,<>]+")


def _reviewer(*values: Any) -> tuple[str | None, str | None]:
    """(name, id) of the annotator from what an export carries: `completed_by` as an id or an object,
    `created_username` ("First Last ann@example.org, 7"), or JSON-MIN's `annotator` (id or e-mail)."""
    name = user_id = None
    for value in values:
        if isinstance(value, dict):
            name = name or value.get("email") or value.get("username") or None
            value = value.get("id")
        if value is None or value == "" or isinstance(value, bool):
            continue
        text = str(value).strip()
        email = _EMAIL.search(text)
        if email:
            name = name or email.group(0)
        elif text.isdigit():
            user_id = user_id or text
        elif "," not in text:
            name = name or text
    return name, user_id


def choice_label(value: Any) -> str:
    choice = value[0] if isinstance(value, list) and value else value
    if not isinstance(choice, str) or choice.strip().lower() not in LABEL_OF_CHOICE:
        raise ValueError(f"choice {choice!r} is not Yes/No/{CANT_TELL}")
    return LABEL_OF_CHOICE[choice.strip().lower()]


def text_value(value: Any) -> str:
    """The reviewed transcript; an explicitly empty one ("no speech") is a valid answer."""
    text = "\n".join(str(t) for t in value) if isinstance(value, list) else value
    if not isinstance(text, str):
        raise ValueError(f"transcript {text!r} is not text")
    return text.strip()


def _parse_task(item: Any, default_task: str | None) -> _Review:
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    data = item.get("data") if isinstance(item.get("data"), dict) else item  # JSON-MIN is flat
    task = data.get("task") or default_task
    label = text = None
    if "annotations" in item:  # full JSON export
        annotation = _annotation(item)
        name, user_id = _reviewer(annotation.get("completed_by"), annotation.get("created_username"))
        order = _annotation_order(annotation)
        for result in annotation.get("result") or []:
            value = result.get("value") or {}
            if result.get("type") == "choices" or "choices" in value:
                label = choice_label(value.get("choices"))
                task = task or "cry"
            elif result.get("type") == "textarea" or "text" in value:
                text = text_value(value.get("text"))
                task = task or "asr"
    else:  # JSON-MIN: {"audio": ..., "cry": "Yes", "annotator": ..., "annotation_id": ...}
        name, user_id = _reviewer(item.get("annotator"))
        order = _annotation_order(item)
        if item.get(FROM_NAME["cry"]) is not None:
            label, task = choice_label(item[FROM_NAME["cry"]]), task or "cry"
        if item.get(FROM_NAME["asr"]) is not None:
            text, task = text_value(item[FROM_NAME["asr"]]), task or "asr"
    if task not in set(Task):
        raise ValueError(f"cannot tell the task (data.task = {task!r})")
    if task == "cry" and label is None:
        raise _Skip
    if task == "asr" and text is None:
        raise _Skip
    raw_id = data.get("audio_id")
    audio_id = None
    if raw_id is not None:
        if isinstance(raw_id, bool) or not str(raw_id).isdigit():
            raise ValueError(f"audio_id {raw_id!r} is not a number")
        audio_id = int(raw_id)
    path = data.get("path") or data.get("audio")
    if audio_id is None and not path:
        raise ValueError("no audio_id and no audio path")
    key = None if item.get("id") is None else str(item["id"])
    return _Review(audio_id, path, task, label, text, name, user_id, order, key)


def _resolve_audio(conn: sa.Connection, review: _Review) -> int:
    if review.audio_id is not None:
        found = conn.execute(sa.select(audio.c.id).where(audio.c.id == review.audio_id)).scalar()
        if found is None:
            raise ValueError(f"audio_id {review.audio_id} is not in the database")
        return found
    found = conn.execute(
        sa.select(audio_file.c.audio_id).where(
            audio_file.c.path == review.path, audio_file.c.audio_id.is_not(None)
        )
    ).scalar()
    if found is None:
        raise ValueError(f"audio path {review.path!r} is not in the database")
    return found


def import_label_studio(
    engine: Engine, path: Path, task: str | None = None, reviewer: str | None = None
) -> ImportSummary:
    """Upsert the annotations of a Label Studio export into human_label; returns what happened.

    `task` is only needed for exports whose tasks carry no `data.task` (tasks not made by us);
    `reviewer` is used where an annotation names no annotator.
    """
    if task is not None:
        _check_task(task)
    path = Path(path)
    summary = ImportSummary(path=path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a JSON list of tasks")
    with transaction(engine) as conn:
        latest: dict[tuple[int, str], tuple[_Review, int]] = {}
        seen_keys: set[str] = set()
        for index, item in enumerate(items):
            where = f"{path}: task #{index + 1}" + (
                f" (id {item['id']})" if isinstance(item, dict) and "id" in item else ""
            )
            try:
                review = _parse_task(item, task)
                audio_id = _resolve_audio(conn, review)
            except _Skip:
                # JSON-MIN lists a task once per annotation: count a task, not its rows
                key = str(item.get("id")) if isinstance(item, dict) and item.get("id") is not None else None
                if key is None or key not in seen_keys:
                    summary.unannotated += 1
                if key is not None:
                    seen_keys.add(key)
                continue
            except (ValueError, TypeError, AttributeError) as exc:
                summary.errors.append(f"{where}: {exc}")
                continue
            if review.key is not None:
                seen_keys.add(review.key)
            # the latest annotation per audio and task wins (a task reviewed twice, JSON-MIN rows)
            previous = latest.get((audio_id, review.task))
            if previous is None or review.order >= previous[0].order:
                latest[(audio_id, review.task)] = (review, index)
        for (audio_id, review_task), (review, _) in sorted(latest.items(), key=lambda kv: kv[1][1]):
            values = {
                "audio_id": audio_id,
                "task": review_task,
                "label": review.label if review_task == "cry" else None,
                "text": review.text if review_task == "asr" else None,
                # who reviewed: an e-mail or name from the export, else --reviewer, else the user id
                "reviewer": review.reviewer_name or reviewer or review.reviewer_id,
                "source": "label-studio",
            }
            upsert_human_label(conn, values)
            summary.imported += 1
    return summary


def upsert_human_label(conn: sa.Connection, values: dict[str, Any], *, only_if_changed: bool = False) -> int:
    """Write the human label of (values' audio_id, task): insert, or replace label, text, reviewer and
    source. `only_if_changed`: leave an identical row alone (the live sync's pulls stay no-ops). Returns
    the rows written."""
    h = human_label
    stmt = pg_insert(h).values(**values)
    changed = sa.or_(
        *(h.c[k].is_distinct_from(stmt.excluded[k]) for k in ("label", "text", "reviewer", "source"))
    )
    return conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[h.c.audio_id, h.c.task],
            set_={
                "label": stmt.excluded.label,
                "text": stmt.excluded.text,
                "reviewer": stmt.excluded.reviewer,
                "source": stmt.excluded.source,
                "created_at": sa.func.now(),
            },
            where=changed if only_if_changed else None,
        )
    ).rowcount


# --- fine-tune export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSummary:
    out: Path
    rows: int
    human: int
    model: int

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "rows": self.rows, "human": self.human, "model": self.model}


def _prompt_text(task: str, question: str | None, language: str | None) -> str:
    """The user text the labelling prompt uses, so the fine-tuned model sees what the pipeline asks."""
    from qwen_tasks.labelling.prompts import qwen2_audio_spec
    from qwen_tasks.quality.transcript_text import canonical_language

    question = question or DEFAULT_QUESTION
    try:
        request = LabelRequest(
            task=task, question=question, language=canonical_language(language) or DEFAULT_LANGUAGE
        )
        return qwen2_audio_spec(request, "chat").text
    except (ValueError, ConfigError):  # a language the prompts do not know: the default one
        return qwen2_audio_spec(LabelRequest(task=task, question=question), "chat").text


def chat_row(path: str, prompt: str, answer: str) -> dict[str, Any]:
    """One training example in the Qwen2-Audio chat format (the model card's message layout)."""
    return {
        "audio": path,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "audio", "audio_url": path}, {"type": "text", "text": prompt}],
            },
            {"role": "assistant", "content": answer},
        ],
    }


def export_finetune(
    engine: Engine,
    out: Path,
    task: str = "cry",
    include_confident: float | None = None,
    question: str | None = None,
) -> FinetuneSummary:
    """Write human-reviewed labels (plus, with `include_confident` P, model labels from each audio's
    latest score run with p_yes >= P or <= 1 - P that no gold label contradicts) as JSONL. Clips of a
    test dataset are never written: these are training rows."""
    _check_task(task)
    if include_confident is not None and not 0.5 < include_confident <= 1.0:
        raise ConfigError(f"--include-confident must be in (0.5, 1], got {include_confident}")
    if include_confident is not None and task != "cry":
        raise ConfigError("--include-confident only applies to --task cry (transcripts have no confidence)")
    rows: list[dict[str, Any]] = []
    n_human = n_model = 0
    with engine.connect() as conn:
        human = conn.execute(
            sa.select(
                human_label.c.audio_id,
                human_label.c.label,
                human_label.c.text,
                audio_path.c.path,
                asr_reference.c.language,
            )
            .select_from(
                human_label.join(audio_path, audio_path.c.audio_id == human_label.c.audio_id).outerjoin(
                    asr_reference, asr_reference.c.audio_id == human_label.c.audio_id
                )
            )
            .where(human_label.c.task == task, human_label.c.audio_id.not_in(datasets.in_test_dataset()))
            .order_by(human_label.c.audio_id)
        ).all()
        for r in human:
            if task == "cry":
                if r.label not in ("yes", "no"):
                    continue
                rows.append(
                    chat_row(
                        r.path, _prompt_text(task, question, None), "Yes." if r.label == "yes" else "No."
                    )
                )
            else:
                rows.append(chat_row(r.path, _prompt_text(task, question, r.language), r.text))
            rows[-1] |= {
                "label": r.label if task == "cry" else None,
                "source": "human",
                "audio_id": r.audio_id,
            }
            n_human += 1
        if include_confident is not None:
            latest = (
                sa.select(cry_answer.c.audio_id, sa.func.max(cry_answer.c.run_id).label("run_id"))
                .where(cry_answer.c.method == "score", cry_answer.c.p_yes.is_not(None))
                .group_by(cry_answer.c.audio_id)
                .subquery()
            )
            reviewed = sa.select(human_label.c.audio_id).where(human_label.c.task == "cry")
            confident = conn.execute(
                sa.select(cry_answer.c.audio_id, cry_answer.c.p_yes, audio_path.c.path, cry_gold.c.gold_label)
                .select_from(
                    cry_answer.join(
                        latest,
                        sa.and_(
                            latest.c.audio_id == cry_answer.c.audio_id, latest.c.run_id == cry_answer.c.run_id
                        ),
                    )
                    .join(audio_path, audio_path.c.audio_id == cry_answer.c.audio_id)
                    .outerjoin(cry_gold, cry_gold.c.audio_id == cry_answer.c.audio_id)
                )
                .where(
                    cry_answer.c.method == "score",
                    cry_answer.c.audio_id.not_in(reviewed),
                    cry_answer.c.audio_id.not_in(datasets.in_test_dataset()),
                    sa.or_(
                        cry_answer.c.p_yes >= include_confident, cry_answer.c.p_yes <= 1 - include_confident
                    ),
                )
                .order_by(cry_answer.c.audio_id)
            ).all()
            for r in confident:
                label = "yes" if r.p_yes >= include_confident else "no"
                if r.gold_label is not None and r.gold_label != label:
                    continue  # confident but wrong against the manifest's gold: not training material
                rows.append(
                    chat_row(r.path, _prompt_text(task, question, None), "Yes." if label == "yes" else "No.")
                )
                rows[-1] |= {"label": label, "source": "model", "p_yes": r.p_yes, "audio_id": r.audio_id}
                n_model += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return FinetuneSummary(out=out, rows=len(rows), human=n_human, model=n_model)
