"""Review views on a seeded database, the Label Studio round trip and the fine-tune export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from review_seed import (
    Job,
    add_audio,
    add_cry_answers,
    add_gold,
    add_human,
    add_run,
    seed_asr_scenario,
    seed_cry_scenario,
)
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.quality.metrics import compute_run_metrics
from qwen_tasks.review.label_studio import (
    audio_reference,
    export_finetune,
    export_label_studio,
    import_label_studio,
    label_config,
)
from qwen_tasks.store import schema

CLI = [sys.executable, "-m", "qwen_tasks"]


def _queue(engine: Engine, task: str) -> dict[int, list[str]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT audio_id, reasons FROM review_queue WHERE task = :t ORDER BY priority DESC"),
            {"t": task},
        ).all()
    return {r.audio_id: list(r.reasons) for r in rows}


def _latest(engine: Engine, task: str) -> dict[int, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT audio_id, label, text, source FROM latest_label WHERE task = :t"), {"t": task}
        ).all()
    return {r.audio_id: (r.label, r.text, r.source) for r in rows}


def test_review_queue_reasons_for_cry(engine: Engine) -> None:
    _, ids = seed_cry_scenario(engine)
    queue = _queue(engine, "cry")
    # hand-derived from the scenario: gold yyyy nnnn, p_yes .9 .8 .45 .7 .2 .65 .1 .3, answers in review_seed
    assert queue == {
        ids[2]: ["disagrees_with_gold", "unknown", "near_threshold"],
        ids[3]: ["disagrees_with_gold", "methods_disagree"],
        ids[5]: ["disagrees_with_gold"],
        ids[7]: ["unknown"],
    }
    assert list(queue)[0] == ids[2]  # most reasons and wrong: first
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM review_queue WHERE audio_id = :a"), {"a": ids[2]}).one()
    assert row.path == "/data/audio/clip_002.wav" and row.is_latest_run and row.gold_source == "manifest"


def test_review_queue_high_wer_needs_scores(engine: Engine) -> None:
    run_id, ids = seed_asr_scenario(engine)
    assert _queue(engine, "asr") == {}  # no utterance scores before metrics
    compute_run_metrics(engine, run_id)
    assert _queue(engine, "asr") == {ids[2]: ["high_wer"], ids[0]: ["high_wer"]}


def test_latest_label_prefers_newest_run_then_human(engine: Engine) -> None:
    _, ids = seed_cry_scenario(engine)
    newer = add_run(engine, "cry", [Job(30, 31, ids[:1], process_seconds=1)])
    add_cry_answers(engine, newer, score={ids[0]: 0.1})
    latest = _latest(engine, "cry")
    assert latest[ids[0]] == ("no", None, "model")  # the newer run's score label
    assert latest[ids[1]] == ("yes", None, "model")
    add_human(engine, ids[0], "cry", label="yes")
    assert _latest(engine, "cry")[ids[0]] == ("yes", None, "human")
    # a human label for audio no run has labelled still shows up
    (extra,) = add_audio(engine, 1, start=50)
    add_human(engine, extra, "cry", label="no")
    assert _latest(engine, "cry")[extra] == ("no", None, "human")


def test_cry_gold_and_asr_reference_views(engine: Engine) -> None:
    _, ids = seed_cry_scenario(engine)
    add_gold(engine, {ids[0]: "no"}, manifest="/data/later.jsonl")  # a later manifest line wins
    add_human(engine, ids[1], "cry", label="no")
    add_human(engine, ids[2], "cry", label="unknown")
    with engine.connect() as conn:
        gold = {r.audio_id: (r.gold_label, r.source) for r in conn.execute(sa.text("SELECT * FROM cry_gold"))}
    assert gold[ids[0]] == ("no", "manifest")
    assert gold[ids[1]] == ("no", "human")
    assert ids[2] not in gold  # reviewer could not tell: no gold
    _, asr_ids = seed_asr_scenario(engine)
    add_human(engine, asr_ids[0], "asr", text="the cat sat on a mat")
    with engine.connect() as conn:
        refs = {
            r.audio_id: (r.reference_text, r.language, r.source)
            for r in conn.execute(sa.text("SELECT * FROM asr_reference"))
        }
    assert refs[asr_ids[0]] == ("the cat sat on a mat", "en", "human")
    assert refs[asr_ids[2]] == ("我很高兴", None, "manifest")


def _annotate(tasks: list[dict], choices: dict[int, str]) -> list[dict]:
    """What Label Studio's JSON export looks like after a reviewer worked through the tasks."""
    out = []
    for i, task in enumerate(tasks, start=1):
        item = {"id": 100 + i, "data": task["data"], "predictions": task["predictions"], "annotations": []}
        choice = choices.get(task["data"]["audio_id"])
        if choice:
            item["annotations"] = [
                {
                    "id": 1,
                    "completed_by": {"email": "ann@example.org"},
                    "was_cancelled": False,
                    "updated_at": "2025-01-02T10:00:00Z",
                    "result": [
                        {
                            "from_name": "cry",
                            "to_name": "audio",
                            "type": "choices",
                            "value": {"choices": [choice]},
                        }
                    ],
                },
                {"id": 2, "was_cancelled": True, "updated_at": "2025-01-03T10:00:00Z", "result": []},
            ]
        out.append(item)
    return out


def test_label_studio_round_trip_changes_views_and_metrics(engine: Engine, tmp_path: Path) -> None:
    run_id, ids = seed_cry_scenario(engine)
    before = compute_run_metrics(engine, run_id)
    summary = export_label_studio(engine, tmp_path / "tasks.json", "cry")
    assert summary.run_id == run_id and summary.tasks == 4
    tasks = json.loads((tmp_path / "tasks.json").read_text(encoding="utf-8"))
    first = tasks[0]
    assert first["data"]["audio"] == "/data/audio/clip_002.wav" and first["data"]["audio_id"] == ids[2]
    prediction = first["predictions"][0]
    assert prediction["model_version"] == f"tiny-qwen2-audio v1 run {run_id}"
    assert prediction["result"][0]["value"]["choices"] == ["No"] and prediction["score"] == pytest.approx(
        0.45
    )
    assert '<Choices name="cry"' in summary.config.read_text(encoding="utf-8")

    # the reviewer: clip 2 has no crying after all (manifest said yes), clip 7 is a yes; clip 3 left open
    export = tmp_path / "reviewed.json"
    export.write_text(json.dumps(_annotate(tasks, {ids[2]: "No", ids[7]: "Yes", ids[5]: "Unsure"})))
    result = import_label_studio(engine, export)
    assert (result.imported, result.unannotated, result.errors) == (3, 1, [])
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.human_label).order_by(schema.human_label.c.audio_id)).all()
    assert [(r.audio_id, r.label, r.reviewer) for r in rows] == [
        (ids[2], "no", "ann@example.org"),
        (ids[5], "unknown", "ann@example.org"),
        (ids[7], "yes", "ann@example.org"),
    ]
    assert set(_queue(engine, "cry")) == {ids[3]}  # reviewed items leave the queue
    latest = _latest(engine, "cry")
    assert latest[ids[2]] == ("no", None, "human") and latest[ids[7]] == ("yes", None, "human")
    after = compute_run_metrics(engine, run_id)
    assert before["n_gold"] == 8 and after["n_gold"] == 7  # "Unsure" removed clip 5's gold
    # clip 2 (p .45 -> no) is now right; clip 7 (p .3 -> no) is now wrong; clip 5's false positive is gone
    assert after["score.accuracy"] == pytest.approx(6 / 7)

    # importing again (a corrected review) updates instead of duplicating
    export.write_text(json.dumps(_annotate(tasks, {ids[7]: "No"})))
    assert import_label_studio(engine, export).imported == 1
    assert _latest(engine, "cry")[ids[7]] == ("no", None, "human")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.human_label)).scalar_one() == 3


def test_asr_export_and_json_min_import(engine: Engine, tmp_path: Path) -> None:
    run_id, ids = seed_asr_scenario(engine)
    compute_run_metrics(engine, run_id)
    summary = export_label_studio(
        engine, tmp_path / "asr.json", "asr", audio_root="/data", audio_prefix="/data/local-files/?d="
    )
    tasks = json.loads(summary.out.read_text(encoding="utf-8"))
    assert [t["data"]["audio_id"] for t in tasks] == [ids[2], ids[0]]  # worst error rate first
    assert tasks[0]["data"]["audio"] == "/data/local-files/?d=speech/clip_102.wav"
    assert tasks[0]["predictions"][0]["result"][0]["value"]["text"] == ["我很开心"]
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(0.5)
    # JSON-MIN export: flat rows with the control's name as key
    reviewed = [
        {
            "id": 1,
            "audio": tasks[0]["data"]["audio"],
            "audio_id": ids[2],
            "task": "asr",
            "transcription": "我很开心",
            "annotator": "li",
        },
        {"id": 2, "path": "/data/speech/clip_100.wav", "transcription": "The cat sit on mat."},
    ]
    path = tmp_path / "min.json"
    path.write_text(json.dumps(reviewed, ensure_ascii=False), encoding="utf-8")
    result = import_label_studio(engine, path, reviewer="fallback")
    assert (result.imported, result.errors) == (2, [])
    m = compute_run_metrics(engine, run_id)
    assert m["cer"] == 0 and m["wer"] == 0  # the reviewers agree with the model on both
    assert _queue(engine, "asr") == {}


def test_import_reports_bad_tasks_and_keeps_the_good(engine: Engine, tmp_path: Path) -> None:
    _, ids = seed_cry_scenario(engine)
    good = {
        "data": {"audio_id": ids[0], "task": "cry"},
        "annotations": [{"result": [{"type": "choices", "value": {"choices": ["Yes"]}}]}],
    }
    items = [
        good,
        "not an object",
        {
            "id": 7,
            "data": {"audio_id": 99999, "task": "cry"},
            "annotations": [{"result": [{"type": "choices", "value": {"choices": ["No"]}}]}],
        },
        {
            "id": 8,
            "data": {"audio_id": ids[1], "task": "cry"},
            "annotations": [{"result": [{"type": "choices", "value": {"choices": ["Maybe"]}}]}],
        },
        {
            "id": 9,
            "data": {"path": "/nowhere.wav", "task": "cry"},
            "annotations": [{"result": [{"type": "choices", "value": {"choices": ["No"]}}]}],
        },
        {
            "id": 10,
            "data": {"audio_id": "x1", "task": "cry"},
            "annotations": [{"result": [{"type": "choices", "value": {"choices": ["No"]}}]}],
        },
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(items))
    result = import_label_studio(engine, path)
    assert result.imported == 1
    assert len(result.errors) == 5
    assert all(e.startswith(f"{path}: task #") for e in result.errors)
    assert "not a JSON object" in result.errors[0]
    assert "(id 7): audio_id 99999 is not in the database" in result.errors[1]
    assert "'Maybe' is not Yes/No/Can't tell" in result.errors[2]
    assert "'/nowhere.wav' is not in the database" in result.errors[3]
    assert "'x1' is not a number" in result.errors[4]
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not a Label Studio JSON export"):
        import_label_studio(engine, bad_json)
    with pytest.raises(ConfigError, match="no such file"):
        import_label_studio(engine, tmp_path / "missing.json")


def test_review_cli_round_trip(engine: Engine, database_url: str, tmp_path: Path) -> None:
    run_id, ids = seed_cry_scenario(engine)
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": database_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    out = cli("review-export", "--task", "cry", "--out", str(tmp_path / "t.json"), "--limit", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tasks"] == 2
    tasks = json.loads((tmp_path / "t.json").read_text())
    reviewed = _annotate(tasks, {ids[2]: "No"}) + [
        {
            "id": 5,
            "data": {"audio_id": 424242, "task": "cry"},
            "annotations": [{"result": [{"type": "choices", "value": {"choices": ["No"]}}]}],
        }
    ]
    (tmp_path / "r.json").write_text(json.dumps(reviewed))
    long_dir = tmp_path / ("a-folder-name-long-enough-to-overflow-an-80-column-terminal-" * 2)
    long_dir.mkdir()
    (long_dir / "r.json").write_text(json.dumps(reviewed))
    imp = cli("review-import", str(long_dir / "r.json"), "--json")
    assert imp.returncode == 1  # one bad task: reported, the rest imported
    # the summary is one line on stderr, not wrapped at 80 columns mid-sentence
    assert (
        f"imported 1 human label(s) from {long_dir / 'r.json'}; 1 task(s) without an annotation; 1 bad"
        in (imp.stderr.splitlines())
    )
    summary = json.loads(imp.stdout)
    assert summary["imported"] == 1 and "424242" in summary["errors"][0]
    assert "audio_id 424242 is not in the database" in imp.stderr
    # the cry labels imported could start a fine-tune: without Airflow's URL, no event, and it says so
    assert (
        "no automatic run was requested (QWEN_TASKS_AIRFLOW_URL is not set); to fine-tune on them: "
        "qwen-tasks finetune --task cry" in imp.stderr
    )
    assert _latest(engine, "cry")[ids[2]] == ("no", None, "human")
    bad_task = cli("review-export", "--task", "dance", "--out", str(tmp_path / "x.json"))
    assert bad_task.returncode == 1 and "--task must be asr or cry" in bad_task.stderr
    wrong_run = cli("review-export", "--task", "asr", "--run", str(run_id), "--out", str(tmp_path / "x.json"))
    assert wrong_run.returncode == 1 and f"run {run_id} is a cry run, not asr" in wrong_run.stderr


def test_export_finetune_human_and_confident(engine: Engine, tmp_path: Path) -> None:
    _, ids = seed_cry_scenario(engine)
    add_human(engine, ids[4], "cry", label="yes")
    add_human(engine, ids[5], "cry", label="unknown")  # not training material
    summary = export_finetune(engine, tmp_path / "train.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert (summary.rows, summary.human, summary.model) == (1, 1, 0)
    row = rows[0]
    assert row["audio"] == "/data/audio/clip_004.wav" and row["source"] == "human"
    user, assistant = row["messages"]
    assert user["role"] == "user" and user["content"][0] == {
        "type": "audio",
        "audio_url": "/data/audio/clip_004.wav",
    }
    assert user["content"][1]["text"] == "Is there a baby crying in this audio? Answer yes or no."
    assert assistant == {"role": "assistant", "content": "Yes."}

    # confident model labels: p .9 (gold yes) and .1 (gold no) pass at 0.85; a confident one that the
    # gold contradicts is left out
    (extra,) = add_audio(engine, 1, start=60)
    add_gold(engine, {extra: "no"}, manifest="/data/extra.jsonl")
    run = add_run(engine, "cry", [Job(40, 41, [extra], process_seconds=1)])
    add_cry_answers(engine, run, score={extra: 0.97})
    summary = export_finetune(engine, tmp_path / "train2.jsonl", include_confident=0.85)
    rows = [json.loads(line) for line in (tmp_path / "train2.jsonl").read_text().splitlines()]
    assert (summary.human, summary.model) == (1, 2)
    model_rows = {r["audio_id"]: r["messages"][1]["content"] for r in rows if r["source"] == "model"}
    assert model_rows == {ids[0]: "Yes.", ids[6]: "No."}
    with pytest.raises(ConfigError, match="include-confident"):
        export_finetune(engine, tmp_path / "x.jsonl", include_confident=0.4)

    # clips of a test dataset are never training rows, reviewed or confident
    from qwen_tasks.ingest import datasets

    held_out = [
        datasets.Source(datasets.SourceKind.FILE, f"/data/audio/clip_{i:03d}.wav", "fixed-eval", ("cry",))
        for i in (0, 4)
    ]
    with engine.begin() as conn:
        datasets.record(conn, datasets.DatasetPlan(split="test", sources=held_out))
    summary = export_finetune(engine, tmp_path / "train3.jsonl", include_confident=0.85)
    rows = [json.loads(line) for line in (tmp_path / "train3.jsonl").read_text().splitlines()]
    assert (summary.human, summary.model) == (0, 1)
    assert [r["audio_id"] for r in rows] == [ids[6]]


def test_export_finetune_asr_uses_human_transcripts(engine: Engine, tmp_path: Path) -> None:
    _, ids = seed_asr_scenario(engine)
    add_human(engine, ids[1], "asr", text="今天天气很好")
    summary = export_finetune(engine, tmp_path / "asr.jsonl", task="asr")
    (row,) = [json.loads(line) for line in (tmp_path / "asr.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary.rows == 1
    assert row["messages"][1]["content"] == "今天天气很好"
    assert "in Chinese" in row["messages"][0]["content"][1]["text"]


def test_review_export_asks_the_runs_question(engine: Engine, tmp_path: Path) -> None:
    run_id, _ = seed_cry_scenario(engine)
    question = "Is there a dog barking in this audio? Answer yes or no."
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema.label_run)
            .where(schema.label_run.c.id == run_id)
            .values(params={"request": {"task": "cry", "question": question}})
        )
    export_label_studio(engine, tmp_path / "t.json", "cry")
    tasks = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert {t["data"]["question"] for t in tasks} == {question}
    export_label_studio(engine, tmp_path / "u.json", "cry", question="Override?")
    assert json.loads((tmp_path / "u.json").read_text())[0]["data"]["question"] == "Override?"


def test_label_studio_local_files_url_shape(engine: Engine, tmp_path: Path) -> None:
    # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/srv/ls, a Local Files storage on /srv/ls/audio
    assert (
        audio_reference("/srv/ls/audio/day 1/a.wav", "/srv/ls", "/data/local-files/?d=")
        == "/data/local-files/?d=audio/day%201/a.wav"
    )
    with pytest.raises(ConfigError, match="needs --audio-root"):  # absolute paths cannot be served
        audio_reference("/srv/ls/audio/a.wav", None, "/data/local-files/?d=")
    with pytest.raises(ConfigError, match="subfolder of its document root"):
        audio_reference("/srv/ls/audio/a.wav", "/srv/ls/audio", "/data/local-files/?d=")  # the 404 mistake
    seed_cry_scenario(engine)  # clips under /data/audio
    summary = export_label_studio(
        engine, tmp_path / "t.json", "cry", audio_root="/data", audio_prefix="/data/local-files/?d="
    )
    tasks = json.loads(summary.out.read_text(encoding="utf-8"))
    assert tasks[0]["data"]["audio"] == "/data/local-files/?d=audio/clip_002.wav"
    with pytest.raises(ConfigError, match="subfolder"):
        export_label_studio(
            engine, tmp_path / "t.json", "cry", audio_root="/data/audio", audio_prefix="/data/local-files/?d="
        )


def _choice_task(task_id: int, audio_id: int, choice: str, **annotation: object) -> dict:
    return {
        "id": task_id,
        "data": {"audio_id": audio_id, "task": "cry"},
        "annotations": [
            {
                "result": [{"from_name": "cry", "type": "choices", "value": {"choices": [choice]}}],
                **annotation,
            }
        ],
    }


def _reviewers(engine: Engine) -> dict[int, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.human_label)).all()
    return {r.audio_id: (r.label, r.text, r.reviewer) for r in rows}


def test_reviewer_is_the_email_else_the_option_else_the_id(engine: Engine, tmp_path: Path) -> None:
    _, ids = seed_cry_scenario(engine)
    items = [
        _choice_task(1, ids[0], "Yes", completed_by=1),  # Label Studio's default export: a user id
        _choice_task(2, ids[1], "No", completed_by=2, created_username=" ann@example.org, 2"),
        _choice_task(3, ids[2], "No", completed_by={"id": 3, "email": "bo@example.org"}),
    ]
    path = tmp_path / "full.json"
    path.write_text(json.dumps(items))
    assert import_label_studio(engine, path, reviewer="carol").imported == 3
    got = _reviewers(engine)
    assert [got[i][2] for i in ids[:3]] == ["carol", "ann@example.org", "bo@example.org"]
    assert import_label_studio(engine, path).imported == 3
    assert _reviewers(engine)[ids[0]][2] == "1"  # nothing better known: the id


def test_json_min_counts_tasks_and_accepts_an_empty_transcript(engine: Engine, tmp_path: Path) -> None:
    _, ids = seed_asr_scenario(engine)
    rows = [  # JSON-MIN: one row per annotation; task 11 was annotated twice
        {
            "id": 11,
            "audio_id": ids[0],
            "task": "asr",
            "transcription": "the cat sat",
            "annotator": 4,
            "annotation_id": 1,
            "updated_at": "2025-01-01T10:00:00Z",
        },
        {
            "id": 11,
            "audio_id": ids[0],
            "task": "asr",
            "transcription": "the cat sat on the mat",
            "annotator": 4,
            "annotation_id": 2,
            "updated_at": "2025-01-02T10:00:00Z",
        },
        {"id": 12, "audio_id": ids[1], "task": "asr", "transcription": "", "annotator": "li@example.org"},
        {"id": 13, "audio_id": ids[2], "task": "asr", "transcription": ["我很开心"], "annotator": 4},
    ]
    path = tmp_path / "min.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    result = import_label_studio(engine, path, reviewer="dana")
    assert (result.imported, result.unannotated, result.errors) == (3, 0, [])
    got = _reviewers(engine)
    assert got[ids[0]] == (None, "the cat sat on the mat", "dana")  # the later annotation wins
    assert got[ids[1]] == (None, "", "li@example.org")  # "no speech" is a transcript too
    # the full format's empty textarea too
    full = [
        {
            "id": 21,
            "data": {"audio_id": ids[2], "task": "asr"},
            "annotations": [
                {"result": [{"from_name": "transcription", "type": "textarea", "value": {"text": [""]}}]}
            ],
        }
    ]
    path.write_text(json.dumps(full))
    assert import_label_studio(engine, path).errors == []
    assert _reviewers(engine)[ids[2]][1] == ""


def test_helpers() -> None:
    assert audio_reference("/data/a b.wav") == "/data/a b.wav"
    assert audio_reference("/data/a b.wav", "/data", "http://h/") == "http://h/a%20b.wav"
    with pytest.raises(ConfigError, match="not under --audio-root"):
        audio_reference("/other/a.wav", "/data")
    assert "<TextArea" in label_config("asr")
    with pytest.raises(ConfigError):
        label_config("dance")


def test_example_queries_run_on_a_seeded_database(engine: Engine) -> None:
    cry_run, _ = seed_cry_scenario(engine)
    asr_run, _ = seed_asr_scenario(engine)
    compute_run_metrics(engine, cry_run)
    compute_run_metrics(engine, asr_run)
    queries = sorted((Path(__file__).parents[2] / "sql" / "queries").glob("*.sql"))
    assert len(queries) >= 5
    for query in queries:
        lines = query.read_text(encoding="utf-8").splitlines()
        code = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
        for statement in filter(str.strip, code.split(";")):
            with engine.connect() as conn:
                conn.exec_driver_sql(statement).all()
    with engine.connect() as conn:
        sweep = conn.exec_driver_sql((queries[0].parent / "threshold_sweep.sql").read_text()).all()
        pairs = conn.exec_driver_sql((queries[0].parent / "top_substitutions.sql").read_text()).all()
    assert len(sweep) == 19
    assert ("高兴", "开心") in {(p.reference, p.model_wrote) for p in pairs}
