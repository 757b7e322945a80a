"""`qwen-tasks label / work / runs / export` as a user runs them: real subprocesses, tiny model, real DB."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, ingest_clips, run_cli
from sqlalchemy.engine import Engine

from qwen_tasks.ingest.register import ingest
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


def last_json(stdout: str) -> object:
    return json.loads(stdout.strip().splitlines()[-1])


def test_plan_work_rerun_relabel_runs_and_export(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    ids = ingest_clips(engine, tmp_path / "audio", [1.0, 1.5, 2.0])
    paths = list(ids)
    manifest = tmp_path / "audio" / "cry.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"question": "crying?", "audio": p.name, "gt": g, "source": "t"})
                  for p, g in zip(paths, ["yes", "no", "maybe"], strict=True)) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    ingest(engine, [tmp_path / "audio"], manifests=[(manifest, "aqa")])
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]

    planned = run_cli(
        ["label", "--task", "cry", *model, "--batch-size", "2", "--plan-only", "--json"], database_url
    )
    assert planned.returncode == 0, planned.stderr
    plan = last_json(planned.stdout)
    assert plan["jobs"] == 2 and plan["items"] == 3 and count(engine, schema.cry_answer) == 0
    run_id = plan["run_id"]

    worked = run_cli(["work", "--run", str(run_id), "--json"], database_url)
    assert worked.returncode == 0, worked.stderr
    summary = last_json(worked.stdout)
    assert summary["jobs_done"] == 2 and summary["labelled"] == 3 and summary["run_status"] == "done"

    rerun = run_cli(["label", "--task", "cry", *model, "--json"], database_url)
    assert rerun.returncode == 0, rerun.stderr
    assert last_json(rerun.stdout)["run_id"] is None and "nothing to label" in rerun.stderr

    relabel = run_cli(["label", "--task", "cry", *model, "--relabel", "--json"], database_url)
    assert relabel.returncode == 0, relabel.stderr
    out = last_json(relabel.stdout)
    assert {"run_id", "labelled", "failed", "audio_seconds", "wall_seconds", "rtf"} <= set(out)
    assert out["run_id"] != run_id and out["labelled"] == 3 and out["failed"] == 0
    assert out["audio_seconds"] == pytest.approx(4.5, abs=0.01) and out["rtf"] > 0
    with engine.connect() as conn:
        runs_with_labels = conn.execute(
            sa.select(sa.func.count(sa.distinct(schema.cry_answer.c.run_id)))
        ).scalar()
    assert runs_with_labels == 2  # the old labels are kept

    listed = run_cli(["runs", "--json"], database_url)
    assert listed.returncode == 0, listed.stderr
    progress = json.loads(listed.stdout)
    assert [r["run_id"] for r in progress] == [out["run_id"], run_id]
    assert (
        progress[1]["jobs_done"] == 2
        and progress[1]["clips_labelled"] == 3
        and progress[1]["status"] == "done"
    )
    table = run_cli(["runs"], database_url)
    assert table.returncode == 0 and "q2a-chat-cry-score-v1" in table.stdout

    exported = tmp_path / "out" / "cry.jsonl"
    ex = run_cli(["export", "--task", "cry", "--run", str(run_id), "--out", str(exported)], database_url)
    assert ex.returncode == 0, ex.stderr
    rows = [json.loads(line) for line in exported.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["audio"] for r in rows) == sorted(str(p) for p in paths)
    for r in rows:
        assert {"audio", "p_yes", "label", "gold", "model", "revision", "prompt_version", "run_id"} <= set(r)
        assert r["run_id"] == run_id and r["model"] == str(tiny_model_dir) and r["label"] in ("yes", "no")
        assert "answer" not in r  # score only: no generated answer
    gold = {r["audio"]: r["gold"] for r in rows}
    assert [gold[str(p)] for p in paths] == ["yes", "no", None]  # "maybe" is no gold label
    latest = run_cli(["export", "--task", "cry"], database_url)  # default: latest run, on stdout
    assert {json.loads(line)["run_id"] for line in latest.stdout.splitlines()} == {out["run_id"]}


def test_a_job_that_keeps_failing_fails_the_command_with_its_error(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    ids = ingest_clips(engine, tmp_path / "audio", [1.0, 2.0])
    list(ids)[0].unlink()
    result = run_cli(
        ["label", "--task", "asr", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "1",
         "--max-new-tokens", "4", "--json"],
        database_url,
    )  # fmt: skip
    assert result.returncode == 1
    out = last_json(result.stdout)
    assert out["labelled"] == 1 and out["jobs_failed"] == 1 and out["status"] == "done"
    assert "1 job(s) failed after all attempts" in result.stderr and "none of the 1 file(s)" in result.stderr
    with engine.connect() as conn:
        failed = conn.execute(sa.select(schema.label_job).where(schema.label_job.c.status == "failed")).one()
    assert failed.attempts == failed.max_attempts == 3 and "file not found" in failed.last_error


def test_bad_input_gets_one_line_errors(engine: Engine, database_url: str, tmp_path: Path) -> None:
    for args, message in (
        (["work", "--run", "999"], "no labelling run with id 999"),
        (["export", "--task", "cry"], "no cry run with labels yet"),
        (["label", "--task", "speech"], "--task must be asr or cry"),
        (
            ["label", "--task", "cry", "--method", "vote", "--plan-only"],
            "--method must be one of ['score', 'generate', 'both'] (got 'vote')",
        ),
        (["label", "--task", "cry", "--model", str(tmp_path), "--plan-only"], "not a model directory"),
        (["label", "--task", "asr", "--max-new-tokens", "0", "--plan-only"], "--max-new-tokens must be >= 1"),
    ):
        result = run_cli(args, database_url)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_label_asr_with_max_new_tokens(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The contract `label --task asr --max-new-tokens 8`: that cap for every clip, stored on the run, and
    the transcripts that hit it flagged."""
    ids = ingest_clips(engine, tmp_path / "audio", [1.0, 2.0])
    args = ["label", "--task", "asr", "--model", str(tiny_model_dir), "--device", "cpu"]
    result = run_cli([*args, "--max-new-tokens", "8", "--json"], database_url)
    assert result.returncode == 0, result.stderr
    out = last_json(result.stdout)
    assert out["labelled"] == 2
    with engine.connect() as conn:
        run = conn.execute(sa.select(schema.label_run).where(schema.label_run.c.id == out["run_id"])).one()
        flags = dict(
            conn.execute(sa.select(schema.transcription.c.audio_id, schema.transcription.c.truncated)).all()
        )
    assert run.params["request"]["max_new_tokens"] == 8
    assert flags == dict.fromkeys(ids.values(), True)  # the tiny model rambles past 8 tokens


PROGRESS = re.compile(
    r"(?P<what>label [^:]+): (?P<done>\d+)/(?P<total>\d+) clips \(\d+%\), [0-9.]+ clips/s"
    r"(?:, RTF (?P<rtf>[0-9.]+))?, elapsed [0-9.]+ \w+(?:, ETA (?:[0-9.]+ \w+|unknown))?$"
)


def test_without_a_terminal_label_and_work_log_progress_lines(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """stderr piped (a log file, not a TTY): instead of a rich bar that only renders on a terminal, a
    progress line every QWEN_TASKS_PROGRESS_SECONDS with done/total clips, clips/s, RTF and the time left,
    and a last line when the work ends."""
    ingest_clips(engine, tmp_path / "audio", [1.0, 1.5, 2.0, 2.5])
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "1"]
    fast = {"QWEN_TASKS_PROGRESS_SECONDS": "0.05"}

    labelled = run_cli(["label", "--task", "asr", *model, "--max-new-tokens", "4"], database_url, **fast)
    assert labelled.returncode == 0, labelled.stderr
    lines = [m for m in map(PROGRESS.search, labelled.stderr.splitlines()) if m]
    assert len(lines) >= 2, labelled.stderr  # at least one while working (the model load too), and the last
    assert all(m["total"] == "4" for m in lines)
    assert any("ETA" in m[0] for m in lines[:-1]), labelled.stderr
    last = lines[-1]
    assert last["done"] == "4" and last["rtf"] is not None and "ETA" not in last[0]

    planned = run_cli(["label", "--task", "asr", *model, "--relabel", "--plan-only", "--json"], database_url)
    run_id = last_json(planned.stdout)["run_id"]
    worked = run_cli(["work", "--run", str(run_id)], database_url, **fast)
    assert worked.returncode == 0, worked.stderr
    lines = [m for m in map(PROGRESS.search, worked.stderr.splitlines()) if m]
    assert lines and lines[-1]["what"] == f"label run {run_id}" and lines[-1]["done"] == "4", worked.stderr
    assert "\r" not in worked.stderr  # no bar redraws in a log file


def test_a_second_label_while_the_first_holds_every_job_names_that_run(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two `label` runs started together: the first planned run N and its worker holds the only job (a
    live lease); the second finds nothing to take. It says run N is labelling those clips (not "every
    clip has a label") and exits 0 without waiting."""
    from qwen_tasks.labelling import jobs

    ingest_clips(engine, tmp_path / "audio", [1.0, 1.5])
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    first = run_cli(["label", "--task", "asr", *model, "--plan-only", "--json"], database_url)
    assert first.returncode == 0, first.stderr
    run_id = last_json(first.stdout)["run_id"]
    held = jobs.claim_job(engine, run_id, "first", lease_seconds=300)
    assert held is not None  # the first `label`'s worker, labelling its only job

    second = run_cli(["label", "--task", "asr", *model, "--json"], database_url)

    assert second.returncode == 0, second.stderr
    reason = (
        f"the clips of audio without a label are being labelled by run {run_id} (in flight; see: qwen-tasks"
    )
    reason += " runs)"
    assert second.stderr.strip() == f"nothing to label for --task asr: {reason}"
    out = last_json(second.stdout)
    assert (out["run_id"], out["reason"], out["in_flight_run_ids"]) == (None, reason, [run_id])
    assert count(engine, schema.transcription) == 0  # it did not label the held clips a second time
