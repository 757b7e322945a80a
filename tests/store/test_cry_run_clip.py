"""cry_run_clip (0018: per cry run and clip, both methods' answers, the gold label and the manifest source,
kept by triggers) against the same rows computed from scratch in Python from cry_answer, cry_gold and
manifest_item: after the seed, after each of 40 random writes of every kind that moves a row (answers of
new runs, answers relabelled or deleted, human labels added / changed / removed, runs deleted, files
moved / quarantined / deleted, manifest gold and sources added and removed, dataset membership), after
TRUNCATE of a source table (rebuilt), and under concurrent writers."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import sqlalchemy as sa
from review_seed import Job, add_cry_answers, add_run
from sqlalchemy.engine import Engine
from test_dataset_counts import _assert_same, _audio_ids, _random_write
from test_views_0011 import _seed

from qwen_tasks.quality import metrics
from qwen_tasks.store import schema

COLUMNS = [c.name for c in schema.cry_run_clip.columns]


def _from_scratch(conn: sa.Connection) -> dict[tuple[int, int], tuple]:
    """(run_id, audio_id) -> the row cry_run_clip should hold, computed here from the source tables."""
    a, mi, af = schema.cry_answer.c, schema.manifest_item.c, schema.audio_file.c
    gold = dict(conn.execute(sa.select(schema.cry_gold.c.audio_id, schema.cry_gold.c.gold_label)).all())
    source: dict[int, tuple[int, str]] = {}  # audio_id -> (line id, source) of its latest aqa line with one
    lines = sa.select(af.audio_id, mi.id, mi.source).join(
        schema.audio_file, schema.audio_file.c.id == mi.audio_file_id
    )
    for audio_id, line_id, src in conn.execute(
        lines.where(mi.kind == "aqa", mi.source.is_not(None), af.audio_id.is_not(None))
    ):
        if audio_id not in source or source[audio_id][0] < line_id:
            source[audio_id] = (line_id, src)
    parts: dict[tuple[int, int], dict[str, object]] = defaultdict(dict)
    for r in conn.execute(
        sa.select(a.run_id, a.audio_id, a.method, a.label, a.p_yes, a.threshold, a.p_calibrated, a.truncated)
    ):
        p = "s" if r.method == "score" else "g"
        row = parts[(r.run_id, r.audio_id)]
        row.update({f"{p}_label": r.label, f"{p}_p": r.p_yes, f"{p}_threshold": r.threshold})
        row[f"{p}_calibrated"] = r.p_calibrated
        if p == "g":
            row["g_truncated"] = r.truncated
    out = {}
    for (run_id, audio_id), row in parts.items():
        row.update(run_id=run_id, audio_id=audio_id, gold_label=gold.get(audio_id))
        row["source"] = source.get(audio_id, (None, None))[1]
        out[(run_id, audio_id)] = tuple(row.get(c) for c in COLUMNS)
    return out


def _assert_kept(engine: Engine) -> int:
    """The table equals the from-scratch rows (and the rows function of its refresh); returns its size."""
    t = schema.cry_run_clip
    with engine.connect() as conn:
        kept = {(r.run_id, r.audio_id): tuple(r) for r in conn.execute(sa.select(t))}
        fresh = {
            (r.run_id, r.audio_id): tuple(r)
            for r in conn.execute(sa.text("SELECT * FROM cry_run_clip_rows(ARRAY(SELECT id FROM audio))"))
        }
        expected = _from_scratch(conn)
    assert kept == expected
    assert fresh == expected
    return len(kept)


def _relabel(engine: Engine, rng: random.Random) -> str:
    """Answers changed in place (a calibration applied, a label corrected) or deleted."""
    with engine.begin() as conn:
        if rng.random() < 0.5:
            conn.execute(
                sa.text(
                    "UPDATE cry_answer SET label = CASE label WHEN 'yes' THEN 'no' ELSE 'yes' END, "
                    "p_calibrated = CASE WHEN method = 'score' THEN 0.25 END, truncated = NOT truncated "
                    "WHERE id IN (SELECT id FROM cry_answer ORDER BY random() LIMIT 5)"
                )
            )
            return "answer_update"
        conn.execute(
            sa.text(
                "DELETE FROM cry_answer WHERE id IN (SELECT id FROM cry_answer ORDER BY random() LIMIT 4)"
            )
        )
        return "answer_delete"


def _source(engine: Engine, rng: random.Random, step: int) -> str:
    """An audio-QA line with a source (and gold) added for some file, or a source changed."""
    f = schema.audio_file
    with engine.begin() as conn:
        file_id = conn.execute(
            sa.select(f.c.id).where(f.c.audio_id.is_not(None)).order_by(sa.func.random())
        ).scalar()
        if rng.random() < 0.6:
            conn.execute(
                schema.manifest_item.insert().values(
                    manifest_path=f"/data/s{step}.jsonl",
                    audio_path="x.wav",
                    line_no=1,
                    audio_file_id=file_id,
                    kind="aqa",
                    gold_label=rng.choice(["yes", "no", None]),
                    source=rng.choice(["youtube", "studio"]),
                    question="Is there a baby crying?",
                )
            )
        else:
            conn.execute(
                sa.text(
                    "UPDATE manifest_item "
                    "SET source = CASE WHEN source = 'studio' THEN NULL ELSE 'studio' END "
                    "WHERE id = (SELECT max(id) FROM manifest_item WHERE kind = 'aqa')"
                )
            )
    return "source"


@pytest.mark.parametrize("seed", [1, 2])
def test_kept_run_clips_follow_random_writes(engine: Engine, seed: int) -> None:
    _seed(engine, seed)
    assert _assert_kept(engine) > 0
    rng = random.Random(seed)
    done: set[str] = set()
    for step in range(40):
        roll = rng.random()
        if roll < 0.2:
            done.add(_relabel(engine, rng))
        elif roll < 0.35:
            done.add(_source(engine, rng, step))
        else:
            done.add(_random_write(engine, rng, step))
        _assert_kept(engine)
    assert {"answer_update", "answer_delete", "source", "human", "human_delete", "run_delete", "file",
            "manifest", "new_run"} <= done  # fmt: skip
    _assert_same(engine)  # 0017's tables are still right with the rewritten review_item_refresh
    for table in ("human_label", "manifest_item", "cry_answer"):
        with engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {table} CASCADE"))  # noqa: S608  (a name from the tuple)
        _assert_kept(engine)


def test_metrics_from_kept_clips_equal_the_rows_in_python(engine: Engine) -> None:
    """After relabels and human labels, the stored figures (aggregated from cry_run_clip) are those of
    the Python reference over the run's answers joined to cry_gold."""
    _seed(engine, 7)
    rng = random.Random(7)
    with engine.connect() as conn:
        ids = _audio_ids(conn)
    run = add_run(engine, "cry", [Job(0, 1, ids[:30], 1.0)])
    add_cry_answers(
        engine,
        run,
        score={a: rng.random() for a in ids[:30] if rng.random() < 0.8},
        generate={a: rng.choice([("Yes.", "yes"), ("No.", "no"), ("Hmm.", "unknown")]) for a in ids[:30]},
    )
    for _ in range(3):
        _relabel(engine, rng)
        _random_write(engine, rng, 100)
    with engine.begin() as conn:
        groups = metrics._cry_group_metrics(conn, run)
        rows = metrics._cry_rows(conn, run)
    reference = metrics._Metrics()
    metrics._cry_metrics(rows, reference)
    assert groups[metrics.WHOLE_RUN].values == pytest.approx(reference.values)
    assert groups[metrics.WHOLE_RUN].details == reference.details
