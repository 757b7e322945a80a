"""The DAG under a real CeleryExecutor Airflow whose GPU workers cannot see the ingesting machine's files.

The audio exists only in a bucket of the real S3 test server (`s3_server`, tests/s3_server.py); the local
copies are deleted after upload. Each Celery worker runs as another machine would: its own working
directory, HOME and project home, so no file of the ingesting side is reachable through a shared path.
The tasks reach the bucket through the Airflow connection `qwen_tasks_s3` (AIRFLOW_CONN_QWEN_TASKS_S3):
the AWS_ENDPOINT_URL of their environment points at a port where nothing listens, so a task that read
through the standard chain instead would fail. The DAG run must succeed with every clip labelled once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import DATA_TABLES
from labelling_helpers import write_clips
from s3_server import S3Server
from services import require_redis
from sqlalchemy.engine import Engine

from qwen_tasks.dev.airflow_stack import AIRFLOW, DAG_ID, AirflowStack, free_port
from qwen_tasks.ingest import sources
from qwen_tasks.store import schema

pytestmark = pytest.mark.slow


class SeparateMachines(AirflowStack):
    """The stack, with each Celery worker started in its own working directory with its own HOME."""

    def spawn_worker(self, k: int) -> subprocess.Popen[bytes]:
        machine = self.home / f"machine-{k}"
        (machine / "home").mkdir(parents=True, exist_ok=True)
        (machine / "cwd").mkdir(exist_ok=True)
        env = {
            **self.env(),
            "HOME": str(machine / "home"),
            "QWEN_TASKS_HOME": str(machine / "home" / ".qwen_tasks"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
        args = ["celery", "worker", "--queues", "default,gpu", "--concurrency", "1",
                "--celery-hostname", f"w{k}@%h", "--without-mingle", "--without-gossip"]  # fmt: skip
        log = (self.home / f"worker-{k}.log").open("ab")
        proc = subprocess.Popen(
            [*AIRFLOW, *args], env=env, cwd=machine / "cwd", stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs[f"worker-{k}"] = proc
        return proc


def test_celery_workers_label_audio_that_exists_only_in_the_bucket(
    admin_url: str,
    database_url: str,
    engine: Engine,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    require_redis()  # the Celery broker
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    prefix = f"s3://{s3_bucket}/nursery"
    local = tmp_path / "ingesting-machine"
    clips = write_clips(local, [1.0, 1.3, 1.6, 1.9])
    for clip in clips:
        sources.filesystem(prefix).put_file(str(clip), f"{prefix}/{clip.name}")
    shutil.rmtree(local)  # from now on the audio exists only in the bucket

    connection = {
        "conn_type": "aws",
        "login": s3_server.env["AWS_ACCESS_KEY_ID"],
        "password": s3_server.env["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"},
    }
    stack = SeparateMachines(
        home=tmp_path / "airflow",
        admin_url=admin_url,
        labels_url=database_url,
        env_extra={
            "QWEN_TASKS_MODEL": str(tiny_model_dir),
            "QWEN_TASKS_DEVICE": "cpu",
            "QWEN_TASKS_AUDIO_DIRS": prefix,
            "QWEN_TASKS_GPU_POOL_SLOTS": "2",
            "AIRFLOW_CONN_QWEN_TASKS_S3": json.dumps(connection),
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing there: only the connection reaches the bucket
        },
    )
    conf = {"tasks": ["cry"], "batch_size": 1, "slots": 2, "max_new_tokens": 4}
    with stack:
        stack.airflow("dags", "trigger", DAG_ID, "--run-id", "bucket-only", "--conf", json.dumps(conf))
        state = stack.wait_for_run("bucket-only", timeout=900)
        assert state == "success", (stack.task_instances("bucket-only"), stack.task_logs("bucket-only"))
        logs = "\n".join(stack.task_logs("bucket-only").values())
    assert connection["password"] not in logs

    with engine.connect() as conn:
        paths = conn.execute(sa.select(schema.audio_file.c.path, schema.audio_file.c.status)).all()
        per_audio = dict(
            conn.execute(
                sa.select(schema.cry_answer.c.audio_id, sa.func.count()).group_by(
                    schema.cry_answer.c.audio_id
                )
            ).all()
        )
    assert sorted(paths) == sorted((f"{prefix}/{c.name}", "ok") for c in clips)
    assert len(per_audio) == len(clips) and set(per_audio.values()) == {1}  # every clip, once
    assert s3_server.object_gets(s3_bucket) == 2 * len(clips)  # ingest once, labelling once per clip
