"""Labelling scoped by datasets, and cry clips asked their own manifest line's question: planning on the
real database with the tiny model's config, and one real labelling run per question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import write_clips
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.register import ingest
from qwen_tasks.labelling import jobs, planning, worker
from qwen_tasks.labelling.options import DEFAULT_QUESTION, LabelOptions
from qwen_tasks.store import schema


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def options(model: Path, **values: object) -> LabelOptions:
    return LabelOptions.from_mapping({"model": str(model), "device": "cpu", "promoted": False, **values})


@pytest.fixture
def two_piles(engine: Engine, tmp_path: Path) -> dict[str, set[int]]:
    """An ASR-only digits set (3 clips), a cry set (4 clips, two questions) and a folder of voice notes
    (2 clips, both tasks). Returns dataset name -> audio ids."""
    digits = write_clips(tmp_path / "digits", [0.6, 0.7, 0.8], seed=1)
    cry = write_clips(tmp_path / "cry", [0.5, 0.55, 0.65, 0.75], seed=2)
    write_clips(tmp_path / "notes", [0.9, 1.0], seed=3)
    jsonl(tmp_path / "digits" / "digits.jsonl", [{"audio": p.name, "text": "one two"} for p in digits])
    jsonl(
        tmp_path / "cry" / "nursery.jsonl",
        [
            {
                "question": "Is there a baby crying?" if i < 2 else "Is a child upset in this recording?",
                "audio": p.name,
                "gt": "yes" if i % 2 else "no",
                "source": "nursery",
            }
            for i, p in enumerate(cry)
        ],
    )
    ingest(engine, [], manifests=[(tmp_path / "digits" / "digits.jsonl", None)])
    ingest(engine, [], manifests=[(tmp_path / "cry" / "nursery.jsonl", None)])
    ingest(engine, [tmp_path / "notes"])
    d, da = schema.dataset, schema.dataset_audio
    with engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.name, da.c.audio_id).join(da, da.c.dataset_id == d.c.id)).all()
    out: dict[str, set[int]] = {}
    for name, audio_id in rows:
        out.setdefault(name, set()).add(int(audio_id))
    assert {k: len(v) for k, v in out.items()} == {"digits": 3, "nursery": 4, "notes": 2}
    return out


def planned(engine: Engine, run_ids: list[int]) -> dict[int, set[int]]:
    i = schema.label_job_item
    with engine.connect() as conn:
        rows = conn.execute(sa.select(i.c.run_id, i.c.audio_id).where(i.c.run_id.in_(run_ids))).all()
    out: dict[int, set[int]] = {}
    for run_id, audio_id in rows:
        out.setdefault(int(run_id), set()).add(int(audio_id))
    return out


def test_a_task_labels_only_the_datasets_labelled_for_it(
    engine: Engine, tiny_model_dir: Path, two_piles: dict[str, set[int]]
) -> None:
    asr = planning.plan(engine, options(tiny_model_dir, tasks=["asr"]))
    assert set().union(*planned(engine, asr.run_ids).values()) == two_piles["digits"] | two_piles["notes"]
    assert asr.per_task["asr"]["datasets"] == ["digits", "notes"]
    cry = planning.plan(engine, options(tiny_model_dir, tasks=["cry"]))
    assert set().union(*planned(engine, cry.run_ids).values()) == two_piles["nursery"] | two_piles["notes"]
    with engine.connect() as conn:
        covered = conn.execute(
            sa.select(schema.run_dataset.c.run_id, schema.dataset.c.name, schema.run_dataset.c.n_items)
            .join(schema.dataset, schema.dataset.c.id == schema.run_dataset.c.dataset_id)
            .where(schema.run_dataset.c.run_id.in_(asr.run_ids))
        ).all()
    assert sorted((name, n) for _, name, n in covered) == [("digits", 3), ("notes", 2)]
    rows = jobs.progress_rows(engine, limit=10, task="asr")
    assert rows[0]["datasets"] == ["digits", "notes"]


def test_named_datasets_restrict_and_bad_names_say_why(
    engine: Engine, tiny_model_dir: Path, two_piles: dict[str, set[int]]
) -> None:
    only_notes = planning.plan(engine, options(tiny_model_dir, tasks=["asr"], datasets=["notes"]))
    assert set().union(*planned(engine, only_notes.run_ids).values()) == two_piles["notes"]
    nothing = planning.plan(engine, options(tiny_model_dir, tasks=["cry"], datasets=["digits"]))
    assert nothing.run_ids == []
    assert nothing.per_task["cry"]["reason"].startswith("none of the datasets ['digits'] is labelled for cry")
    again = planning.plan(engine, options(tiny_model_dir, tasks=["asr"], datasets=["notes"]))
    assert again.new_run_ids == [] and again.per_task["asr"]["resumed_jobs"] == 1  # planned, not labelled
    with pytest.raises(
        ConfigError, match="--dataset 'nope': no such dataset \\(known: digits, notes, nursery\\)"
    ):
        planning.plan(engine, options(tiny_model_dir, tasks=["asr"], datasets=["nope"]))


def test_each_clip_is_asked_its_own_lines_question(
    engine: Engine, tiny_model_dir: Path, two_piles: dict[str, set[int]]
) -> None:
    """Two manifest questions and clips without one: three runs, each clip answered (a real run of the
    tiny model) under its own line's question; --question overrides it for all in one run."""
    summary = worker.label(engine, options(tiny_model_dir, tasks=["cry"], method="both"))
    assert summary.labelled == 6 and summary.failed == 0
    by_run = planned(engine, summary.run_ids)
    questions = {run_id: jobs.get_run(engine, run_id).request.question for run_id in summary.run_ids}
    with engine.connect() as conn:
        asked = dict(
            conn.execute(sa.select(schema.cry_question.c.audio_id, schema.cry_question.c.question)).all()
        )
        answered = conn.execute(sa.select(schema.cry_answer.c.run_id, schema.cry_answer.c.audio_id)).all()
    assert sorted(questions.values()) == sorted(
        ["Is there a baby crying?", "Is a child upset in this recording?", DEFAULT_QUESTION]
    )
    for run_id, audio_ids in by_run.items():
        for audio_id in audio_ids:
            assert questions[run_id] == asked.get(audio_id, DEFAULT_QUESTION)
    assert {(r, a) for r, a in answered} == {(r, a) for r, ids in by_run.items() for a in ids for _ in (0,)}
    done = planning.plan(engine, options(tiny_model_dir, tasks=["cry"], method="both"))
    assert done.run_ids == [] and "already has a label for cry" in done.per_task["cry"]["reason"]
    versions = {jobs.get_run(engine, r).prompt_version for r in summary.run_ids}
    assert len(versions) == 3  # a digest of each question: runs of different questions never mix
    override = planning.plan(
        engine, options(tiny_model_dir, tasks=["cry"], question="Is anyone crying?", relabel=True)
    )
    assert len(override.new_run_ids) == 1
    assert jobs.get_run(engine, override.new_run_ids[0]).request.question == "Is anyone crying?"
    assert planned(engine, override.new_run_ids)[override.new_run_ids[0]] == (
        two_piles["nursery"] | two_piles["notes"]
    )


def test_export_and_review_export_take_a_dataset(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path, two_piles: dict[str, set[int]]
) -> None:
    from typer.testing import CliRunner

    from qwen_tasks.cli import app

    summary = worker.label(engine, options(tiny_model_dir, tasks=["cry"], question="Is anyone crying?"))
    assert summary.labelled == 6 and len(summary.run_ids) == 1
    runner = CliRunner()
    out = tmp_path / "nursery.jsonl"
    result = runner.invoke(app, ["export", "--task", "cry", "--dataset", "nursery", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["audio_id"] for r in rows} == two_piles["nursery"]
    tasks_file = tmp_path / "review.json"
    result = runner.invoke(
        app, ["review-export", "--task", "cry", "--dataset", "notes", "--out", str(tasks_file), "--json"]
    )
    assert result.exit_code == 0, result.output
    exported = {t["data"]["audio_id"] for t in json.loads(tasks_file.read_text())}
    result = runner.invoke(app, ["review-export", "--task", "cry", "--out", str(tmp_path / "all.json")])
    assert result.exit_code == 0, result.output
    everything = {t["data"]["audio_id"] for t in json.loads((tmp_path / "all.json").read_text())}
    assert exported == everything & two_piles["notes"] and everything - two_piles["notes"]
    for command in (
        ["export", "--task", "cry"],
        ["review-export", "--task", "cry", "--out", str(tasks_file)],
    ):
        bad = runner.invoke(app, [*command, "--dataset", "nope"])  # main() prints it as one line
        assert isinstance(bad.exception, ConfigError) and "'nope': no such dataset" in str(bad.exception)
    digits = runner.invoke(app, ["export", "--task", "cry", "--dataset", "digits"])
    assert "no cry run with labels of dataset digits" in str(digits.exception)
