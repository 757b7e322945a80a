"""review_queue and dataset_summary as 0011 rewrote them (for speed) against their 0010 definitions, read
from the old migration file as the reference: on random runs of both tasks (both methods, score only,
generate only, several runs per clip, gold from manifests and humans, references, utterance scores,
datasets, clips with a second path or none readable), every row and column is the same."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from review_seed import Job, add_audio, add_cry_answers, add_gold, add_references, add_run, add_transcripts
from sqlalchemy.engine import Engine

from qwen_tasks.quality import metrics
from qwen_tasks.store import schema

MIGRATION_0010 = Path(__file__).resolve().parents[2] / "sql" / "migrations" / "0010_current_label.sql"


def _old_view(name: str) -> str:
    """The SELECT that 0010 gave view `name`."""
    text = MIGRATION_0010.read_text(encoding="utf-8")
    found = re.search(rf"CREATE OR REPLACE VIEW {name} AS\n(.*?);\n", text, re.S)
    assert found is not None, name
    return found.group(1)


def _rows(engine: Engine, source: str, order: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {source} ORDER BY {order}"))]  # noqa: S608


def _seed(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    ids = add_audio(engine, 40)
    add_gold(engine, {a: rng.choice(["yes", "no"]) for a in rng.sample(ids, 20)})
    add_references(engine, {a: (rng.choice(["a cat", "the dog", ""]), "en") for a in rng.sample(ids, 15)})
    with engine.begin() as conn:
        f = schema.audio_file
        conn.execute(f.insert().values(path="/data/zz/second.wav", audio_id=ids[0], status="ok"))
        conn.execute(
            f.update().where(f.c.audio_id == ids[1]).values(status="quarantined", reason="bad", audio_id=None)
        )
        for name, members in (("first", ids[:25]), ("second", ids[15:]), ("empty", [])):
            dataset_id = conn.execute(
                schema.dataset.insert().values(name=name, tasks=["cry", "asr"]).returning(schema.dataset.c.id)
            ).scalar_one()
            if members:
                conn.execute(
                    schema.dataset_audio.insert(),
                    [{"dataset_id": dataset_id, "audio_id": a} for a in members],
                )
        for a in rng.sample(ids, 6):
            conn.execute(
                schema.human_label.insert().values(
                    audio_id=a, task="cry", label=rng.choice(["yes", "no", "unknown"]), reviewer="ann"
                )
            )
        for a in rng.sample(ids, 3):
            conn.execute(
                schema.human_label.insert().values(audio_id=a, task="asr", text="human", reviewer="ann")
            )
    for _ in range(3):
        clips = rng.sample(ids, 25)
        run = add_run(engine, "cry", [Job(0, 1, clips, 1.0)])
        add_cry_answers(
            engine,
            run,
            score={a: rng.choice([0.05, 0.45, 0.5, 0.58, 0.9]) for a in clips if rng.random() < 0.7},
            generate={
                a: rng.choice([("Yes.", "yes"), ("No.", "no"), ("Hmm.", "unknown")])
                for a in clips
                if rng.random() < 0.7
            },
        )
    for _ in range(2):
        clips = rng.sample(ids, 20)
        run = add_run(engine, "asr", [Job(0, 1, clips, 1.0)])
        add_transcripts(engine, run, {a: rng.choice(["a cat", "the dog barks", " "]) for a in clips}, "en")
        metrics.compute_run_metrics(engine, run)  # utterance scores (high_wer)


@pytest.mark.parametrize("seed", [1, 2])
def test_review_queue_and_dataset_summary_equal_their_0010_definitions(engine: Engine, seed: int) -> None:
    _seed(engine, seed)
    order = "run_id, task, audio_id"
    queue = _rows(engine, "review_queue", order)
    assert queue == _rows(engine, f"({_old_view('review_queue')}) old", order)
    assert {r[1] for r in queue} == {"cry", "asr"}
    assert {reason for r in queue for reason in r[4]} >= {"disagrees_with_gold", "unknown", "high_wer"}
    summary = _rows(engine, "dataset_summary", "name")
    assert summary == _rows(engine, f"({_old_view('dataset_summary')}) old", "name")
    assert [r[5] for r in summary if r[1] == "empty"] == [0]
    # the first 5 of a run, as the bench asks them (the lookups after the sort must match too)
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT max(id) FROM label_run WHERE task = 'cry'")).scalar_one()
        top = "WHERE run_id = :r ORDER BY priority DESC, audio_id LIMIT 5"
        old_queue = f"SELECT * FROM ({_old_view('review_queue')}) old {top}"  # noqa: S608
        new = conn.execute(sa.text(f"SELECT * FROM review_queue {top}"), {"r": run}).all()  # noqa: S608
        old = conn.execute(sa.text(old_queue), {"r": run}).all()
    assert new == old and len(new) == 5
