"""Planning runs and claiming jobs, against the real PostgreSQL (no model needed for these)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import count, ingest_clips
from sqlalchemy.engine import Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.labelling import jobs
from qwen_tasks.records import LabelRequest, ModelInfo, RunStatus
from qwen_tasks.store import schema

INFO = ModelInfo(
    model="test/model", revision="r1", dtype="", device="", prompt_version="p1", prompt_template="t"
)
CRY = LabelRequest(task="cry")


def plan(engine: Engine, **kw: object) -> jobs.PlanResult:
    args: dict[str, object] = {
        "task": "cry",
        "model_info": INFO,
        "request": CRY,
        "batch_size": 3,
        "max_batch_seconds": 4.0,
    }
    args.update(kw)
    return jobs.plan_run(engine, jobs.RunRequest(**args))  # type: ignore[arg-type]


def job_rows(engine: Engine, run_id: int) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(schema.label_job).where(schema.label_job.c.run_id == run_id).order_by("seq")
        ).all()


def items_of(engine: Engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(schema.label_job_item.c.audio_id).where(schema.label_job_item.c.job_id == job_id)
            ).scalars()
        )


def test_make_batches_respects_both_budgets_and_keeps_long_clips() -> None:
    items = [(1, 9.0), (2, 0.5), (3, 2.0), (4, 1.0), (5, 3.0), (6, 1.5)]
    batches = jobs.make_batches(items, batch_size=3, max_batch_seconds=4.0)
    assert [[a for a, _ in b] for b in batches] == [[2, 4, 6], [3], [5], [1]]
    assert jobs.make_batches([], 3, 4.0) == []
    with pytest.raises(ConfigError, match="batch_size"):
        jobs.make_batches(items, 0, 4.0)
    with pytest.raises(ConfigError, match="max_batch_seconds"):
        jobs.make_batches(items, 2, 0)


def test_plan_run_writes_duration_sorted_jobs_in_one_run(engine: Engine, tmp_path: Path) -> None:
    ids = list(ingest_clips(engine, tmp_path / "a", [9.0, 0.5, 2.0, 1.0, 3.0, 1.5]).values())
    result = plan(engine)
    assert result.run_id is not None and result.n_items == 6 and result.n_left_over == 0
    rows = job_rows(engine, result.run_id)
    assert [r.id for r in rows] == result.job_ids
    assert [r.n_items for r in rows] == [3, 1, 1, 1]
    assert [round(r.audio_seconds, 3) for r in rows] == [3.0, 2.0, 3.0, 9.0]
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)
    assert sorted(items_of(engine, rows[0].id)) == sorted([ids[1], ids[3], ids[5]])
    run = jobs.get_run(engine, result.run_id)
    assert (run.task, run.model, run.revision, run.prompt_version, run.status) == (
        "cry",
        "test/model",
        "r1",
        "p1",
        "planned",
    )
    assert run.request == CRY  # the worker rebuilds the request from the run
    assert run.params["batch_size"] == 3 and run.params["max_batch_seconds"] == 4.0


def test_second_plan_does_not_take_audio_of_an_unfinished_run(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 2.0])
    first = plan(engine)
    assert first.n_items == 2
    again = plan(engine)
    assert again == jobs.PlanResult(run_id=None, job_ids=[], n_items=0, n_left_over=0)
    assert count(engine, schema.label_run) == 1  # no empty run is created
    # relabel does not double-plan audio in flight either; another prompt version is another key
    assert plan(engine, relabel=True).run_id is None
    other = plan(engine, model_info=ModelInfo("test/model", "r1", "", "", "p2", "t"))
    assert other.n_items == 2


def test_limit_and_max_jobs_leave_the_rest_for_the_next_plan(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0] * 7)
    limited = plan(engine, limit=2, batch_size=1)
    assert limited.n_items == 2 and len(limited.job_ids) == 2 and limited.n_left_over == 0
    capped = plan(engine, batch_size=2, max_jobs=2)
    assert capped.n_items == 4 and capped.n_left_over == 1
    rest = plan(engine, batch_size=2)
    assert rest.n_items == 1
    with pytest.raises(ConfigError):
        plan(engine, limit=0)
    with pytest.raises(ConfigError):
        plan(engine, task="asr")  # does not match the request


def test_audio_without_an_ok_path_is_not_planned(engine: Engine, tmp_path: Path) -> None:
    ids = ingest_clips(engine, tmp_path / "a", [1.0, 2.0])
    gone = next(iter(ids))
    with engine.begin() as conn:  # what ingest records for a path that disappeared
        conn.execute(
            schema.audio_file.update()
            .where(schema.audio_file.c.audio_id == ids[gone])
            .values(status="missing", audio_id=None)
        )
    result = plan(engine)
    assert result.n_items == 1


def test_concurrent_plans_never_share_audio(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0] * 20)
    results: list[jobs.PlanResult] = []
    barrier = threading.Barrier(3)

    def planner() -> None:
        barrier.wait()
        results.append(plan(engine, batch_size=2))

    threads = [threading.Thread(target=planner) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.n_items for r in results) == 20
    with engine.connect() as conn:
        planned = conn.execute(sa.select(schema.label_job_item.c.audio_id)).scalars().all()
    assert len(planned) == len(set(planned)) == 20


def test_claim_skips_a_job_locked_by_another_connection(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 1.0, 1.0])
    result = plan(engine, batch_size=1)
    first, second, third = result.job_ids
    with engine.connect() as other:
        tx = other.begin()
        # another worker is in the middle of claiming the first job
        other.execute(
            sa.select(schema.label_job.c.id).where(schema.label_job.c.id == first).with_for_update()
        )
        t0 = time.perf_counter()
        job = jobs.claim_job(engine, result.run_id, "worker-b", lease_seconds=30)
        assert time.perf_counter() - t0 < 2.0  # did not wait for the lock
        assert job is not None and job.id == second
        assert job.attempts == 1 and job.lease_owner == "worker-b" and job.claim_seconds > 0
        tx.rollback()
    job = jobs.claim_job(engine, result.run_id, "worker-a", lease_seconds=30)
    assert job is not None and job.id == first
    job = jobs.claim_job(engine, None, "worker-a", lease_seconds=30)  # any run
    assert job is not None and job.id == third
    assert jobs.claim_job(engine, result.run_id, "worker-c", lease_seconds=30) is None


def test_two_workers_claiming_concurrently_get_distinct_jobs(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0] * 12)
    result = plan(engine, batch_size=1)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        barrier.wait()
        while (job := jobs.claim_job(engine, result.run_id, name, lease_seconds=30)) is not None:
            claimed[name].append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = claimed["a"] + claimed["b"]
    assert sorted(all_ids) == sorted(result.job_ids)  # each job exactly once


def test_expired_lease_is_taken_over_and_exhausted_job_fails(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    result = plan(engine, max_attempts=2)
    assert result.run_id is not None
    job = jobs.claim_job(engine, result.run_id, "worker-a", lease_seconds=0.5)
    assert job is not None
    assert jobs.claim_job(engine, result.run_id, "worker-b", lease_seconds=0.5) is None  # lease still held
    time.sleep(0.7)
    taken = jobs.claim_job(engine, result.run_id, "worker-b", lease_seconds=0.5)
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    assert "worker-a expired" in jobs.job_state(engine, job.id)["last_error"]
    assert not jobs.extend_lease(engine, job.id, "worker-a", 30)  # a's lease is gone
    time.sleep(0.7)
    assert jobs.claim_job(engine, result.run_id, "worker-c", lease_seconds=0.5) is None
    state = jobs.job_state(engine, job.id)
    assert state["status"] == "failed" and "attempt 2 of 2" in state["last_error"]
    assert jobs.finish_run_if_complete(engine, result.run_id) == "failed"  # every job failed


def test_heartbeat_keeps_the_lease(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0])
    result = plan(engine)
    job = jobs.claim_job(engine, result.run_id, "worker-a", lease_seconds=0.5)
    assert job is not None
    for _ in range(3):
        time.sleep(0.3)
        assert jobs.extend_lease(engine, job.id, "worker-a", 0.5)
    assert jobs.claim_job(engine, result.run_id, "worker-b", lease_seconds=0.5) is None


def test_release_retries_then_fails_with_the_error_kept(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 1.0])
    result = plan(engine, batch_size=1, max_attempts=2)
    assert result.run_id is not None
    bad, good = result.job_ids
    job = jobs.claim_job(engine, result.run_id, "w", 30)  # jobs are claimed in order: `bad` first
    assert job is not None and job.id == bad
    assert jobs.release_job(engine, job, "w", "RuntimeError: boom 1") == "pending"
    job = jobs.claim_job(engine, result.run_id, "w", 30)
    assert job is not None and job.id == bad and job.attempts == 2
    assert jobs.release_job(engine, job, "other-worker", "not mine") is None
    assert jobs.release_job(engine, job, "w", "RuntimeError: boom 2") == "failed"
    state = jobs.job_state(engine, bad)
    assert state["status"] == "failed" and state["last_error"] == "RuntimeError: boom 2"
    assert jobs.finish_run_if_complete(engine, result.run_id) is None  # the other job is still pending
    job = jobs.claim_job(engine, result.run_id, "w", 30)
    assert job is not None and job.id == good  # `bad` (failed) is not claimable any more
    assert jobs.give_back(engine, job, "w", "interrupted")  # attempt not counted
    assert jobs.job_state(engine, good)["attempts"] == 0


def test_run_progress_view_counts_jobs(engine: Engine, tmp_path: Path) -> None:
    ingest_clips(engine, tmp_path / "a", [1.0, 1.0, 2.0])
    result = plan(engine, batch_size=1, max_attempts=1)
    assert result.run_id is not None
    jobs.start_run(engine, result.run_id, INFO)
    job = jobs.claim_job(engine, result.run_id, "w", 30)
    assert job is not None
    jobs.release_job(engine, job, "w", "boom")
    jobs.claim_job(engine, result.run_id, "w", 30)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT * FROM run_progress WHERE run_id = :r"), {"r": result.run_id}
        ).one()
    assert (row.jobs, row.jobs_pending, row.jobs_running, row.jobs_done, row.jobs_failed) == (3, 1, 1, 0, 1)
    assert row.status == "running" and row.clips_planned == 3 and row.clips_in_failed_jobs == 1
    assert row.wall_seconds is not None and row.wall_seconds >= 0


def test_latest_run_ids_applies_each_filter(engine: Engine) -> None:
    """The one latest-run helper: newest run per task among the runs every given filter lets through."""

    def add(task: str, model: str, status: str, n_labelled: int, purpose: str = "label") -> int:
        with engine.begin() as conn:
            return conn.execute(
                schema.label_run.insert()
                .values(task=task, model=model, prompt_version="v1", status=status, n_labelled=n_labelled)
                .values(purpose=purpose)  # 0004: evaluation runs are runs too
                .returning(schema.label_run.c.id)
            ).scalar_one()

    cry_done = add("cry", "a", "done", 3)
    asr_done = add("asr", "a", "done", 2)
    cry_b = add("cry", "b", "done", 1)
    cry_empty = add("cry", "a", "failed", 0)
    cry_eval = add("cry", "a", "running", 1, purpose="evaluation")
    assert jobs.latest_run_ids(engine) == sorted([asr_done, cry_eval])  # evaluation runs count
    assert jobs.latest_run_ids(engine, tasks=["asr"]) == [asr_done]
    assert jobs.latest_run_ids(engine, statuses=(RunStatus.DONE,)) == sorted([asr_done, cry_b])
    assert jobs.latest_run_ids(engine, model="a", statuses=(RunStatus.DONE, RunStatus.FAILED)) == sorted(
        [asr_done, cry_empty]
    )
    assert jobs.latest_run_ids(engine, tasks=["cry"], model="a", statuses=(RunStatus.DONE,)) == [cry_done]
    with engine.connect() as conn:  # a Connection works too (export runs it inside its own)
        assert jobs.latest_run_ids(conn, tasks=["cry"], model="b") == [cry_b]
    with engine.begin() as conn:
        conn.execute(schema.label_run.update().where(schema.label_run.c.id == cry_eval).values(n_labelled=0))
    assert jobs.latest_run_ids(engine, tasks=["cry"], with_labels=True) == [cry_b]
    assert jobs.latest_run_ids(engine, tasks=["translate"]) == []
