"""dataset_summary read from the counts 0017 keeps by triggers, against 0011's definition (every member
clip joined to each fact at read time, taken from the old migration file as the reference): after random
writes of every kind that moves a count (human labels added / changed / removed, runs deleted and their
purpose changed, answers of new runs, files quarantined / moved / deleted, manifest gold and references
added and removed, clips joining and leaving datasets, a dataset deleted, TRUNCATE), every row and column
is the same."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from review_seed import Job, add_cry_answers, add_run, add_transcripts
from sqlalchemy.engine import Engine
from test_current_label import add_human
from test_views_0011 import _seed

from qwen_tasks.store import schema

MIGRATION_0011 = Path(__file__).resolve().parents[2] / "sql" / "migrations" / "0011_sql_at_scale.sql"


def _old_summary() -> str:
    text = MIGRATION_0011.read_text(encoding="utf-8")
    found = re.search(r"CREATE OR REPLACE VIEW dataset_summary AS\n(.*?);\n", text, re.S)
    assert found is not None
    return found.group(1)


def _assert_same(engine: Engine) -> None:
    with engine.connect() as conn:
        new = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM dataset_summary ORDER BY name"))]
        old = [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM ({_old_summary()}) o ORDER BY name"))]  # noqa: S608
    # audio_seconds: summed exactly (numeric) here, as float8 in some order there
    assert [r[:6] + r[7:] for r in new] == [r[:6] + r[7:] for r in old]
    assert [r[6] for r in new] == pytest.approx([r[6] for r in old], rel=1e-12)


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
            add_cry_answers(engine, run, score={a: rng.random() for a in clips})
        else:
            run = add_run(engine, "asr", [Job(0, 1, clips, 1.0)])
            add_transcripts(engine, run, {a: "a cat" for a in clips}, "en")
    return kind


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dataset_summary_counts_follow_random_writes(engine: Engine, seed: int) -> None:
    _seed(engine, seed)
    _assert_same(engine)
    rng = random.Random(seed)
    done = set()
    for step in range(40):
        done.add(_random_write(engine, rng, step))
        _assert_same(engine)
    assert len(done) == 9
    with engine.begin() as conn:  # a dataset deleted takes its counts with it
        conn.execute(sa.text("DELETE FROM dataset WHERE name = 'first'"))
        conn.execute(sa.text("SELECT dataset_count_compact()"))
    _assert_same(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE human_label"))
    _assert_same(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sum(clips) FROM dataset_summary")).scalar_one() > 0
