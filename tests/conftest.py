"""Shared fixtures: a throwaway PostgreSQL database per test session, never a user's data.

The server is QWEN_TASKS_TEST_DATABASE_URL (an admin URL; its database is only used to create ours),
default the local server at 127.0.0.1:5432. The database is created, migrated, and dropped at the end.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from qwen_tasks.store import database as db

DATA_TABLES = (
    "dataset, model_version, finetune_split, run_metric, human_label, label_failure, cry_answer, "
    "transcription, label_job_item, label_job, label_run, manifest_item, audio_file, audio"
)


def _admin_url() -> str:
    return os.environ.get("QWEN_TASKS_TEST_DATABASE_URL") or (
        f"postgresql+psycopg2://{getpass.getuser()}@127.0.0.1:5432/postgres"
    )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """URL of a fresh, migrated database; also exported as QWEN_TASKS_DATABASE_URL for subprocesses."""
    previous = os.environ.get("QWEN_TASKS_DATABASE_URL")
    with db.scratch_database(_admin_url(), prefix="qwen_tasks_test") as url:
        os.environ["QWEN_TASKS_DATABASE_URL"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("QWEN_TASKS_DATABASE_URL", None)
            else:
                os.environ["QWEN_TASKS_DATABASE_URL"] = previous


@pytest.fixture
def engine(database_url: str) -> Engine:
    """The test database, emptied before each test so tests do not see each other's rows."""
    eng = db.get_engine(database_url)
    with eng.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {DATA_TABLES} RESTART IDENTITY CASCADE"))
    return eng


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-init Qwen2-Audio (`qwen_tasks.dev.tiny_model`, preset `tiny`), built once per test
    session and shared by every test that needs a model. Tests that damage a checkpoint copy it first."""
    from qwen_tasks.dev.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model", preset="tiny")
