"""current_label (0010) against the definition latest_label had before it (0004's query, kept here as
the reference): after every kind of write (answers of newer and older runs, score after generate,
evaluation runs, human labels added / changed / removed, answers deleted with their run, a run's purpose
changed, TRUNCATE, and (0011) the clip's files added, moved, quarantined, marked missing or deleted), the
table and the view say what the old read-time query says."""

from __future__ import annotations

import random

import sqlalchemy as sa
from review_seed import Job, add_audio, add_cry_answers, add_run, add_transcripts
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine

from qwen_tasks.store import schema

# latest_label as 0004 defined it: recomputed over every answer at read time.
REFERENCE = """
WITH model_cry AS (
    SELECT DISTINCT ON (c.audio_id)
        c.audio_id, 'cry'::text AS task, c.label, NULL::text AS text, c.p_yes, c.run_id, c.method
    FROM cry_answer c
    JOIN label_run lr ON lr.id = c.run_id AND lr.purpose = 'label'
    ORDER BY c.audio_id, c.run_id DESC, (c.method = 'score') DESC
), model_asr AS (
    SELECT DISTINCT ON (t.audio_id)
        t.audio_id, 'asr'::text AS task, NULL::text AS label, t.text, NULL::double precision AS p_yes,
        t.run_id, NULL::text AS method
    FROM transcription t
    JOIN label_run lr ON lr.id = t.run_id AND lr.purpose = 'label'
    ORDER BY t.audio_id, t.run_id DESC
), model AS (
    SELECT * FROM model_cry UNION ALL SELECT * FROM model_asr
)
SELECT
    coalesce(h.audio_id, m.audio_id) AS audio_id, coalesce(h.task, m.task) AS task,
    CASE WHEN h.id IS NOT NULL THEN h.label ELSE m.label END AS label,
    CASE WHEN h.id IS NOT NULL THEN h.text ELSE m.text END AS text,
    CASE WHEN h.id IS NOT NULL THEN 'human' ELSE 'model' END AS source,
    m.label AS model_label, m.text AS model_text, m.p_yes, m.method, m.run_id, r.model, r.prompt_version,
    h.reviewer,
    (SELECT f.path FROM audio_file f WHERE f.audio_id = coalesce(h.audio_id, m.audio_id) AND f.status = 'ok'
     ORDER BY f.id LIMIT 1) AS path
FROM model m
FULL JOIN human_label h ON h.audio_id = m.audio_id AND h.task = m.task
LEFT JOIN label_run r ON r.id = m.run_id
ORDER BY 1, 2
"""


def add_human(engine: Engine, labels: dict[int, str], task: str = "cry", reviewer: str = "tester") -> None:
    """Upsert human labels (label for cry, text for asr), as the Label Studio import does."""
    with engine.begin() as conn:
        for audio_id, value in labels.items():
            stmt = pg_insert(schema.human_label).values(
                audio_id=audio_id,
                task=task,
                label=value if task == "cry" else None,
                text=value if task == "asr" else None,
                reviewer=reviewer,
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["audio_id", "task"],
                    set_={"label": stmt.excluded.label, "text": stmt.excluded.text, "reviewer": reviewer},
                )
            )


def _same(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        want = [tuple(r) for r in conn.execute(sa.text(REFERENCE))]
        got = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM latest_label ORDER BY audio_id, task"))]
    assert got == want
    return got


def test_current_label_follows_every_write(engine: Engine) -> None:
    ids = add_audio(engine, 6)
    old = add_run(engine, "cry", [Job(0, 1, ids[:4], 1.0)])
    add_cry_answers(engine, old, generate={ids[0]: ("Yes.", "yes"), ids[1]: ("No.", "no")})
    rows = _same(engine)
    assert [(r[0], r[2], r[8]) for r in rows] == [(ids[0], "yes", "generate"), (ids[1], "no", "generate")]
    # the score answer of the same run, written after the generate one, wins
    add_cry_answers(engine, old, score={ids[0]: 0.2, ids[2]: 0.9})
    _same(engine)
    new = add_run(engine, "cry", [Job(0, 1, ids[1:3], 1.0)])
    add_cry_answers(engine, new, generate={ids[1]: ("Yes, crying.", "yes")}, score={ids[2]: 0.1})
    rows = _same(engine)
    assert {r[0]: r[9] for r in rows} == {ids[0]: old, ids[1]: new, ids[2]: new}
    # an evaluation run's answers are no label (until its purpose changes)
    with engine.begin() as conn:
        older = conn.execute(
            schema.label_run.insert()
            .values(task="cry", model="m", prompt_version="v0", purpose="evaluation")
            .returning(schema.label_run.c.id)
        ).scalar_one()
    add_cry_answers(engine, older, score={ids[3]: 0.7})  # evaluation run: not a label
    _same(engine)
    with engine.begin() as conn:  # the evaluation run becomes a production one, then back
        conn.execute(schema.label_run.update().where(schema.label_run.c.id == older).values(purpose="label"))
    assert any(r[0] == ids[3] for r in _same(engine))
    with engine.begin() as conn:
        conn.execute(
            schema.label_run.update().where(schema.label_run.c.id == older).values(purpose="evaluation")
        )
    _same(engine)
    # human labels: added (also where no model label exists), changed, removed
    add_human(engine, {ids[1]: "no", ids[5]: "yes"}, reviewer="ann")
    rows = _same(engine)
    assert {r[0]: r[4] for r in rows}[ids[5]] == "human"
    add_human(engine, {ids[1]: "unknown"}, reviewer="bob")
    _same(engine)
    with engine.begin() as conn:
        conn.execute(schema.human_label.delete().where(schema.human_label.c.audio_id.in_([ids[1], ids[5]])))
    rows = _same(engine)
    assert ids[5] not in {r[0] for r in rows}
    # answers updated, then deleted with their run (ON DELETE CASCADE)
    with engine.begin() as conn:
        conn.execute(
            schema.cry_answer.update().where(schema.cry_answer.c.run_id == new).values(label="unknown")
        )
    _same(engine)
    with engine.begin() as conn:
        conn.execute(schema.label_run.delete().where(schema.label_run.c.id == new))
    rows = _same(engine)
    assert {r[0]: r[9] for r in rows} == {ids[0]: old, ids[1]: old, ids[2]: old}
    # ASR: newest run wins; human transcript over it
    asr1 = add_run(engine, "asr", [Job(0, 1, ids[:2], 1.0)])
    add_transcripts(engine, asr1, {ids[0]: "one", ids[1]: "two"})
    asr2 = add_run(engine, "asr", [Job(0, 1, ids[1:2], 1.0)])
    add_transcripts(engine, asr2, {ids[1]: "two again"})
    add_human(engine, {ids[0]: "the one"}, task="asr", reviewer="ann")
    rows = _same(engine)
    assert {(r[0], r[1]): r[3] for r in rows}[(ids[1], "asr")] == "two again"
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE transcription"))
    rows = _same(engine)
    assert {(r[0], r[1]): r[4] for r in rows if r[1] == "asr"} == {(ids[0], "asr"): "human"}


def test_current_label_random_writes_match_the_old_view(engine: Engine) -> None:
    rng = random.Random(7)
    ids = add_audio(engine, 30)
    for k in range(6):
        clips = rng.sample(ids, 12)
        run = add_run(engine, "cry", [Job(0, 1, clips, 1.0)])
        scored = {a: rng.random() for a in clips if rng.random() < 0.6}
        generated = {a: rng.choice([("Yes.", "yes"), ("No.", "no"), ("?", "unknown")]) for a in clips}
        if k % 2:
            add_cry_answers(engine, run, generate=generated)
            add_cry_answers(engine, run, score=scored)
        else:
            add_cry_answers(engine, run, score=scored, generate=generated)
        add_human(engine, {a: rng.choice(["yes", "no", "unknown"]) for a in rng.sample(ids, 3)})
        _same(engine)


def test_current_label_path_follows_audio_file(engine: Engine) -> None:
    """The path kept in current_label (0011) follows every change of audio_file: a second path with a
    lower or higher id, a move, quarantine / missing (audio_id cleared), deletion, a re-scan that rewrites
    the same values (an upsert), and a clip whose only path goes away."""
    ids = add_audio(engine, 4)
    run = add_run(engine, "cry", [Job(0, 1, ids, 1.0)])
    add_cry_answers(engine, run, score={a: 0.5 for a in ids})
    add_human(engine, {ids[3]: "yes"})
    f = schema.audio_file
    _same(engine)

    def write(stmt: sa.Executable) -> list[tuple]:
        with engine.begin() as conn:
            conn.execute(stmt)
        return _same(engine)

    paths = {
        r[0]: r[13] for r in write(f.insert().values(path="/data/b/second.wav", audio_id=ids[0], status="ok"))
    }
    assert paths[ids[0]] == "/data/audio/clip_000.wav"  # the first ok path stays first
    rows = write(f.update().where(f.c.path == "/data/audio/clip_000.wav").values(path="/data/moved.wav"))
    assert {r[0]: r[13] for r in rows}[ids[0]] == "/data/moved.wav"
    rows = write(
        f.update()
        .where(f.c.path == "/data/moved.wav")
        .values(status="quarantined", reason="garbled", audio_id=None)
    )
    assert {r[0]: r[13] for r in rows}[ids[0]] == "/data/b/second.wav"
    rows = write(f.update().where(f.c.audio_id == ids[1]).values(status="missing", audio_id=None))
    assert {r[0]: r[13] for r in rows}[ids[1]] is None
    rows = write(
        f.update().where(f.c.path == "/data/moved.wav").values(status="ok", reason=None, audio_id=ids[0])
    )
    assert {r[0]: r[13] for r in rows}[ids[0]] == "/data/moved.wav"
    rows = write(f.delete().where(f.c.path == "/data/audio/clip_003.wav"))
    assert {r[0]: r[13] for r in rows}[ids[3]] is None
    # an upsert rewriting every row with its own values (an ingest re-scan), then one moving a clip
    upsert = pg_insert(f).from_select(
        ["path", "audio_id", "status", "reason"], sa.select(f.c.path, f.c.audio_id, f.c.status, f.c.reason)
    )
    upsert = upsert.on_conflict_do_update(
        index_elements=["path"], set_={"audio_id": upsert.excluded.audio_id, "status": upsert.excluded.status}
    )
    write(upsert)
    rows = write(
        pg_insert(f)
        .values(path="/data/audio/clip_002.wav", audio_id=ids[1], status="ok")
        .on_conflict_do_update(index_elements=["path"], set_={"audio_id": ids[1]})
    )
    assert {r[0]: r[13] for r in rows}[ids[1]] == "/data/audio/clip_002.wav"
    assert {r[0]: r[13] for r in rows}[ids[2]] is None
