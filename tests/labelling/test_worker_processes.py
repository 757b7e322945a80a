"""Worker processes on one run: concurrency, SIGKILL mid-job, a dropped database connection.

Real `qwen-tasks work` processes, the real tiny model, the real PostgreSQL. To hit "mid-job" exactly
(not by luck of timing) the test holds `LOCK TABLE cry_answer IN SHARE MODE`: a worker that has run the
model and started its one write transaction then waits inside that transaction, which is exactly where a
crash or a dropped connection is most dangerous. The test acts (kill, terminate), then releases the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from labelling_helpers import CLI, blocked_pids, count, ingest_clips, writes_blocked
from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.backends import planned_model_info
from qwen_tasks.records import LabelRequest
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow
REQUEST = LabelRequest(task="cry")


def plan(engine: Engine, model: Path, **kw: object) -> jobs.PlanResult:
    info = planned_model_info(str(model), REQUEST, device="cpu")
    result = jobs.plan_run(engine, jobs.RunRequest(
        task="cry", model_info=info, request=REQUEST, batch_size=1, max_batch_seconds=60.0,
        params={"device": "cpu"}, **kw,
    ))  # type: ignore[arg-type]  # fmt: skip
    assert result.run_id is not None
    return result


def start_worker(run_id: int, name: str, url: str, logs: Path, lease: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": url}
    args = [*CLI, "work", "--run", str(run_id), "--worker-id", name, "--lease-seconds", str(lease), "--json"]
    out = (logs / f"{name}.out").open("wb")
    err = (logs / f"{name}.err").open("wb")
    return subprocess.Popen(args, stdout=out, stderr=err, env=env)


def wait_for(what: str, check: Callable[[], object], timeout: float = 180.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen[bytes], logs: Path, name: str, timeout: float = 180) -> str:
    code = proc.wait(timeout=timeout)
    err = (logs / f"{name}.err").read_text(errors="replace")
    assert code == 0, f"{name} exited {code}: {err[-2000:]}"
    return err


def assert_each_clip_labelled_once(engine: Engine, audio_ids: list[int]) -> None:
    with engine.connect() as conn:
        labelled = conn.execute(sa.select(schema.cry_answer.c.audio_id)).scalars().all()
    assert sorted(labelled) == sorted(audio_ids)  # nothing missing, nothing twice


def test_two_workers_share_a_run_and_label_each_clip_once(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.2, 1.4, 1.6, 1.8, 2.0]).values())
    result = plan(engine, tiny_model_dir)
    with writes_blocked(engine):
        a = start_worker(result.run_id, "worker-a", database_url, tmp_path, lease=30)
        b = start_worker(result.run_id, "worker-b", database_url, tmp_path, lease=30)
        # both hold a job and wait to write it: both are doing work at the same time
        wait_for("both workers inside their write transaction", lambda: len(blocked_pids(engine)) == 2)
    finish(a, tmp_path, "worker-a")
    finish(b, tmp_path, "worker-b")
    assert_each_clip_labelled_once(engine, ids)
    with engine.connect() as conn:
        owners = conn.execute(
            sa.select(schema.label_job.c.lease_owner, sa.func.count())
            .where(schema.label_job.c.status == "done")
            .group_by(schema.label_job.c.lease_owner)
        ).all()
    assert {o for o, _ in owners} == {"worker-a", "worker-b"} and sum(n for _, n in owners) == 6
    assert jobs.get_run(engine, result.run_id).status == "done"


def test_worker_killed_mid_job_is_taken_over_after_its_lease(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.5, 2.0]).values())
    result = plan(engine, tiny_model_dir)
    with writes_blocked(engine):
        a = start_worker(result.run_id, "doomed", database_url, tmp_path, lease=2)
        wait_for("the worker inside its write transaction", lambda: blocked_pids(engine))
        with engine.connect() as conn:
            # the job being written, and (overlapped worker) the ones in the model and prefetched
            held = (
                conn.execute(
                    sa.select(schema.label_job.c.id).where(schema.label_job.c.lease_owner == "doomed")
                )
                .scalars()
                .all()
            )
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
    b = start_worker(result.run_id, "rescuer", database_url, tmp_path, lease=2)
    finish(b, tmp_path, "rescuer")
    assert_each_clip_labelled_once(engine, ids)
    assert held
    for job_id in held:
        state = jobs.job_state(engine, job_id)
        assert state["status"] == "done" and state["attempts"] == 2 and state["lease_owner"] == "rescuer"
        assert "lease of doomed expired" in state["last_error"]
    run = jobs.get_run(engine, result.run_id)
    assert run.status == "done"
    with engine.connect() as conn:
        n_labelled = conn.execute(sa.select(schema.label_run.c.n_labelled)).scalar_one()
    assert n_labelled == 3  # the killed transaction's counter update was rolled back with it


def test_dropped_connection_mid_write_is_retried_and_completes(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.5]).values())
    result = plan(engine, tiny_model_dir)
    with writes_blocked(engine) as conn:
        a = start_worker(result.run_id, "survivor", database_url, tmp_path, lease=30)
        first = wait_for("the worker inside its write transaction", lambda: blocked_pids(engine))
        (victim,) = first  # type: ignore[misc]
        assert conn.execute(sa.select(sa.func.pg_terminate_backend(victim))).scalar_one()
        # the worker reconnects and retries the same write: it blocks again, on a new connection
        wait_for("the retried write", lambda: blocked_pids(engine) - {victim})
    err = finish(a, tmp_path, "survivor")
    assert "database connection lost" in err and "retry 1/" in err
    assert_each_clip_labelled_once(engine, ids)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.label_job.c.status, schema.label_job.c.attempts)).all()
    assert all(status == "done" for status, _ in rows)
    assert count(engine, schema.label_run, schema.label_run.c.n_labelled == 2) == 1


def test_worker_killed_while_its_prefetch_holds_a_job(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """The overlapped worker holds job 1 (writing), job 2 (model) and job 3 (prefetched: claimed, read
    and featurised) at once, never a fourth. SIGKILL then: all three leases run out, another worker takes
    them over, no clip is lost and none labelled twice; the job never claimed used one attempt only."""
    ids = list(ingest_clips(engine, tmp_path / "audio", [1.0, 1.2, 1.4, 1.6]).values())
    result = plan(engine, tiny_model_dir)
    job = schema.label_job.c

    def held_by_doomed() -> list[int]:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(job.id).where(job.lease_owner == "doomed")).scalars())

    with writes_blocked(engine):
        a = start_worker(result.run_id, "doomed", database_url, tmp_path, lease=2)
        wait_for("the worker inside its write transaction", lambda: blocked_pids(engine))
        wait_for("a prefetched job behind the one in the model", lambda: len(held_by_doomed()) == 3)
        time.sleep(1.0)  # several heartbeats: the worker does not claim a fourth job meanwhile
        held = held_by_doomed()
        assert len(held) == 3
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
    with engine.connect() as conn:
        (untouched,) = conn.execute(sa.select(job.id).where(job.id.not_in(held))).scalars().all()
        assert conn.execute(sa.select(job.status).where(job.id == untouched)).scalar_one() == "pending"
    b = start_worker(result.run_id, "rescuer", database_url, tmp_path, lease=2)
    finish(b, tmp_path, "rescuer")
    assert_each_clip_labelled_once(engine, ids)
    for job_id in held:
        state = jobs.job_state(engine, job_id)
        assert state["status"] == "done" and state["attempts"] == 2 and state["lease_owner"] == "rescuer"
        assert "lease of doomed expired" in state["last_error"]
    assert jobs.job_state(engine, untouched)["attempts"] == 1
    assert jobs.get_run(engine, result.run_id).status == "done"
    assert count(engine, schema.label_run, schema.label_run.c.n_labelled == 4) == 1


def test_sigterm_hands_back_every_job_the_overlapped_worker_holds(
    engine: Engine,
    database_url: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """SIGTERM while job 1 is being written, job 2 in the model and job 3 prefetched: all three go back
    to pending without using an attempt, nothing is written, and the worker exits 143."""
    ingest_clips(engine, tmp_path / "audio", [1.0, 1.2, 1.4])
    result = plan(engine, tiny_model_dir)
    job = schema.label_job.c
    with writes_blocked(engine):
        a = start_worker(result.run_id, "terminated", database_url, tmp_path, lease=60)
        wait_for("the worker inside its write transaction", lambda: blocked_pids(engine))
        wait_for(
            "three jobs held",
            lambda: (
                count(engine, schema.label_job, job.lease_owner == "terminated", job.status == "running") == 3
            ),
        )
        a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=60) == 143
    with engine.connect() as conn:
        rows = conn.execute(sa.select(job.status, job.attempts, job.last_error)).all()
    assert len(rows) == 3
    assert all(
        status == "pending" and attempts == 0 and "SIGTERM" in error for status, attempts, error in rows
    )
    assert count(engine, schema.cry_answer) == 0
