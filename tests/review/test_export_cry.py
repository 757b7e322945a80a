"""The cry export read from `cry_run_clip` (0018, kept by triggers) against the export as it was built
before (issue 26; tests/export_reference.py): the run's score and generate answers scanned from
`cry_answer` and fully joined, gold by the manifest rule as two DISTINCT ON subqueries. Both go through
the same JSON line builder (`export._lines`), so the COPY text must be byte for byte the reference's:
same lines, same order, same keys and values. The seed covers clips with one method only, calibrated
score answers, several windows on either method, whole and non-ASCII values, clips at several paths (a
mirror with its own gold line, or without), answers of another run on the same clips, an answer changed
after it was written, and a dataset scope."""

from __future__ import annotations

import io
import json
import random

import export_reference
import pytest
import sqlalchemy as sa
from review_seed import Job, add_audio, add_cry_answers, add_gold, add_run
from sqlalchemy.engine import Engine

from qwen_tasks.review import export
from qwen_tasks.store import schema


def _seed(engine: Engine, seed: int) -> tuple[int, int]:
    """(the cry run to export, a dataset of some of its clips)."""
    rng = random.Random(seed)
    ids = add_audio(engine, 60)
    add_gold(engine, {a: rng.choice(["yes", "no"]) for a in ids[:40]})
    add_gold(engine, {a: "yes" for a in rng.sample(ids[:40], 5)}, manifest="/data/cry2.jsonl")  # newer lines
    f, a = schema.audio_file, schema.cry_answer
    with engine.begin() as conn:
        for k, clip in enumerate(rng.sample(ids, 15)):  # second paths, some with their own gold line
            path = f"/mirror/b\u00e9b\u00e9 {k}.wav" if k % 3 else f"/aaa/{k}.wav"  # before and after /data
            file_id = conn.execute(
                f.insert().values(path=path, audio_id=clip, status="ok").returning(f.c.id)
            ).scalar_one()
            if k % 2:
                conn.execute(
                    schema.manifest_item.insert().values(
                        manifest_path="/mirror/cry.jsonl",
                        line_no=k + 1,
                        kind="aqa",
                        audio_path=path,
                        audio_file_id=file_id,
                        question="Is there a baby crying in this audio?",
                        gt="No",
                        gold_label=rng.choice(["no", None]),
                    )
                )
        conn.execute(f.insert().values(path="/data/bad.wav", status="quarantined", reason="not audio"))
        dataset_id = conn.execute(
            schema.dataset.insert().values(name="some", tasks=["cry"]).returning(schema.dataset.c.id)
        ).scalar_one()
        members = [{"dataset_id": dataset_id, "audio_id": c} for c in ids[::3]]
        conn.execute(schema.dataset_audio.insert(), members)
    other = add_run(engine, "cry", [Job(0, 10, ids, 5.0)])
    add_cry_answers(engine, other, score={c: 0.9 for c in ids}, generate={c: ("Other.", "no") for c in ids})
    run_id = add_run(engine, "cry", [Job(0, 10, ids[:55], 5.0)])
    p_values = [0.0, 0.05, 0.3, 0.5, 0.55, 0.9, 1.0]  # whole numbers on purpose (PostgreSQL writes 1, 0)
    add_cry_answers(
        engine,
        run_id,
        score={c: rng.choice(p_values) for c in ids[:55] if rng.random() < 0.75},
        generate={
            c: rng.choice([("Yes.", "yes"), ("No.", "no"), ('"\u662f\u7684"\n', "unknown")])
            for c in ids[10:55]
            if rng.random() < 0.8
        },
    )
    with engine.begin() as conn:
        rule = conn.execute(
            schema.decision_calibration.insert()
            .values(
                model="m",
                prompt_template="t",
                method="platt",
                threshold=0.375,
                objective="max_f1",
                n_labels=30,
                n_yes=15,
            )
            .returning(schema.decision_calibration.c.id)
        ).scalar_one()
        conn.execute(  # score answers decided by a calibrated rule
            a.update()
            .where(a.c.run_id == run_id, a.c.method == "score", a.c.audio_id.in_(ids[5:25]))
            .values(calibration_id=rule, threshold=0.375, p_calibrated=a.c.p_yes / 2 + 0.0625)
        )
        windows = [{"start_s": 0, "p_yes": 0.25}, {"start_s": 30, "p_yes": 0.125}]
        for method in ("score", "generate"):  # several windows on either method, one window on some
            for value, n in ((windows, 20), (windows[:1], 10)):
                conn.execute(
                    a.update()
                    .where(a.c.run_id == run_id, a.c.method == method, a.c.audio_id.in_(rng.sample(ids, n)))
                    .values(windows=value)
                )
        conn.execute(  # generate answers with a p_yes (exported where no score answer exists)
            a.update()
            .where(a.c.run_id == run_id, a.c.method == "generate", a.c.audio_id.in_(rng.sample(ids, 25)))
            .values(p_yes=0.75)
        )
        conn.execute(  # an answer changed after it was written: the export reads it as it is now
            a.update()
            .where(a.c.run_id == run_id, a.c.method == "score", a.c.audio_id == ids[30])
            .values(p_yes=0.125, label="no", threshold=0.25)
        )
    return run_id, dataset_id


@pytest.mark.parametrize("seed", [1, 2])
def test_cry_export_is_the_reference_byte_for_byte(engine: Engine, seed: int) -> None:
    run_id, dataset_id = _seed(engine, seed)
    with engine.connect() as conn:
        run = conn.execute(sa.select(schema.label_run).where(schema.label_run.c.id == run_id)).one()
    for scope_id, dataset in ((None, None), (dataset_id, "some")):
        with engine.connect() as conn:
            want = [
                line
                for (line,) in conn.execute(export._lines(run, export_reference.cry_query(run_id, scope_id)))
            ]
        copied = io.StringIO()  # what `qwen-tasks export` writes
        assert export.export_copy(engine, "cry", run_id, dataset)(copied) == len(want)
        assert copied.getvalue() == "".join(line + "\n" for line in want)
        assert list(export.export_lines(engine, "cry", run_id, dataset)) == want
        assert list(export.export_rows(engine, "cry", run_id, dataset)) == [json.loads(x) for x in want]
        rows = [json.loads(x) for x in want]
        if scope_id is None:  # the seed reached what it means to cover
            assert len(rows) > 50 and any(r["audio"].startswith("/mirror/") for r in rows)
            assert any("calibration_id" in r for r in rows) and any("windows" in r for r in rows)
            assert any("answer" not in r for r in rows) and any("threshold" not in r for r in rows)
            assert any(r["gold"] is None for r in rows) and any(r["gold"] == "no" for r in rows)
        else:
            assert 0 < len(rows) < 30
