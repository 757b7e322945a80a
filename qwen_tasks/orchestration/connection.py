"""Which labels database a DAG task talks to: the Airflow connection `qwen_tasks_db`, else the CLI's URL.

Airflow users keep database credentials in Airflow connections (UI, secrets backend, or the
`AIRFLOW_CONN_QWEN_TASKS_DB` environment variable in URI or JSON form); CLI users set
`QWEN_TASKS_DATABASE_URL`. Both must reach the same database, so this module turns the connection into
the SQLAlchemy URL `qwen_tasks.store.database` expects. Order: the Airflow connection, then
QWEN_TASKS_DATABASE_URL, then the embedded server (what `qwen_tasks.store.database.get_engine()` does
with no URL).

Object storage the same way: the Airflow connection `qwen_tasks_s3` (type `aws`: login = access key id,
password = secret key, extra `endpoint_url` / `region_name` / `aws_session_token`), or
`AIRFLOW_CONN_QWEN_TASKS_S3`, becomes the s3fs storage options of `qwen_tasks.ingest.sources` for the
task's process (`use_object_storage_connection`); without it, the standard AWS chain (AWS_* variables,
~/.aws) applies, as for the CLI. The secret stays in memory: never logged, stored or returned.

Importing this module never imports Airflow: the CLI and the tests use it without Airflow set up.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from sqlalchemy.engine import URL, Engine

from qwen_tasks.errors import ConfigError
from qwen_tasks.store import database as db

log = logging.getLogger(__name__)

CONN_ID = "qwen_tasks_db"
ENV_VAR = "AIRFLOW_CONN_" + CONN_ID.upper()
S3_CONN_ID = "qwen_tasks_s3"
S3_ENV_VAR = "AIRFLOW_CONN_" + S3_CONN_ID.upper()
_AWS_TYPES = {"aws", "s3"}
_POSTGRES_TYPES = {"postgres", "postgresql"}
# Connection extras that are libpq connection parameters (passed through as URL query arguments).
_LIBPQ_EXTRAS = {
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "application_name",
    "connect_timeout",
    "options",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
}


@dataclass(frozen=True)
class ConnFields:
    """The parts of an Airflow connection we use (Airflow's Postgres convention: `schema` = database)."""

    conn_type: str
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = None
    schema: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fields_from_env_value(value: str, env_var: str = ENV_VAR) -> ConnFields:
    """Parse an AIRFLOW_CONN_* value the way Airflow does: JSON object if it starts with `{`, else URI."""
    text = value.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{env_var} is not valid JSON: {exc.msg} (column {exc.colno})") from None
        extra = raw.get("extra") or {}
        if isinstance(extra, str):
            try:
                extra = json.loads(extra) if extra.strip() else {}
            except json.JSONDecodeError:
                raise ConfigError(f"{env_var}: 'extra' is not valid JSON") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"{env_var}: 'extra' must be a JSON object")
        port = raw.get("port")
        return ConnFields(
            conn_type=str(raw.get("conn_type") or ""),
            host=raw.get("host"),
            port=int(port) if port not in (None, "") else None,
            login=raw.get("login"),
            password=raw.get("password"),
            schema=raw.get("schema"),
            extra=dict(extra),
        )
    parts = urlsplit(text)
    if not parts.scheme:
        raise ConfigError(f"{env_var} must be a URI like postgresql://user:pw@host:5432/db or a JSON object")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    extra: dict[str, Any] = {}
    if "__extra__" in query:  # Airflow's way of putting a JSON extra into a URI
        try:
            extra = dict(json.loads(query.pop("__extra__")))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise ConfigError(f"{env_var}: __extra__ is not a JSON object") from None
    extra.update(query)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{env_var} has an invalid port") from None
    return ConnFields(
        conn_type=parts.scheme.replace("-", "_"),
        host=unquote(parts.hostname) if parts.hostname else None,
        port=port,
        login=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        schema=unquote(parts.path[1:]) if len(parts.path) > 1 else None,
        extra=extra,
    )


def fields_from_airflow(conn: Any) -> ConnFields:
    """Read an Airflow `Connection` object (from the metadata DB or a secrets backend)."""
    return ConnFields(
        conn_type=conn.conn_type or "",
        host=conn.host or None,
        port=conn.port or None,
        login=conn.login or None,
        password=conn.password or None,
        schema=conn.schema or None,
        extra=dict(conn.extra_dejson or {}),
    )


def to_sqlalchemy_url(conn: ConnFields) -> URL:
    """The SQLAlchemy URL for a Postgres connection; anything else is a ConfigError naming the problem."""
    if conn.conn_type.lower() not in _POSTGRES_TYPES:
        raise ConfigError(
            f"connection {CONN_ID} must be of type postgres (got {conn.conn_type or 'none'!r}); "
            "the labels database is PostgreSQL"
        )
    if not conn.schema:
        raise ConfigError(f"connection {CONN_ID} names no database (Airflow's 'schema' field)")
    query = {k: str(v) for k, v in conn.extra.items() if k in _LIBPQ_EXTRAS}
    return URL.create(
        "postgresql+psycopg2",
        username=conn.login,
        password=conn.password,
        host=conn.host,
        port=conn.port,
        database=conn.schema,
        query=query,
    )


def _from_airflow_runtime(conn_id: str = CONN_ID) -> ConnFields | None:
    """The connection as a running task sees it (metadata DB, secrets backends); None outside a task."""
    try:
        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        return None
    try:
        return fields_from_airflow(Connection.get(conn_id))
    except AirflowNotFoundException:
        return None
    except Exception as exc:  # not inside a task (no supervisor to ask): fall back quietly
        log.debug("no Airflow runtime to look up %s: %s", conn_id, exc)
        return None


def resolve_database_url(*, use_airflow: bool = True) -> str | None:
    """The labels database URL for a DAG task, or None for the embedded server (see module docstring)."""
    env_value = os.environ.get(ENV_VAR)
    fields = fields_from_env_value(env_value) if env_value else None
    if fields is None and use_airflow:
        fields = _from_airflow_runtime()
    if fields is not None:
        return to_sqlalchemy_url(fields).render_as_string(hide_password=False)
    return os.environ.get("QWEN_TASKS_DATABASE_URL") or None


def get_engine() -> Engine:
    """The engine a DAG task uses: `qwen_tasks.store.database.get_engine` on the resolved URL."""
    return db.get_engine(resolve_database_url())


def to_storage_options(conn: ConnFields) -> dict[str, Any]:
    """s3fs storage options of an `aws` connection: key and secret from login and password, the endpoint
    (MinIO, Ceph, a local server) and region from its extra. Any other type is a ConfigError."""
    if conn.conn_type.lower() not in _AWS_TYPES:
        raise ConfigError(f"connection {S3_CONN_ID} must be of type aws (got {conn.conn_type or 'none'!r})")
    options: dict[str, Any] = {}
    if conn.login:
        options["key"] = conn.login
    if conn.password:
        options["secret"] = conn.password
    if conn.extra.get("aws_session_token"):
        options["token"] = conn.extra["aws_session_token"]
    client = {k: str(conn.extra[k]) for k in ("endpoint_url", "region_name") if conn.extra.get(k)}
    if client:
        options["client_kwargs"] = client
    return options


def use_object_storage_connection(*, use_airflow: bool = True) -> bool:
    """Read s3:// objects with the connection `qwen_tasks_s3` in this process, when there is one (True);
    else leave the standard AWS chain in place (False)."""
    from qwen_tasks.ingest import sources

    env_value = os.environ.get(S3_ENV_VAR)
    fields = fields_from_env_value(env_value, S3_ENV_VAR) if env_value else None
    if fields is None and use_airflow:
        fields = _from_airflow_runtime(S3_CONN_ID)
    if fields is None:
        return False
    sources.set_storage_options("s3", to_storage_options(fields))
    log.info("object storage: s3:// through the connection %s", S3_CONN_ID)
    return True
