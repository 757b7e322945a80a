"""The reference of an ASR export row (export._with_manifest_value: picked in the sort by path), against
the rule as two subqueries over every manifest line (tests/export_reference.py, what the export did): the
line naming the row's own path first, else the newest line naming any path with the same bytes. Clips
with several paths, lines on either path, a path with none."""

from __future__ import annotations

import random

import export_reference
import pytest
import sqlalchemy as sa
from review_seed import Job, add_audio, add_references, add_run, add_transcripts
from sqlalchemy.engine import Engine

from qwen_tasks.review import export
from qwen_tasks.store import schema


@pytest.mark.parametrize("seed", [1, 2])
def test_asr_export_references_follow_the_manifest_rule(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    ids = add_audio(engine, 40)
    add_references(engine, {a: (rng.choice(["a cat", "the dog", ""]), "en") for a in rng.sample(ids, 15)})
    add_references(engine, {a: ("newer", "en") for a in rng.sample(ids, 5)}, manifest="/data/asr2.jsonl")
    f = schema.audio_file
    with engine.begin() as conn:
        for k, a in enumerate(rng.sample(ids, 12)):  # second paths, some with their own lines
            file_id = conn.execute(
                f.insert().values(path=f"/mirror/{k}.wav", audio_id=a, status="ok").returning(f.c.id)
            ).scalar_one()
            for line in range(rng.choice([0, 1, 2])):
                conn.execute(
                    schema.manifest_item.insert().values(
                        manifest_path=f"/mirror/asr{k}.jsonl",
                        audio_path=f"/mirror/{k}.wav",
                        line_no=line + 1,
                        audio_file_id=file_id,
                        kind="asr",
                        reference_text=rng.choice(["mirror text", "", f"line {line}"]),
                        language="en",
                    )
                )
    clips = rng.sample(ids, 30)
    run = add_run(engine, "asr", [Job(0, 1, clips, 1.0)])
    add_transcripts(engine, run, {a: "some words" for a in clips}, "en")
    t = schema.transcription
    hashed = export_reference.with_manifest_value(
        sa.select(f.c.path, t.c.audio_id)
        .join(f, sa.and_(f.c.audio_id == t.c.audio_id, f.c.status == "ok"))
        .where(t.c.run_id == run),
        schema.manifest_item.c.reference_text,
        "asr",
        t.c.audio_id,
        "reference",
    ).order_by(f.c.path)
    with engine.connect() as conn:
        expected = [(r.path, r.audio_id, r.reference) for r in conn.execute(hashed)]
    rows = [(r["audio"], r["audio_id"], r["reference"]) for r in export.export_rows(engine, "asr", run)]
    assert rows == expected
    assert any(r[2] is not None for r in rows) and any(r[2] is None for r in rows)
    assert any(r[0].startswith("/mirror/") and r[2] is not None for r in rows)
