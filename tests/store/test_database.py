"""Migrations, constraints and connection errors, against the real local PostgreSQL (the Python
schema declarations are checked in test_schema.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from qwen_tasks.errors import DatabaseUnavailable
from qwen_tasks.store import database as db
from qwen_tasks.store import schema

CLI = [sys.executable, "-m", "qwen_tasks"]


def test_upgrade_is_idempotent(engine: Engine) -> None:
    first = db.applied_migrations(engine)
    assert first and first[0] == "0001_initial"
    assert db.upgrade(engine) == []
    assert db.applied_migrations(engine) == first


def test_constraints_keep_bad_data_out(engine: Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            schema.audio.insert().values(
                sha256="not-a-hash",
                size_bytes=10,
                duration_s=1,
                sample_rate=16000,
                channels=1,
                frames=16000,
                format="WAV",
            )
        )
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        # a quarantined path must say why
        conn.execute(schema.audio_file.insert().values(path="/x.wav", status="quarantined"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(schema.label_run.insert().values(task="translate", model="m", prompt_version="v1"))


def _cli(args: list[str], url: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "QWEN_TASKS_DATABASE_URL"}
    if url is not None:
        environment["QWEN_TASKS_DATABASE_URL"] = url
    environment.update(env)
    return subprocess.run(CLI + args, capture_output=True, text=True, env=environment, timeout=120)


def test_cli_upgrade_twice_then_status(database_url: str) -> None:
    for _ in range(2):
        out = _cli(["db", "upgrade"], database_url)
        assert out.returncode == 0, out.stderr
        assert "up to date" in out.stderr
    out = _cli(["db", "status"], database_url)
    assert "0001_initial" in out.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg2://nobody_here:secret@127.0.0.1:5432/postgres", "nobody_here"),
        ("postgresql+psycopg2://u:pw@127.0.0.1:1/postgres", "127.0.0.1:1"),
        ("sqlite:///x.db", "must point at PostgreSQL"),
    ],
)
def test_bad_database_url_is_one_line_error(url: str, expected: str) -> None:
    out = _cli(["db", "upgrade"], url)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert expected in out.stderr
    assert "secret" not in out.stderr and "pw@" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2  # one message (rich may wrap it)


def test_get_engine_raises_typed_error() -> None:
    with pytest.raises(DatabaseUnavailable, match="cannot connect"):
        db.get_engine("postgresql+psycopg2://x@127.0.0.1:1/none")


@pytest.mark.db  # its CLI subprocess starts an embedded PostgreSQL, without a fixture
def test_embedded_server_starts_and_is_reused(tmp_path) -> None:
    home = tmp_path / "home"
    try:
        for _ in range(2):
            out = _cli(["db", "upgrade"], None, QWEN_TASKS_HOME=str(home))
            assert out.returncode == 0, out.stderr
        assert "up to date" in out.stderr  # second call found the migrated database
        assert (home / "pgdata" / "PG_VERSION").exists()
    finally:
        db.stop_embedded(home / "pgdata")


def test_sessions_run_without_jit_unless_the_url_asks(database_url: str) -> None:
    """Every connection of the engine has jit off (docs/sql.md); a URL's own options still win."""
    with db.get_engine(database_url).connect() as conn:
        assert conn.exec_driver_sql("SHOW jit").scalar_one() == "off"
    url = make_url(database_url).update_query_dict({"options": "-c jit=on"})
    with db.get_engine(url).connect() as conn:
        assert conn.exec_driver_sql("SHOW jit").scalar_one() == "on"
