"""One job through its stages (`labelling.worker.stages`) and what it stores (`worker.results`, the
lease it writes under: `worker.leases`), in-process with the real backend on the tiny model, against the
real PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, ingest_clips, plan_on, work_on
from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.backends import get_backend
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.worker import leases, results, stages
from qwen_tasks.records import LabelRequest
from qwen_tasks.review import export
from qwen_tasks.store import schema


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Backend:
    return get_backend(str(tiny_model_dir), device="cpu")


def test_job_results_done_mark_and_counters(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 1.5, 2.0])
    request = LabelRequest(task="cry", methods=("score", "generate"), max_new_tokens=4)
    result = plan_on(engine, backend, request)
    assert result.run_id is not None
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None
    outcome = stages.process_job(engine, job, backend, worker_id="w1")
    assert (outcome.status, outcome.labelled, outcome.failed) == ("done", 3, 0)
    assert outcome.audio_seconds == pytest.approx(4.5, abs=0.01)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.cry_answer).order_by("audio_id", "method")).all()
        run = conn.execute(sa.select(schema.label_run)).one()
        done = conn.execute(sa.select(schema.label_job)).one()
    assert [(r.audio_id, r.method) for r in rows] == [
        (i, m) for i in sorted(ids.values()) for m in ("generate", "score")
    ]
    for r in rows:
        assert r.job_id == job.id and 0 <= r.p_yes <= 1
        if r.method == "score":
            assert r.label == ("yes" if r.p_yes >= 0.5 else "no") and r.threshold == 0.5
        else:
            assert r.raw_answer is not None and r.label in ("yes", "no", "unknown")
    assert (run.n_labelled, run.n_failed) == (3, 0) and run.audio_seconds == pytest.approx(4.5, abs=0.01)
    assert done.status == "done" and done.process_seconds > 0 and done.claim_seconds > 0
    assert jobs.get_run(engine, result.run_id).status == "done"  # the last job closed the run
    # the job is finished: no worker can claim it again, nothing more is written
    assert jobs.claim_job(engine, result.run_id, "w2", 30) is None and count(engine, schema.cry_answer) == 6


def test_unreadable_clips_fail_alone(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 1.2, 1.4])
    resized, garbled, good = list(ids)
    with resized.open("ab") as f:  # changed since ingest: size differs
        f.write(b"\0" * 100)
    st = garbled.stat()
    garbled.write_bytes(b"x" * st.st_size)  # same size and mtime (ingest would see no change), not audio
    os.utime(garbled, ns=(st.st_atime_ns, st.st_mtime_ns))
    request = LabelRequest(task="asr", max_new_tokens=4)
    result = plan_on(engine, backend, request)
    assert result.run_id is not None
    summary = work_on(engine, result.run_id, backend)
    assert (summary.jobs_done, summary.labelled, summary.failed) == (1, 1, 2)
    with engine.connect() as conn:
        failures = {r.audio_id: r.error for r in conn.execute(sa.select(schema.label_failure))}
        labelled = conn.execute(sa.select(schema.transcription.c.audio_id)).scalars().all()
    assert labelled == [ids[good]]
    assert "changed since ingest" in failures[ids[resized]] and str(resized) in failures[ids[resized]]
    # same size and mtime, other bytes: the sha256 of what was read is not what ingest recorded
    assert "content changed since ingest: sha256" in failures[ids[garbled]]
    assert str(garbled) in failures[ids[garbled]]
    assert summary.run_status == "done"


def test_a_clip_the_model_refuses_names_its_path_once(
    engine: Engine, backend: Backend, tmp_path: Path
) -> None:
    """A failure the backend reports (here: audio too short for the model) reaches label_failure with the
    clip's path once, not once from the backend and again from the worker."""
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 0.02])
    short = next(p for p in ids if p.stat().st_size == min(q.stat().st_size for q in ids))
    result = plan_on(engine, backend, LabelRequest(task="asr", max_new_tokens=4))
    assert result.run_id is not None
    summary = work_on(engine, result.run_id, backend)
    assert (summary.labelled, summary.failed) == (1, 1)
    with engine.connect() as conn:
        (error,) = conn.execute(sa.select(schema.label_failure.c.error)).scalars().all()
    assert error.count(str(short)) == 1 and error.startswith(f"{short}: audio too short"), error


def test_results_of_a_lost_lease_are_discarded(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    request = LabelRequest(task="cry")
    result = plan_on(engine, backend, request)
    assert result.run_id is not None
    mine = jobs.claim_job(engine, result.run_id, "slow-worker", lease_seconds=0.3)
    assert mine is not None
    time.sleep(0.5)
    theirs = jobs.claim_job(engine, result.run_id, "other-worker", lease_seconds=30)
    assert theirs is not None and theirs.id == mine.id
    lost = stages.process_job(engine, mine, backend, worker_id="slow-worker", lease_seconds=0.3)
    assert lost.status == "lost" and count(engine, schema.cry_answer) == 0
    done = stages.process_job(engine, theirs, backend, worker_id="other-worker")
    assert done.status == "done" and count(engine, schema.cry_answer) == 1


def test_long_audio_windows_are_stored_and_exported(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [35.0, 1.0])
    long_path = next(iter(ids))
    copy = tmp_path / "a" / "copy.wav"
    copy.write_bytes(long_path.read_bytes())
    manifest = tmp_path / "a" / "asr.jsonl"
    manifest.write_text(json.dumps({"audio": long_path.name, "text": "a long one"}) + "\n", encoding="utf-8")
    from qwen_tasks.ingest.register import ingest

    ingest(engine, [tmp_path / "a"], manifests=[(manifest, "asr")])
    request = LabelRequest(task="asr", max_new_tokens=4)
    result = plan_on(engine, backend, request)
    assert result.run_id is not None
    work_on(engine, result.run_id, backend)
    with engine.connect() as conn:
        windows = conn.execute(
            sa.select(schema.transcription.c.windows).where(schema.transcription.c.audio_id == ids[long_path])
        ).scalar_one()
    assert (
        len(windows) == 2
        and windows[0]["start_s"] == 0
        and windows[-1]["end_s"] == pytest.approx(35.0, abs=0.01)
    )
    rows = list(export.export_rows(engine, "asr"))
    assert len(rows) == 3  # one row per path: the long clip has two paths
    by_path = {r["audio"]: r for r in rows}
    assert by_path[str(long_path)]["reference"] == "a long one"
    assert by_path[str(copy)]["reference"] == "a long one"  # same bytes, same reference
    assert len(by_path[str(long_path)]["windows"]) == 2
    assert {"audio", "text", "model", "revision", "prompt_version", "run_id"} <= set(rows[0])


def test_clean_text_removes_nul() -> None:
    assert results.clean_text("a\x00b") == "a\ufffdb" and results.clean_text(None) is None


def test_a_heartbeat_racing_our_own_commit_is_no_lost_lease(
    engine: Engine, backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    result = plan_on(engine, backend, LabelRequest(task="cry"))
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None
    caplog.set_level("WARNING", logger="qwen_tasks")
    with leases.LeaseKeeper(engine, job.id, "w1", lease_seconds=0.3) as keeper:
        results.write_results(engine, job, "w1", results.Rows(), 0.1)  # our commit: the job is done
        time.sleep(0.4)  # several heartbeats after it
    assert keeper.lost is False
    assert "lease lost" not in caplog.text
    # a real take-over still is one
    job2 = jobs.claim_job(engine, None, "w1", 30)
    assert job2 is None  # (the only job is done)


def test_a_write_that_exhausts_its_retries_counts_the_attempt(
    engine: Engine, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    result = plan_on(engine, backend, LabelRequest(task="cry"))
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None

    def database_gone(*args: object, **kwargs: object) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(results, "write_results", database_gone)  # the database stays away for the write
    monkeypatch.setattr(results, "WRITE_ATTEMPTS", 2)
    with pytest.raises(results.WriteFailed, match="database unreachable"):
        stages.process_job(engine, job, backend, worker_id="w1")
    state = jobs.job_state(engine, job.id)
    assert state["status"] == "pending" and state["attempts"] == 1  # counted, not given back
    assert "could not store results" in state["last_error"]
