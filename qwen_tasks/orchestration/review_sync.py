"""The steps of the hourly review-sync DAG (`dags/qwen_audio_review_sync.py`) as plain functions.

push_step and pull_step call `review.sync.push` / `pull` (what `qwen-tasks review push / pull` call) and
return counts only, for XCom. The server comes from the Airflow connection `qwen_tasks_label_studio`
(host = URL, password = API key, extra `document_root`), else from LABEL_STUDIO_URL /
LABEL_STUDIO_API_KEY; the key never reaches a log, XCom or the database. Clips in a bucket are served
through an S3 storage made with the connection `qwen_tasks_s3` (else the AWS chain). Importing this
module imports neither Airflow nor the Label Studio SDK. The DAG's Params are `review.sync.SyncOptions`'s
(re-exported here), the same declaration `qwen-tasks review push`'s flags come from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from qwen_tasks.orchestration.connection import resolve_database_url, use_object_storage_connection
from qwen_tasks.review.sync import SyncOptions
from qwen_tasks.store import database as db

log = logging.getLogger(__name__)

__all__ = ["SyncOptions", "pull_step", "push_step", "server_config"]


def server_config() -> Any:
    """The Label Studio server a DAG task talks to (module docstring); ServerConfig."""
    from qwen_tasks.review.label_studio_server import CONN_ID, ServerConfig

    try:
        from airflow.sdk import Connection

        conn = Connection.get(CONN_ID)
    except Exception as exc:  # no such connection, or not inside a task: the environment's
        log.info("no Airflow connection %s (%s): using LABEL_STUDIO_URL", CONN_ID, type(exc).__name__)
        return ServerConfig.from_env()
    return ServerConfig.from_airflow(conn)


def _setup(params: Mapping[str, Any], database_url: str | None, config: Any) -> tuple[SyncOptions, Any, Any]:
    """The checked params, the labels database (migrated) and the server client of a step."""
    from qwen_tasks.review.label_studio_server import Server

    options = SyncOptions.from_mapping(params)
    use_object_storage_connection()  # bucket audio: Label Studio's S3 storage gets what we read it with
    engine = db.get_engine(database_url or resolve_database_url())
    db.upgrade(engine)
    return options, engine, Server(config if config is not None else server_config())


def push_step(
    params: Mapping[str, Any], *, database_url: str | None = None, config: Any = None
) -> dict[str, int]:
    """Push each task's review queue; counts per task and in total."""
    from qwen_tasks.review.sync import push

    options, engine, server = _setup(params, database_url, config)
    out = {"pushed": 0, "adopted": 0, "skipped": 0, "projects": 0}
    for task in options.tasks:
        summary = push(engine, server, task=task, **options.push_args())
        for line in summary.skipped:
            log.warning("not pushed: %s", line)
        out["pushed"] += summary.pushed
        out["adopted"] += summary.adopted
        out["skipped"] += len(summary.skipped)
        out["projects"] += len(summary.projects)
    return out


def pull_step(
    params: Mapping[str, Any], *, database_url: str | None = None, config: Any = None
) -> dict[str, Any]:
    """Pull every project of the DAG's tasks; counts of annotations and labels changed, and `reviewed`:
    human labels written per task (each task with some gets a `reviews/<task>` asset event)."""
    from qwen_tasks.review.new_reviews import database_now, reviewed_since
    from qwen_tasks.review.sync import pull

    options, engine, server = _setup(params, database_url, config)
    started = database_now(engine)
    out: dict[str, Any] = dict.fromkeys(
        ("new", "updated", "deleted", "labels_written", "labels_removed", "errors"), 0
    )
    for task in options.tasks:
        summary = pull(engine, server, task=task, dataset_names=options.datasets).to_dict()
        for line in summary["errors"]:
            log.warning("not pulled: %s", line)
        for name in list(out):
            out[name] += len(summary[name]) if name == "errors" else summary[name]
    # per task, the human labels this pull wrote: the DAG emits a reviews/<task> event for each (fine-tune)
    out["reviewed"] = reviewed_since(engine, started)
    return out
