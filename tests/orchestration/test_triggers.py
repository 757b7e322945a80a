"""The deferrable wait for external workers: the operator defers while runs are open, and the trigger
fires once they are finished (real database, real jobs; the trigger's event loop run here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from labelling_helpers import ingest_clips
from sqlalchemy.engine import Engine

from qwen_tasks.labelling import jobs
from qwen_tasks.labelling.backends import planned_model_info
from qwen_tasks.records import LabelRequest

airflow_wait = pytest.importorskip("qwen_tasks.orchestration.triggers")


def test_trigger_fires_when_the_runs_are_finished(
    engine: Engine, tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_QWEN_TASKS_DB", raising=False)
    ingest_clips(engine, tmp_path / "a", [1.0, 1.5])
    request = LabelRequest(task="cry")
    info = planned_model_info("Qwen/Qwen2-Audio-7B-Instruct", request, device="cpu")
    plan = jobs.plan_run(
        engine,
        jobs.RunRequest(
            task="cry",
            model_info=info,
            request=request,
            batch_size=1,
            max_batch_seconds=60,
            max_attempts=1,
        ),
    )  # one attempt: a released job fails for good
    assert plan.run_id is not None
    trigger = airflow_wait.RunsFinishedTrigger([plan.run_id], poll_seconds=0.05)
    assert trigger.serialize() == (airflow_wait.CLASSPATH, {"run_ids": [plan.run_id], "poll_seconds": 0.05})

    async def wait_and_finish() -> dict:
        events = trigger.run()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.3)
        assert not first.done()  # both jobs still open: no event
        for _ in plan.job_ids:  # an external worker finishes the jobs (one fails for good)
            job = jobs.claim_job(engine, plan.run_id, "fleet", 30)
            assert job is not None
            jobs.release_job(engine, job, "fleet", "boom")
        jobs.finish_run_if_complete(engine, plan.run_id)
        event = await asyncio.wait_for(first, timeout=10)
        return event.payload

    payload = asyncio.run(wait_and_finish())
    assert payload["finished"] is True
    assert payload["runs"][str(plan.run_id)]["failed"] == 2
    assert payload["runs"][str(plan.run_id)]["status"] == "failed"


def test_poll_seconds_is_a_setting_and_a_bad_value_is_one_line_naming_it(monkeypatch) -> None:
    from qwen_tasks.errors import ConfigError

    monkeypatch.delenv("QWEN_TASKS_WAIT_POLL_SECONDS", raising=False)
    assert airflow_wait.poll_seconds() == 30.0
    monkeypatch.setenv("QWEN_TASKS_WAIT_POLL_SECONDS", "2.5")
    assert airflow_wait.poll_seconds() == 2.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("QWEN_TASKS_WAIT_POLL_SECONDS", bad)
        with pytest.raises(ConfigError, match="QWEN_TASKS_WAIT_POLL_SECONDS") as info:
            airflow_wait.poll_seconds()
        assert "\n" not in str(info.value)
