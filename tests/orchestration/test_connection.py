"""The Airflow connection `qwen_tasks_db` maps to the same SQLAlchemy URL the CLI uses.

Airflow itself is only imported in a subprocess with a throwaway AIRFLOW_HOME (importing it creates
files under AIRFLOW_HOME, and tests must never touch a user's ~/airflow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from qwen_tasks.errors import ConfigError
from qwen_tasks.orchestration import connection
from qwen_tasks.orchestration.connection import (
    ENV_VAR,
    fields_from_env_value,
    resolve_database_url,
    to_sqlalchemy_url,
)


def url_of(value: str) -> sa.URL:
    return to_sqlalchemy_url(fields_from_env_value(value))


def test_uri_form_maps_every_part() -> None:
    url = url_of("postgresql://lab%40user:p%40ss%2Fw@db.example.org:6543/labels?sslmode=require&foo=bar")
    assert url.drivername == "postgresql+psycopg2"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "lab@user",
        "p@ss/w",
        "db.example.org",
        6543,
        "labels",
    )
    assert dict(url.query) == {"sslmode": "require"}  # libpq options pass, unknown extras do not


def test_json_form_and_airflow_postgres_scheme() -> None:
    value = json.dumps(
        {
            "conn_type": "postgres",
            "host": "pg",
            "port": "5432",
            "login": "labels",
            "password": "secret",
            "schema": "labels",
            "extra": {"sslmode": "disable", "application_name": "qwen"},
        }
    )
    url = url_of(value)
    assert (url.host, url.port, url.database, url.username) == ("pg", 5432, "labels", "labels")
    assert dict(url.query) == {"sslmode": "disable", "application_name": "qwen"}
    assert url_of("postgres://u@h/db").database == "db"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mysql://u:p@h/db", "must be of type postgres"),
        ("postgresql://u:p@h:5432", "names no database"),
        ('{"conn_type": "postgres", "schema": ', "not valid JSON"),
        ('{"conn_type": "postgres", "schema": "x", "extra": "{oops"}', "'extra' is not valid JSON"),
        ("just-a-hostname", "must be a URI"),
    ],
)
def test_bad_connection_is_a_clear_config_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        url_of(value)


def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_TASKS_DATABASE_URL", "postgresql+psycopg2://cli@h/cli_db")
    monkeypatch.setenv(ENV_VAR, "postgresql://airflow@h/airflow_db")
    assert make_url(resolve_database_url(use_airflow=False)).database == "airflow_db"
    monkeypatch.delenv(ENV_VAR)
    assert make_url(resolve_database_url(use_airflow=False)).database == "cli_db"
    monkeypatch.delenv("QWEN_TASKS_DATABASE_URL")
    assert resolve_database_url(use_airflow=False) is None  # embedded server, like the CLI


def test_connection_reaches_the_real_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    as_airflow_uri = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    monkeypatch.delenv("QWEN_TASKS_DATABASE_URL", raising=False)
    monkeypatch.setenv(ENV_VAR, as_airflow_uri)
    engine = connection.get_engine()
    assert engine.url.database == make_url(database_url).database
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('label_run') IS NOT NULL")).scalar() is True


def test_our_parser_agrees_with_airflows(tmp_path) -> None:
    """Airflow's own Connection parsing of the same values gives the same URL (checked in a subprocess)."""
    values = [
        "postgresql://lab%40user:p%40ss@db.example.org:6543/labels?sslmode=require",
        json.dumps(
            {"conn_type": "postgres", "host": "pg", "login": "u", "password": "p", "schema": "labels"}
        ),
    ]
    script = (
        "import json, sys\n"
        "from airflow.sdk import Connection\n"
        "from qwen_tasks.orchestration.connection import fields_from_airflow, to_sqlalchemy_url\n"
        "out = []\n"
        "for v in json.loads(sys.argv[1]):\n"
        "    parse = Connection.from_json if v.startswith('{') else Connection.from_uri\n"
        "    c = parse(v, conn_id='x')\n"
        "    out.append(to_sqlalchemy_url(fields_from_airflow(c)).render_as_string(hide_password=False))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(values)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [url_of(v).render_as_string(hide_password=False) for v in values]
    assert theirs == ours
