"""What `qwen-tasks export` selected before issue 26's last change, kept as the tests' reference (not a
test module): the manifest rule as two DISTINCT ON subqueries (newest line per path, newest line per
clip) joined on their keys, and a cry run's rows as the full join of its score and generate answers
scanned from `cry_answer`. The export now reads `cry_run_clip` and picks the manifest line in its sort
by path (qwen_tasks/review/export.py); its output must stay these queries' byte for byte."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from qwen_tasks.ingest import datasets
from qwen_tasks.store.schema import audio_file, cry_answer, manifest_item


def with_manifest_value(
    query: sa.Select, column: sa.Column, kind: str, audio_id: Any, label: str
) -> sa.Select:
    """`query` (which selects from audio_file) with the manifest's value for each row's path as `label`:
    the line naming this very path first, else the newest line naming any path with the same bytes."""
    mf = audio_file.alias("mf")
    lines = (
        sa.select(manifest_item.c.audio_file_id, mf.c.audio_id, manifest_item.c.id, column.label("value"))
        .join(mf, mf.c.id == manifest_item.c.audio_file_id)
        .where(manifest_item.c.kind == kind, column.is_not(None))
        .subquery()
    )
    by_path = (
        sa.select(lines.c.audio_file_id, lines.c.value)
        .distinct(lines.c.audio_file_id)
        .order_by(lines.c.audio_file_id, lines.c.id.desc())
        .subquery("by_path")
    )
    by_audio = (
        sa.select(lines.c.audio_id, lines.c.value)
        .where(lines.c.audio_id.is_not(None))
        .distinct(lines.c.audio_id)
        .order_by(lines.c.audio_id, lines.c.id.desc())
        .subquery("by_audio")
    )
    return (
        query.add_columns(sa.func.coalesce(by_path.c.value, by_audio.c.value).label(label))
        .outerjoin(by_path, by_path.c.audio_file_id == audio_file.c.id)
        .outerjoin(by_audio, by_audio.c.audio_id == audio_id)
    )


def cry_query(run_id: int, dataset_id: int | None = None) -> sa.Select:
    """A cry run's export rows (the columns export._lines encodes), unordered."""
    a, f = cry_answer, audio_file
    score = sa.select(a).where(a.c.run_id == run_id, a.c.method == "score").subquery("s")
    gen = sa.select(a).where(a.c.run_id == run_id, a.c.method == "generate").subquery("g")
    audio_id = sa.func.coalesce(score.c.audio_id, gen.c.audio_id)
    query = (
        sa.select(
            f.c.path,
            audio_id.label("audio_id"),
            score.c.p_yes.label("score_p_yes"),
            score.c.label.label("score_label"),
            score.c.threshold,
            score.c.calibration_id,
            score.c.p_calibrated,
            score.c.windows.label("score_windows"),
            gen.c.raw_answer,
            gen.c.p_yes.label("gen_p_yes"),
            gen.c.label.label("gen_label"),
            gen.c.windows.label("gen_windows"),
        )
        .select_from(score.outerjoin(gen, gen.c.audio_id == score.c.audio_id, full=True))
        .join(f, sa.and_(f.c.audio_id == audio_id, f.c.status == "ok"))
    )
    query = with_manifest_value(query, manifest_item.c.gold_label, "aqa", audio_id, "gold")
    if dataset_id is not None:
        query = query.where(f.c.audio_id.in_(datasets.members([dataset_id])))
    return query
