"""`qwen-tasks label` / `work` / `runs` / `ingest` under interruptions and bad settings, as a user meets
them: real subprocesses, the tiny model, the real database. Each test here failed before its fix:
- a killed `label` (or one whose model would not load) is finished by running the same command again,
  `--relabel` included (it used to say "nothing to label" with most clips unlabelled);
- SIGTERM hands the job in hand back without using an attempt and exits 143 (it used to die with the
  job left `running` and an attempt burnt);
- corrupt weights: one line, and no planned run left behind;
- bad QWEN_TASKS_* values: one line naming the variable in every command, never a traceback;
- `runs --run 999` says that run does not exist; `ingest --manifest F` works without a PATH.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import blocked_pids, count, ingest_clips, run_cli, writes_blocked
from sqlalchemy.engine import Engine
from test_worker_processes import start_worker, wait_for

from qwen_tasks.labelling import jobs
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def labelled_once(engine: Engine, audio_ids: list[int], method: str = "score") -> bool:
    with engine.connect() as conn:
        got = conn.execute(
            sa.select(schema.cry_answer.c.audio_id).where(schema.cry_answer.c.method == method)
        ).scalars()
        return sorted(got) == sorted(audio_ids)


def test_label_resumes_a_killed_run_and_relabel_too(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.2, 1.4, 1.6]).values())
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "1"]
    planned = run_cli(["label", "--task", "cry", *model, "--plan-only", "--json"], database_url)
    run_id = last_json(planned.stdout)["run_id"]
    # the first `label` got through one job and was killed (a worker that did one job and stopped)
    one = run_cli(["work", "--run", str(run_id), "--max-jobs", "1", "--no-wait"], database_url)
    assert one.returncode == 0, one.stderr

    again = run_cli(["label", "--task", "cry", *model, "--json"], database_url)
    assert again.returncode == 0, again.stderr
    out = last_json(again.stdout)
    assert out["run_id"] == run_id and out["labelled"] == 3 and out["status"] == "done"
    assert f"resuming run {run_id}: 3 unfinished job(s)" in again.stderr
    assert labelled_once(engine, ids) and count(engine, schema.label_run) == 1

    # the same with --relabel: a new run, interrupted, then finished by the same command
    relabel = run_cli(["label", "--task", "cry", *model, "--relabel", "--plan-only", "--json"], database_url)
    second = last_json(relabel.stdout)["run_id"]
    run_cli(["work", "--run", str(second), "--max-jobs", "2", "--no-wait"], database_url)
    finish = run_cli(["label", "--task", "cry", *model, "--relabel", "--json"], database_url)
    assert finish.returncode == 0, finish.stderr
    out = last_json(finish.stdout)
    assert out["run_ids"] == [second] and out["labelled"] == 2 and out["planned"] == 0
    with engine.connect() as conn:
        per_run = dict(
            conn.execute(
                sa.select(schema.cry_answer.c.run_id, sa.func.count()).group_by(schema.cry_answer.c.run_id)
            ).all()
        )
    assert per_run == {run_id: 4, second: 4}


def test_corrupt_weights_are_one_line_and_leave_no_run_behind(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.5]).values())
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)  # same size, garbage
    result = run_cli(["label", "--task", "cry", "--model", str(broken), "--device", "cpu"], database_url)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert "model.safetensors: corrupt or truncated weights" in errors[0]  # names the broken file
    assert count(engine, schema.label_run) == 0 and count(engine, schema.label_job) == 0

    good = run_cli(
        ["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu"], database_url
    )
    assert good.returncode == 0, good.stderr
    assert labelled_once(engine, ids)


def test_sigterm_gives_the_job_back_without_using_an_attempt(
    engine: Engine, database_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ingest_clips(engine, tmp_path / "audio", [1.0])
    planned = run_cli(
        ["label", "--task", "cry", "--model", str(tiny_model_dir), "--device", "cpu", "--plan-only"],
        database_url,
    )
    run_id = int(planned.stdout.strip())
    with writes_blocked(engine):
        worker = start_worker(run_id, "terminated", database_url, tmp_path, lease=60)
        wait_for("the worker inside its write transaction", lambda: blocked_pids(engine))
        worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 143
    err = (tmp_path / "terminated.err").read_text()
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    with engine.connect() as conn:
        (job_id,) = conn.execute(sa.select(schema.label_job.c.id)).scalars().all()
    state = jobs.job_state(engine, job_id)
    assert state["status"] == "pending" and state["attempts"] == 0 and "SIGTERM" in state["last_error"]
    assert count(engine, schema.cry_answer) == 0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("QWEN_TASKS_BATCH_SIZE", "abc", "QWEN_TASKS_BATCH_SIZE must be an integer, got 'abc'"),
        ("QWEN_TASKS_MAX_BATCH_SECONDS", "-1", "QWEN_TASKS_MAX_BATCH_SECONDS must be a number > 0, got '-1'"),
        # once accepted and run on CPU while `--device gpu` was refused
        ("QWEN_TASKS_DEVICE", "gpu", "QWEN_TASKS_DEVICE must be one of auto, cpu, cuda, got 'gpu'"),
    ],
)
def test_a_bad_environment_value_is_one_line_in_every_command(
    database_url: str, tmp_path: Path, variable: str, value: str, message: str
) -> None:
    for args in (
        ["label", "--task", "cry", "--plan-only"],
        ["work", "--run", "1"],
        ["runs"],
        ["ingest", str(tmp_path)],
        ["db", "status"],
        ["export", "--task", "cry"],
    ):
        result = run_cli(args, database_url, **{variable: value})
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.strip() == f"error: {message}", (args, result.stderr)


def test_runs_of_an_unknown_run_and_ingest_of_a_manifest_alone(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    ingest_clips(engine, tmp_path / "audio", [1.0])
    missing = run_cli(["runs", "--run", "999"], database_url)
    assert missing.returncode == 1 and "run 999 does not exist" in missing.stderr

    manifest = tmp_path / "audio" / "cry.jsonl"
    line = {"question": "crying?", "audio": "clip_000.wav", "gt": "yes", "source": "t"}
    manifest.write_text(json.dumps(line) + "\n", encoding="utf-8")
    alone = run_cli(["ingest", "--manifest", str(manifest), "--json"], database_url)
    assert alone.returncode == 0, alone.stderr
    assert last_json(alone.stdout)["manifest_items"] == 1
    nothing = run_cli(["ingest"], database_url)
    assert nothing.returncode == 2 and "give at least one PATH or --manifest" in nothing.stderr
