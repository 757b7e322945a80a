"""The cry figures aggregated in the database (`_cry_group_metrics`, what `metrics` stores) against the
Python reference over the rows (`_cry_metrics`, the code that computed them before), on random runs with
ties in p_yes, unknown answers, clips with one method only, clips without gold and several datasets /
sources; and the export's JSON lines built by PostgreSQL against json.dumps of the same rows."""

from __future__ import annotations

import io
import json
import random

import pytest
import sqlalchemy as sa
from review_seed import (
    Job,
    add_audio,
    add_cry_answers,
    add_gold,
    add_references,
    add_run,
    add_transcripts,
    seed_asr_scenario,
)
from sqlalchemy.engine import Engine

from qwen_tasks.quality import metrics
from qwen_tasks.review import export
from qwen_tasks.store import schema


def _add_datasets(conn: sa.Connection, task: str, members: dict[str, list[int]]) -> None:
    for name, audio_ids in members.items():
        dataset_id = conn.execute(
            schema.dataset.insert().values(name=name, tasks=[task]).returning(schema.dataset.c.id)
        ).scalar_one()
        conn.execute(
            schema.dataset_audio.insert(), [{"dataset_id": dataset_id, "audio_id": a} for a in audio_ids]
        )


def _seed_random_cry_run(engine: Engine, seed: int) -> int:
    rng = random.Random(seed)
    ids = add_audio(engine, 40)
    add_gold(engine, {a: rng.choice(["yes", "no"]) for a in ids[:30]})
    with engine.begin() as conn:  # two sources on the manifest lines, two datasets
        conn.execute(
            schema.manifest_item.update().values(
                source=sa.case((schema.manifest_item.c.line_no % 2 == 0, "even"), else_="odd")
            )
        )
        _add_datasets(conn, "cry", {"first": ids[:25], "second": ids[15:]})
    run_id = add_run(engine, "cry", [Job(0, 10, ids, 5.0)])
    p_values = [0.05, 0.1, 0.3, 0.45, 0.5, 0.5, 0.55, 0.7, 0.9, 1.0]  # ties on purpose
    add_cry_answers(
        engine,
        run_id,
        score={a: rng.choice(p_values) for a in ids if rng.random() < 0.8},
        generate={a: rng.choice([("Yes.", "yes"), ("No.", "no"), ("Hmm.", "unknown")]) for a in ids[5:]},
    )
    return run_id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sql_cry_figures_equal_the_python_reference(engine: Engine, seed: int) -> None:
    run_id = _seed_random_cry_run(engine, seed)
    with engine.connect() as conn:
        groups = metrics._cry_group_metrics(conn, run_id)
        rows = metrics._cry_rows(conn, run_id)
        reference = {metrics.WHOLE_RUN: rows} | {
            key: [r for r in rows if r.audio_id in members]
            for key, members in metrics._run_groups(conn, run_id, "cry", {r.audio_id for r in rows}).items()
        }
    assert set(groups) == set(reference)
    for key, subset in reference.items():
        want = metrics._Metrics()
        metrics._cry_metrics(subset, want)
        got = groups[key]
        assert list(got.values) == list(want.values), key
        for name in want.values:
            assert got.values[name] == pytest.approx(want.values[name], abs=1e-12), (key, name)
            assert _close(got.details[name], want.details[name]), (key, name)


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-12)
    return a == b


def test_export_lines_are_the_rows_as_json(engine: Engine) -> None:
    run_id = _seed_random_cry_run(engine, 4)
    with engine.begin() as conn:  # a second path, non-ASCII text and several windows on one answer
        conn.execute(
            schema.audio_file.insert().values(path="/data/b\u00e9b\u00e9 \u54ed.wav", audio_id=1, status="ok")
        )
        conn.execute(
            schema.cry_answer.update()
            .where(schema.cry_answer.c.run_id == run_id, schema.cry_answer.c.audio_id == 7)
            .values(
                windows=[{"start_s": 0, "p_yes": 0.25}, {"start_s": 30, "p_yes": 0.125}],
                raw_answer='"是的"\n',
            )
        )
        # score answers decided by a calibrated rule: export adds calibration_id and p_calibrated
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
            )  # fmt: skip
            .returning(schema.decision_calibration.c.id)
        ).scalar_one()
        a = schema.cry_answer.c
        conn.execute(
            schema.cry_answer.update()
            .where(a.run_id == run_id, a.method == "score", a.audio_id.in_(range(5, 15)))
            .values(calibration_id=rule, threshold=0.375, p_calibrated=a.p_yes / 2 + 0.0625)
        )
    asr_run, _ = seed_asr_scenario(engine)
    for task, run in (("cry", run_id), ("asr", asr_run)):
        lines = list(export.export_lines(engine, task, run))
        rows = list(export.export_rows(engine, task, run))
        assert [json.loads(line) for line in lines] == rows
        if task == "cry":
            calibrated = [r for r in rows if "calibration_id" in r]
            assert calibrated and all(
                r["calibration_id"] == rule and r["threshold"] == 0.375 for r in calibrated
            )
            assert all(r["p_calibrated"] == r["p_yes"] / 2 + 0.0625 for r in calibrated)
            assert all("p_calibrated" not in r for r in rows if r not in calibrated)
        copied = io.StringIO()  # what `qwen-tasks export` writes: COPY ... TO STDOUT, byte for byte
        assert export.export_copy(engine, task, run)(copied) == len(lines)
        assert copied.getvalue() == "".join(line + "\n" for line in lines)
        # the same text but for whole floats (PostgreSQL writes p_yes 1.0 as 1)
        assert [line.replace('"p_yes": 1,', '"p_yes": 1.0,') for line in lines] == [
            json.dumps(r, ensure_ascii=False) for r in rows
        ]


def test_stored_figures_are_reused_while_their_inputs_hold(engine: Engine) -> None:
    """`current_run_metrics` (what `report` reads) returns the stored figures while nothing they were
    computed from changed, and recomputes them after a change of gold, of datasets or of the run."""
    run_id = _seed_random_cry_run(engine, 5)

    def stamps() -> set[object]:
        with engine.connect() as conn:
            return set(
                conn.execute(
                    sa.select(schema.run_metric.c.computed_at).where(schema.run_metric.c.run_id == run_id)
                )
                .scalars()
                .all()
            )

    first = metrics.current_run_metrics(engine, run_id)  # never computed: computed now
    computed = stamps()
    assert first == metrics.load_run_metrics(engine, run_id) and len(computed) == 1
    assert metrics.current_run_metrics(engine, run_id) == first and stamps() == computed  # reused
    # a human label changes the gold of one scored clip: recomputed, and the figures say so
    g, a = schema.cry_gold.c, schema.cry_answer.c
    with engine.connect() as conn:
        audio_id, gold = conn.execute(
            sa.select(g.audio_id, g.gold_label)
            .join(schema.cry_answer, a.audio_id == g.audio_id)
            .where(a.run_id == run_id, a.method == "score")
            .order_by(g.audio_id)
        ).first()
    with engine.begin() as conn:
        conn.execute(
            schema.human_label.insert().values(
                audio_id=audio_id, task="cry", label="no" if gold == "yes" else "yes", reviewer="ann"
            )
        )
    second = metrics.current_run_metrics(engine, run_id)
    assert stamps() != computed
    assert second["n_gold"] == first["n_gold"] and second != first
    assert metrics.current_run_metrics(engine, run_id) == second  # and reused again
    again = stamps()
    # the run's own row
    with engine.begin() as conn:
        conn.execute(schema.label_run.update().where(schema.label_run.c.id == run_id).values(n_failed=1))
    metrics.current_run_metrics(engine, run_id)
    assert stamps() != again


def test_asr_figures_streamed_in_chunks_equal_the_list_reference(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASR metrics score the run chunk by chunk (running sums per group, utterance_score written per
    chunk): the same figures, groups and utterance rows as the list-based functions over all rows."""
    rng = random.Random(11)
    ids = add_audio(engine, 30, root="/data/speech")
    refs = ["the cat sat on the mat", "今天天氣很好", "a dog", "", "we went home early"]
    add_references(engine, {a: (rng.choice(refs), rng.choice(["en", "zh", None])) for a in ids[:24]})
    with engine.begin() as conn:
        m = schema.manifest_item.c
        conn.execute(
            schema.manifest_item.update().values(
                source=sa.case((m.line_no % 3 == 0, None), else_="src" + sa.cast(m.line_no % 2, sa.Text))
            )
        )
        _add_datasets(conn, "asr", {"one": ids[:18], "two": ids[10:]})
    run_id = add_run(engine, "asr", [Job(0, 10, ids, 5.0)])
    hyps = ["the cat sit on mat", "今天天气很好", "a dog barks", "", "we went home", "the the cat"]
    add_transcripts(engine, run_id, {a: rng.choice(hyps) for a in ids})
    with engine.connect() as conn:
        rows = metrics._asr_rows(conn, run_id)
        want = {metrics.WHOLE_RUN: metrics._Metrics()}
        metrics._asr_metrics(rows, want[metrics.WHOLE_RUN])
        want |= metrics._group_metrics(conn, run_id, "asr", rows)
    monkeypatch.setattr(metrics, "ASR_CHUNK", 4)
    with engine.begin() as conn:
        got = metrics._asr_streamed(conn, run_id)
        stored = conn.execute(
            sa.select(schema.utterance_score)
            .where(schema.utterance_score.c.run_id == run_id)
            .order_by("audio_id")
        ).all()
    assert list(got) == list(want) and len(want) > 3
    for key in want:
        assert list(got[key].values) == list(want[key].values), key
        assert got[key].values == want[key].values and got[key].details == want[key].details, key
    expected = metrics._utterance_rows(run_id, rows)
    assert len(stored) == len(expected) > 10
    assert [{k: r._mapping[k] for k in e} for r, e in zip(stored, expected, strict=True)] == expected
