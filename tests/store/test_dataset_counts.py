"""dataset_summary and review_queue read from what 0017 keeps by triggers (per-dataset counts,
review_item), against their 0011 definitions (computed at read time, taken from the old migration file as
the reference): after random writes of every kind that moves a count or an item (human labels added /
changed / removed, runs deleted and their purpose changed, answers and utterance scores of new runs, files
quarantined / moved / deleted, manifest gold and references added and removed, clips joining and leaving
datasets, a dataset deleted, TRUNCATE), every row and column is the same."""

from __future__ import annotations

import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from review_seed import Job, add_cry_answers, add_run, add_transcripts
from sqlalchemy.engine import Engine
from test_current_label import add_human
from test_views_0011 import _seed

from qwen_tasks.quality import metrics
from qwen_tasks.store import schema

MIGRATION_0011 = Path(__file__).resolve().parents[2] / "sql" / "migrations" / "0011_sql_at_scale.sql"


def _old_view(name: str) -> str:
    """The SELECT that 0011 gave view `name`."""
    text = MIGRATION_0011.read_text(encoding="utf-8")
    found = re.search(rf"CREATE OR REPLACE VIEW {name} AS\n(.*?);\n", text, re.S)
    assert found is not None, name
    return found.group(1)


def _both(conn: sa.Connection, view: str, rest: str) -> tuple[list[tuple], list[tuple]]:
    """Rows of `view` as 0017 defines it and as 0011 did, each followed by `rest` (ORDER BY ...)."""
    new = [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {view} {rest}"))]  # noqa: S608
    old = [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM ({_old_view(view)}) o {rest}"))]  # noqa: S608
    return new, old


def _assert_same(engine: Engine) -> list[tuple]:
    """The kept views equal their 0011 definitions; returns the review queue."""
    with engine.connect() as conn:
        new, old = _both(conn, "dataset_summary", "ORDER BY name")
        queue, old_queue = _both(conn, "review_queue", "ORDER BY run_id, task, audio_id")
        # the first items of the latest runs, as review_queue.sql asks (lookups after the sort and limit)
        first, old_first = _both(
            conn, "review_queue", "WHERE is_latest_run ORDER BY priority DESC, audio_id, task LIMIT 7"
        )
    assert queue == old_queue
    assert first == old_first
    # audio_seconds: summed exactly (numeric) here, as float8 in some order there
    assert [r[:6] + r[7:] for r in new] == [r[:6] + r[7:] for r in old]
    assert [r[6] for r in new] == pytest.approx([r[6] for r in old], rel=1e-12)
    return queue


def _audio_ids(conn: sa.Connection) -> list[int]:
    return list(conn.execute(sa.text("SELECT id FROM audio ORDER BY id")).scalars())


def _random_write(engine: Engine, rng: random.Random, step: int) -> str:
    f = schema.audio_file
    kind = rng.choice(
        [
            "human",
            "human_delete",
            "run_delete",
            "purpose",
            "new_run",
            "file",
            "manifest",
            "member",
            "unmember",
        ]
    )
    with engine.begin() as conn:
        ids = _audio_ids(conn)
        datasets = list(conn.execute(sa.text("SELECT id FROM dataset ORDER BY id")).scalars())
        if kind == "human_delete":
            conn.execute(sa.text("DELETE FROM human_label WHERE id IN (SELECT id FROM human_label LIMIT 3)"))
        elif kind == "run_delete":
            conn.execute(sa.text("DELETE FROM label_run WHERE id = (SELECT min(id) FROM label_run)"))
        elif kind == "purpose":
            conn.execute(
                sa.text(
                    "UPDATE label_run SET purpose = "
                    "CASE WHEN purpose = 'label' THEN 'evaluation' ELSE 'label' END "
                    "WHERE id = (SELECT id FROM label_run ORDER BY random() LIMIT 1)"
                )
            )
        elif kind == "file":
            row = conn.execute(sa.select(f.c.id, f.c.audio_id, f.c.status).order_by(sa.func.random())).first()
            if row.status == "ok" and rng.random() < 0.5:  # marked missing
                conn.execute(f.update().where(f.c.id == row.id).values(status="missing", audio_id=None))
            elif row.status == "ok":  # the path now holds another clip
                conn.execute(f.update().where(f.c.id == row.id).values(audio_id=rng.choice(ids)))
            else:  # readable again
                conn.execute(f.update().where(f.c.id == row.id).values(status="ok", audio_id=rng.choice(ids)))
            conn.execute(
                f.insert().values(path=f"/data/new/{step}.wav", audio_id=rng.choice(ids), status="ok")
            )
            if rng.random() < 0.3:
                conn.execute(
                    f.delete().where(
                        f.c.id == row.id,
                        ~f.c.id.in_(
                            sa.select(schema.manifest_item.c.audio_file_id).where(
                                schema.manifest_item.c.audio_file_id.is_not(None)
                            )
                        ),
                    )
                )
        elif kind == "manifest":
            file_id = conn.execute(
                sa.select(f.c.id).where(f.c.audio_id.is_not(None)).order_by(sa.func.random())
            ).scalar()
            if rng.random() < 0.5:
                conn.execute(
                    schema.manifest_item.insert().values(
                        manifest_path=f"/data/m{step}.jsonl",
                        audio_path="x.wav",
                        line_no=1,
                        audio_file_id=file_id,
                        kind="aqa",
                        gold_label=rng.choice(["yes", "no"]),
                        question="Is there a baby crying?",
                    )
                )
            else:
                conn.execute(
                    sa.text("DELETE FROM manifest_item WHERE id = (SELECT max(id) FROM manifest_item)")
                )
        elif kind == "member":
            conn.execute(
                schema.dataset_audio.insert().from_select(
                    ["dataset_id", "audio_id"],
                    sa.select(sa.literal(rng.choice(datasets)), schema.audio.c.id)
                    .where(schema.audio.c.id.in_(rng.sample(ids, 5)))
                    .except_(sa.select(schema.dataset_audio.c.dataset_id, schema.dataset_audio.c.audio_id)),
                )
            )
        elif kind == "unmember":
            conn.execute(
                sa.text(
                    "DELETE FROM dataset_audio WHERE (dataset_id, audio_id) IN "
                    "(SELECT dataset_id, audio_id FROM dataset_audio ORDER BY random() LIMIT 4)"
                )
            )
    if kind == "human":
        add_human(engine, {a: rng.choice(["yes", "no", "unknown"]) for a in rng.sample(ids, 3)})
        add_human(engine, {rng.choice(ids): "human text"}, task="asr")
    elif kind == "new_run":
        clips = rng.sample(ids, 10)
        if rng.random() < 0.5:
            run = add_run(engine, "cry", [Job(0, 1, clips, 1.0)])
            add_cry_answers(
                engine,
                run,
                score={a: rng.random() for a in clips if rng.random() < 0.8},
                generate={
                    a: rng.choice([("Yes.", "yes"), ("No.", "no"), ("Hmm.", "unknown")]) for a in clips
                },
            )
        else:
            run = add_run(engine, "asr", [Job(0, 1, clips, 1.0)])
            add_transcripts(engine, run, {a: rng.choice(["a cat", "the dog", " "]) for a in clips}, "en")
            metrics.compute_run_metrics(engine, run)  # utterance scores (high_wer)
    return kind


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kept_counts_and_review_items_follow_random_writes(engine: Engine, seed: int) -> None:
    _seed(engine, seed)
    _assert_same(engine)
    rng = random.Random(seed)
    done: set[str] = set()
    tasks: set[str] = set()
    for step in range(40):
        done.add(_random_write(engine, rng, step))
        tasks |= {r[1] for r in _assert_same(engine)}
    assert len(done) == 9
    assert tasks == {"cry", "asr"}
    with engine.begin() as conn:  # a dataset deleted takes its counts with it
        conn.execute(sa.text("DELETE FROM dataset WHERE name = 'first'"))
        conn.execute(sa.text("SELECT dataset_count_compact()"))
    _assert_same(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE human_label"))
    _assert_same(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE utterance_score"))
    _assert_same(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sum(clips) FROM dataset_summary")).scalar_one() > 0


def test_concurrent_writers_keep_counts_and_items_right(engine: Engine) -> None:
    """Workers writing answers of two runs, a reviewer, an ingest adding members and a file going missing,
    all at once on the same clips (each in its own transaction, started together): no deadlock (locks
    are taken in one order), and the kept views still equal their 0011 definitions."""
    _seed(engine, 4)
    with engine.connect() as conn:
        ids = _audio_ids(conn)
        datasets = list(conn.execute(sa.text("SELECT id FROM dataset ORDER BY id")).scalars())
    clips = ids[5:30]
    runs = [add_run(engine, "cry", [Job(0, 1, clips, 1.0)]) for _ in range(2)]
    barrier = threading.Barrier(5)
    f = schema.audio_file

    def answers(run: int) -> None:
        with engine.begin() as conn:
            barrier.wait()
            conn.execute(
                schema.cry_answer.insert(),
                [
                    {"run_id": run, "audio_id": a, "method": "score", "p_yes": (a % 10) / 10,
                     "label": "yes" if a % 10 >= 5 else "no", "threshold": 0.5}
                    for a in sorted(clips, reverse=run % 2 == 0)
                ],
            )  # fmt: skip

    def review() -> None:
        with engine.begin() as conn:
            barrier.wait()
            conn.execute(  # one statement, as review-import writes a page of annotations
                sa.text(
                    "INSERT INTO human_label (audio_id, task, label, reviewer) "
                    "SELECT a, 'cry', 'yes', 'ann' FROM unnest(CAST(:ids AS bigint[])) a "
                    "WHERE NOT EXISTS (SELECT 1 FROM human_label h WHERE h.audio_id = a AND h.task = 'cry')"
                ),
                {"ids": list(reversed(clips[::3]))},
            )

    def members() -> None:
        with engine.begin() as conn:
            barrier.wait()
            conn.execute(
                sa.text(
                    "INSERT INTO dataset_audio (dataset_id, audio_id) "
                    "SELECT :d, unnest(CAST(:ids AS bigint[])) "
                    "ON CONFLICT DO NOTHING"
                ),
                {"d": datasets[-1], "ids": clips},
            )

    def missing() -> None:
        with engine.begin() as conn:
            barrier.wait()
            conn.execute(
                f.update().where(f.c.audio_id.in_(clips[1::4])).values(status="missing", audio_id=None)
            )

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(answers, runs[0]), pool.submit(answers, runs[1]), pool.submit(review),
                   pool.submit(members), pool.submit(missing)]  # fmt: skip
        for future in futures:
            future.result()  # a deadlock would raise here
    _assert_same(engine)
