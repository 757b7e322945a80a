"""Seed the database with the rows a labelling run leaves behind, for the review/metrics/report tests.

Not a test module. Rows go through the real schema tables (constraints apply); values are chosen so
that every metric in the tests can be computed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.store import schema

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def add_audio(engine: Engine, n: int, root: str = "/data/audio", start: int = 0) -> list[int]:
    """`n` audio rows with one ok path each (root/clip_XXX.wav); returns their ids in order."""
    ids = []
    with engine.begin() as conn:
        for i in range(start, start + n):
            audio_id = conn.execute(
                schema.audio.insert()
                .values(
                    sha256=f"{i + 1:064x}",
                    size_bytes=32000,
                    duration_s=10.0,
                    sample_rate=16000,
                    channels=1,
                    frames=160000,
                    format="WAV",
                )
                .returning(schema.audio.c.id)
            ).scalar_one()
            conn.execute(
                schema.audio_file.insert().values(
                    path=f"{root}/clip_{i:03d}.wav", audio_id=audio_id, status="ok"
                )
            )
            ids.append(audio_id)
    return ids


def _file_id(conn: sa.Connection, audio_id: int) -> int:
    return conn.execute(
        sa.select(sa.func.min(schema.audio_file.c.id)).where(schema.audio_file.c.audio_id == audio_id)
    ).scalar_one()


def add_gold(engine: Engine, gold: dict[int, str], manifest: str = "/data/cry.jsonl") -> None:
    """AQA manifest lines with gold labels (kind aqa) for the given audio ids."""
    with engine.begin() as conn:
        for line_no, (audio_id, label) in enumerate(gold.items(), start=1):
            conn.execute(
                schema.manifest_item.insert().values(
                    manifest_path=manifest,
                    line_no=line_no,
                    kind="aqa",
                    audio_path=f"clip_{audio_id}.wav",
                    audio_file_id=_file_id(conn, audio_id),
                    question="Is there a baby crying in this audio?",
                    gt=label,
                    gold_label=label,
                )
            )


def add_references(
    engine: Engine, refs: dict[int, tuple[str, str | None]], manifest: str = "/data/asr.jsonl"
) -> None:
    """ASR manifest lines: audio id -> (reference text, language or None)."""
    with engine.begin() as conn:
        for line_no, (audio_id, (text, language)) in enumerate(refs.items(), start=1):
            conn.execute(
                schema.manifest_item.insert().values(
                    manifest_path=manifest,
                    line_no=line_no,
                    kind="asr",
                    audio_path=f"clip_{audio_id}.wav",
                    audio_file_id=_file_id(conn, audio_id),
                    reference_text=text,
                    language=language,
                )
            )


@dataclass(frozen=True)
class Job:
    """A finished job: offset of start and end from T0 in seconds, and what it covered."""

    start_s: float
    end_s: float
    audio_ids: Sequence[int]
    process_seconds: float


def add_run(
    engine: Engine,
    task: str,
    jobs: Sequence[Job],
    model: str = "tiny-qwen2-audio",
    prompt_version: str = "v1",
) -> int:
    """A done run with its done jobs and job items (10 s of audio per item); returns the run id."""
    with engine.begin() as conn:
        n = sum(len(j.audio_ids) for j in jobs)
        run_id = conn.execute(
            schema.label_run.insert()
            .values(
                task=task,
                model=model,
                prompt_version=prompt_version,
                status="done",
                n_planned=n,
                n_labelled=n,
                audio_seconds=10.0 * n,
                started_at=T0,
                finished_at=T0 + timedelta(seconds=max((j.end_s for j in jobs), default=0)),
            )
            .returning(schema.label_run.c.id)
        ).scalar_one()
        for seq, job in enumerate(jobs):
            job_id = conn.execute(
                schema.label_job.insert()
                .values(
                    run_id=run_id,
                    seq=seq,
                    status="done",
                    n_items=len(job.audio_ids),
                    audio_seconds=10.0 * len(job.audio_ids),
                    attempts=1,
                    process_seconds=job.process_seconds,
                    started_at=T0 + timedelta(seconds=job.start_s),
                    finished_at=T0 + timedelta(seconds=job.end_s),
                )
                .returning(schema.label_job.c.id)
            ).scalar_one()
            for audio_id in job.audio_ids:
                conn.execute(
                    schema.label_job_item.insert().values(job_id=job_id, run_id=run_id, audio_id=audio_id)
                )
    return run_id


def _job_of(conn: sa.Connection, run_id: int, audio_id: int) -> int | None:
    return conn.execute(
        sa.select(schema.label_job_item.c.job_id).where(
            schema.label_job_item.c.run_id == run_id, schema.label_job_item.c.audio_id == audio_id
        )
    ).scalar_one_or_none()


def add_cry_answers(
    engine: Engine,
    run_id: int,
    score: dict[int, float] | None = None,
    generate: dict[int, tuple[str, str]] | None = None,
    threshold: float = 0.5,
) -> None:
    """score: audio id -> p_yes (label by threshold); generate: audio id -> (raw answer, label)."""
    with engine.begin() as conn:
        for audio_id, p in (score or {}).items():
            conn.execute(
                schema.cry_answer.insert().values(
                    run_id=run_id,
                    job_id=_job_of(conn, run_id, audio_id),
                    audio_id=audio_id,
                    method="score",
                    p_yes=p,
                    label="yes" if p >= threshold else "no",
                    threshold=threshold,
                )
            )
        for audio_id, (raw, label) in (generate or {}).items():
            conn.execute(
                schema.cry_answer.insert().values(
                    run_id=run_id,
                    job_id=_job_of(conn, run_id, audio_id),
                    audio_id=audio_id,
                    method="generate",
                    raw_answer=raw,
                    label=label,
                )
            )


def add_transcripts(engine: Engine, run_id: int, texts: dict[int, str], language: str | None = None) -> None:
    with engine.begin() as conn:
        for audio_id, text in texts.items():
            conn.execute(
                schema.transcription.insert().values(
                    run_id=run_id,
                    job_id=_job_of(conn, run_id, audio_id),
                    audio_id=audio_id,
                    text=text,
                    language=language,
                )
            )


def add_human(
    engine: Engine, audio_id: int, task: str, label: str | None = None, text: str | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            schema.human_label.insert().values(
                audio_id=audio_id, task=task, label=label, text=text, reviewer="tester", source="test"
            )
        )


# The cry scenario used by several tests, hand-computed in tests/quality/test_metrics.py.
CRY_GOLD = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
CRY_P_YES = [0.9, 0.8, 0.45, 0.7, 0.2, 0.65, 0.1, 0.3]
CRY_GENERATE = [
    ("Yes, a baby is crying.", "yes"),
    ("Yes.", "yes"),
    ("It might be a baby crying.", "unknown"),
    ("No, only a dog barking.", "no"),
    ("No.", "no"),
    ("There is a baby crying.", "yes"),
    ("No crying.", "no"),
    ("I can't tell.", "unknown"),
]


def seed_cry_scenario(engine: Engine) -> tuple[int, list[int]]:
    """8 clips with gold, one run with both methods in two 10 s jobs; returns (run id, audio ids)."""
    ids = add_audio(engine, 8)
    add_gold(engine, dict(zip(ids, CRY_GOLD, strict=True)))
    run_id = add_run(
        engine,
        "cry",
        [Job(0, 10, ids[:4], process_seconds=8), Job(10, 20, ids[4:], process_seconds=8)],
    )
    add_cry_answers(
        engine,
        run_id,
        score=dict(zip(ids, CRY_P_YES, strict=True)),
        generate=dict(zip(ids, CRY_GENERATE, strict=True)),
    )
    return run_id, ids


ASR_REFS = [
    ("The cat sat on the mat.", "en"),
    ("今天天氣很好。", "zh"),  # traditional reference, simplified hypothesis: CER 0
    ("我很高兴", None),  # no language: detected as zh
]
ASR_HYPS = ["the cat sit on mat", "今天天气很好", "我很开心"]


def seed_asr_scenario(engine: Engine, start: int = 100) -> tuple[int, list[int]]:
    ids = add_audio(engine, 3, root="/data/speech", start=start)
    add_references(engine, dict(zip(ids, ASR_REFS, strict=True)))
    run_id = add_run(engine, "asr", [Job(0, 6, ids, process_seconds=3)])
    add_transcripts(engine, run_id, dict(zip(ids, ASR_HYPS, strict=True)))
    return run_id, ids
