"""The DAG's wait for an external worker fleet (`workers=external`): a deferrable operator and its trigger.

With external workers (`qwen-tasks work --follow` processes that keep the model loaded on their GPUs),
the DAG only plans; the jobs are labelled outside Airflow. `WaitForWorkersOperator` then defers to
`RunsFinishedTrigger`, which polls `run_progress`-style counts in the triggerer's event loop, so no
Airflow worker slot is held while the GPUs work. With `workers=airflow` the operator returns at once.

Imports Airflow: only the DAG file (and the triggerer, by class path) imports this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from qwen_tasks.config import Settings, get_settings

CLASSPATH = "qwen_tasks.orchestration.triggers.RunsFinishedTrigger"


def poll_seconds() -> float:
    """How often the trigger looks at the runs (`config.Settings.wait_poll_seconds`: read strictly, so a
    bad QWEN_TASKS_WAIT_POLL_SECONDS fails the waiting task with one line naming it)."""
    return get_settings().wait_poll_seconds


def _progress(run_ids: Sequence[int]) -> dict[str, Any]:
    from qwen_tasks.orchestration.connection import resolve_database_url
    from qwen_tasks.orchestration.steps import runs_progress

    return runs_progress(run_ids, database_url=resolve_database_url())


class RunsFinishedTrigger(BaseTrigger):
    """Fires when every run in `run_ids` is done or failed (their jobs finished or used up attempts)."""

    def __init__(self, run_ids: Sequence[int], poll_seconds: float = Settings.wait_poll_seconds) -> None:
        super().__init__()
        self.run_ids = [int(r) for r in run_ids]
        self.poll_seconds = float(poll_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {"run_ids": self.run_ids, "poll_seconds": self.poll_seconds}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        last = None
        while True:
            try:
                progress = await asyncio.to_thread(_progress, self.run_ids)
            except Exception as exc:  # a database blip: keep waiting, say so
                self.log.warning("could not read run progress (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(self.poll_seconds)
                continue
            if progress["finished"]:
                yield TriggerEvent(progress)
                return
            summary = {k: (v["done"], v["pending"] + v["running"]) for k, v in progress["runs"].items()}
            if summary != last:
                last = summary
                self.log.info(
                    "waiting for external workers: %s",
                    ", ".join(f"run {k}: {d} job(s) done, {o} open" for k, (d, o) in summary.items()),
                )
            await asyncio.sleep(self.poll_seconds)


class WaitForWorkersOperator(BaseOperator):
    """Waits (deferred) until the DAG run's runs are finished when `params.workers` is `external`."""

    template_fields = ("run_ids",)

    def __init__(self, *, run_ids: Any, wait_timeout: timedelta = timedelta(hours=20), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_ids = run_ids
        self.wait_timeout = wait_timeout

    def execute(self, context: Any) -> dict[str, Any]:
        from qwen_tasks.labelling.options import Workers
        from qwen_tasks.orchestration.steps import options

        workers = options(context["params"]).workers
        run_ids = [int(r) for r in self.run_ids or []]
        if workers != Workers.EXTERNAL or not run_ids:
            self.log.info("workers=%s, runs %s: nothing to wait for", workers, run_ids)
            return {"waited": False, "run_ids": run_ids}
        progress = _progress(run_ids)
        if progress["finished"]:
            return self._finished(progress)
        self.log.info("runs %s are labelled by external workers; deferring until they finish", run_ids)
        self.defer(
            trigger=RunsFinishedTrigger(run_ids, poll_seconds()),
            method_name="execute_complete",
            timeout=self.wait_timeout,
        )
        raise AssertionError("unreachable: defer() raises")  # pragma: no cover

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        return self._finished(event)

    def _finished(self, progress: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        runs = progress["runs"]
        failed = sum(int(r["failed"]) for r in runs.values())
        self.log.info("runs finished: %s", runs)
        if failed:  # a retry would find the same: fail for good, like label_batch
            raise AirflowFailException(
                f"{failed} job(s) failed after all attempts in runs {sorted(runs)} (label_job.last_error)"
            )
        return {
            "waited": True,
            "run_ids": sorted(int(r) for r in runs),
            "jobs_done": sum(int(r["done"]) for r in runs.values()),
        }
