"""Processing jobs in-process with the real backend on the tiny model, against the real PostgreSQL."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, ingest_clips
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ModelError
from qwen_tasks.labelling import jobs, worker
from qwen_tasks.labelling.backends import get_backend
from qwen_tasks.labelling.backends.base import Backend
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.records import LabelRequest
from qwen_tasks.review import export
from qwen_tasks.store import schema


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> Backend:
    return get_backend(str(tiny_model_dir), device="cpu")


def plan(engine: Engine, backend: Backend, request: LabelRequest, **kw: object) -> jobs.PlanResult:
    from qwen_tasks.labelling.backends import model_info

    args: dict[str, object] = {"batch_size": 4, "max_batch_seconds": 60.0}
    args.update(kw)
    return jobs.plan_run(
        engine, task=request.task, model_info=model_info(backend, request), request=request, **args
    )  # type: ignore[arg-type]


def work(engine: Engine, run_id: int, backend: Backend, **kw: object) -> worker.WorkSummary:
    return worker.work(engine, run_id, lambda run: backend, lease_seconds=30, **kw)  # type: ignore[arg-type]


def test_job_results_done_mark_and_counters(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 1.5, 2.0])
    request = LabelRequest(task="cry", methods=("score", "generate"), max_new_tokens=4)
    result = plan(engine, backend, request)
    assert result.run_id is not None
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None
    outcome = worker.process_job(engine, job.id, backend, worker_id="w1", job=job)
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
    # the job is finished: processing it again by id does nothing
    again = worker.process_job(engine, job.id, backend, worker_id="w2")
    assert again.status == "skipped" and count(engine, schema.cry_answer) == 6


def test_unreadable_clips_fail_alone(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 1.2, 1.4])
    resized, garbled, good = list(ids)
    with resized.open("ab") as f:  # changed since ingest: size differs
        f.write(b"\0" * 100)
    st = garbled.stat()
    garbled.write_bytes(b"x" * st.st_size)  # same size and mtime (ingest would see no change), not audio
    os.utime(garbled, ns=(st.st_atime_ns, st.st_mtime_ns))
    request = LabelRequest(task="asr", max_new_tokens=4)
    result = plan(engine, backend, request)
    assert result.run_id is not None
    summary = work(engine, result.run_id, backend)
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
    result = plan(engine, backend, LabelRequest(task="asr", max_new_tokens=4))
    assert result.run_id is not None
    summary = work(engine, result.run_id, backend)
    assert (summary.labelled, summary.failed) == (1, 1)
    with engine.connect() as conn:
        (error,) = conn.execute(sa.select(schema.label_failure.c.error)).scalars().all()
    assert error.count(str(short)) == 1 and error.startswith(f"{short}: audio too short"), error


def test_job_whose_files_are_all_gone_fails_after_max_attempts(
    engine: Engine, backend: Backend, tmp_path: Path
) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0, 3.0])
    gone = list(ids)[1]
    gone.unlink()  # deleted after ingest: the job holding only this clip errors at job level every time
    request = LabelRequest(task="cry")
    result = plan(engine, backend, request, batch_size=1, max_attempts=2)
    assert result.run_id is not None
    summary = work(engine, result.run_id, backend)
    assert (summary.jobs_done, summary.jobs_retried, summary.jobs_failed, summary.labelled) == (2, 1, 1, 2)
    with engine.connect() as conn:
        failed = conn.execute(sa.select(schema.label_job).where(schema.label_job.c.status == "failed")).one()
        run = conn.execute(sa.select(schema.label_run)).one()
    assert (
        failed.attempts == 2
        and "AudioStorageUnavailable" in failed.last_error
        and str(gone) in failed.last_error
    )
    assert run.status == "done" and run.n_labelled == 2 and run.finished_at is not None
    assert count(engine, schema.cry_answer, schema.cry_answer.c.audio_id == ids[gone]) == 0


def test_results_of_a_lost_lease_are_discarded(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    request = LabelRequest(task="cry")
    result = plan(engine, backend, request)
    assert result.run_id is not None
    mine = jobs.claim_job(engine, result.run_id, "slow-worker", lease_seconds=0.3)
    assert mine is not None
    time.sleep(0.5)
    theirs = jobs.claim_job(engine, result.run_id, "other-worker", lease_seconds=30)
    assert theirs is not None and theirs.id == mine.id
    lost = worker.process_job(engine, mine.id, backend, worker_id="slow-worker", job=mine, lease_seconds=0.3)
    assert lost.status == "lost" and count(engine, schema.cry_answer) == 0
    done = worker.process_job(engine, theirs.id, backend, worker_id="other-worker", job=theirs)
    assert done.status == "done" and count(engine, schema.cry_answer) == 1


def test_a_worker_with_another_model_or_prompt_is_refused(
    engine: Engine, backend: Backend, tmp_path: Path
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    request = LabelRequest(task="cry", question="Is a dog barking? Answer yes or no.")
    result = plan(engine, backend, request)
    assert result.run_id is not None
    with engine.begin() as conn:
        conn.execute(schema.label_run.update().values(prompt_version="someone-elses-prompt"))
    with pytest.raises(ModelError, match="someone-elses-prompt"):
        work(engine, result.run_id, backend)
    state = jobs.job_state(engine, result.job_ids[0])
    assert state["status"] == "pending" and state["attempts"] == 0  # given back, no attempt used


def test_rerun_labels_nothing_and_relabel_keeps_old_labels(
    engine: Engine,
    backend: Backend,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 2.0])

    def label(**kw: object) -> worker.LabelSummary:
        opts = LabelOptions.from_mapping(
            {"tasks": ["cry"], "model": str(tiny_model_dir), "device": "cpu", **kw}
        )
        return worker.label(engine, opts, backend_factory=lambda run: backend)

    first = label()
    assert first.run_id is not None and first.labelled == 2 and first.status == "done"
    assert label().run_id is None  # nothing new: no run, no model work
    again = label(relabel=True)
    assert again.run_id not in (None, first.run_id) and again.labelled == 2
    with engine.connect() as conn:
        per_run = dict(
            conn.execute(
                sa.select(schema.cry_answer.c.run_id, sa.func.count()).group_by(schema.cry_answer.c.run_id)
            ).all()
        )
    assert per_run == {first.run_id: 2, again.run_id: 2}
    # batch invariance across runs: the same clips give the same p_yes in a new run
    with engine.connect() as conn:
        p = conn.execute(
            sa.select(schema.cry_answer.c.run_id, schema.cry_answer.c.audio_id, schema.cry_answer.c.p_yes)
        ).all()
    by_audio: dict[int, list[float]] = {}
    for r in p:
        by_audio.setdefault(r.audio_id, []).append(r.p_yes)
    assert all(abs(a - b) < 1e-4 for a, b in by_audio.values())


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
    result = plan(engine, backend, request)
    assert result.run_id is not None
    work(engine, result.run_id, backend)
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
    assert worker.clean_text("a\x00b") == "a\ufffdb" and worker.clean_text(None) is None


def test_process_job_by_id_as_a_dag_task_does(engine: Engine, backend: Backend, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 2.0])
    result = plan(engine, backend, LabelRequest(task="cry"), batch_size=1)
    assert result.run_id is not None
    first, second = result.job_ids
    # a worker died holding the first job: a retry of the mapped task waits for its lease, then takes over
    assert jobs.claim_job_id(engine, first, "dead-worker", lease_seconds=1.0) is not None
    t0 = time.perf_counter()
    outcome = worker.process_job(engine, first, backend, worker_id="airflow-a", max_wait=30)
    assert outcome.status == "done" and outcome.attempt == 2 and time.perf_counter() - t0 >= 0.5
    assert jobs.get_run(engine, result.run_id).status == "running"  # started by the first task
    assert worker.process_job(engine, second, backend, worker_id="airflow-b").status == "done"
    run = jobs.get_run(engine, result.run_id)
    assert run.status == "done" and run.device == "cpu" and run.dtype == "float32"  # closed by the last task
    assert worker.process_job(engine, second, backend, worker_id="airflow-c").status == "skipped"


def test_a_heartbeat_racing_our_own_commit_is_no_lost_lease(
    engine: Engine, backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    result = plan(engine, backend, LabelRequest(task="cry"))
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None
    caplog.set_level("WARNING", logger="qwen_tasks")
    with worker.LeaseKeeper(engine, job.id, "w1", lease_seconds=0.3) as keeper:
        worker.write_results(engine, job, "w1", worker._Rows(), 0.1)  # our commit: the job is done
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
    result = plan(engine, backend, LabelRequest(task="cry"))
    job = jobs.claim_job(engine, result.run_id, "w1", 30)
    assert job is not None

    def database_gone(*args: object, **kwargs: object) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(worker, "write_results", database_gone)  # the database stays away for the write
    monkeypatch.setattr(worker, "WRITE_ATTEMPTS", 2)
    with pytest.raises(worker.WriteFailed, match="database unreachable"):
        worker.process_job(engine, job.id, backend, worker_id="w1", job=job)
    state = jobs.job_state(engine, job.id)
    assert state["status"] == "pending" and state["attempts"] == 1  # counted, not given back
    assert "could not store results" in state["last_error"]


def test_truncated_transcripts_and_answers_are_flagged_counted_and_reported(
    engine: Engine, backend: Backend, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`label` with --max-new-tokens 2: every transcript and generated answer of the tiny model hits the cap;
    the flag is stored per row, counted in the run's metrics and shown in the report. The default budget
    is stored as null in the run's request (the task's default per window)."""
    from qwen_tasks.quality.metrics import compute_run_metrics
    from qwen_tasks.quality.report import write_report

    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0, 3.0])

    def label(task: str, **kw: object) -> worker.LabelSummary:
        opts = LabelOptions.from_mapping(
            {"tasks": [task], "model": str(tiny_model_dir), "device": "cpu", "relabel": True, **kw}
        )
        summary = worker.label(engine, opts, backend_factory=lambda run: backend)
        assert summary.status == "done" and summary.labelled == 3
        return summary

    def column(table: sa.Table, run_id: int, *where: object) -> dict[int, bool]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(table.c.audio_id, table.c.truncated).where(table.c.run_id == run_id, *where)
            ).all()
        return {r.audio_id: r.truncated for r in rows}

    capped = label("asr", max_new_tokens=2).run_id
    assert column(schema.transcription, capped) == dict.fromkeys(ids.values(), True)
    assert jobs.get_run(engine, capped).params["request"]["max_new_tokens"] == 2
    m = compute_run_metrics(engine, capped)
    assert m["truncated"] == 3
    details = _metric_details(engine, capped, "truncated")
    assert details == {"n": 3, "rate": 1.0}
    page = write_report(engine, [capped], tmp_path / "r.html").read_text(encoding="utf-8")
    assert "3 truncated (100.0%)" in page

    default = label("asr").run_id
    run = jobs.get_run(engine, default)
    assert run.params["request"]["max_new_tokens"] is None and run.request.max_new_tokens is None
    assert compute_run_metrics(engine, default)["truncated"] == sum(
        column(schema.transcription, default).values()
    )

    both = label("cry", method="both", max_new_tokens=2).run_id
    cry = schema.cry_answer
    assert column(cry, both, cry.c.method == "generate") == dict.fromkeys(ids.values(), True)
    assert column(cry, both, cry.c.method == "score") == dict.fromkeys(ids.values(), False)
    m = compute_run_metrics(engine, both)
    assert m["generate.truncated"] == 3 and "truncated" not in m
    assert _metric_details(engine, both, "generate.truncated") == {"n": 3, "rate": 1.0}
    score_only = label("cry").run_id  # nothing generated: no truncation figure at all
    assert "generate.truncated" not in compute_run_metrics(engine, score_only)


def _metric_details(engine: Engine, run_id: int, name: str) -> dict[str, object]:
    from qwen_tasks.quality.metrics import load_run_metrics

    return load_run_metrics(engine, run_id)[name]["details"]
