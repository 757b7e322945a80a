"""`qwen-tasks db ...`: prepare and inspect the database."""

from __future__ import annotations

import typer

from qwen_tasks.cli.common import app, console
from qwen_tasks.store import database as db

db_app = typer.Typer(
    help="Create or upgrade the database schema and show where it lives.", no_args_is_help=True
)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def upgrade() -> None:
    """Apply pending schema migrations from sql/migrations (safe to run again: it changes nothing then)."""
    engine = db.get_engine()
    applied = db.upgrade(engine)
    where = db.printable_location(engine.url)
    if applied:
        console.print(f"applied {len(applied)} migration(s) to {where}: {', '.join(applied)}")
    else:
        console.print(f"database {where} is up to date")


@db_app.command("status")
def status() -> None:
    """Show the database in use (password hidden) and the migrations applied to it."""
    engine = db.get_engine()
    applied = db.applied_migrations(engine)
    console.print(f"database: {db.printable_location(engine.url)}")
    console.print(f"migrations applied: {', '.join(applied) or 'none (run: qwen-tasks db upgrade)'}")


@db_app.command("stop")
def stop() -> None:
    """Stop the embedded PostgreSQL server (only used when QWEN_TASKS_DATABASE_URL is unset)."""
    from qwen_tasks.config import get_settings

    pgdata = get_settings().embedded_pgdata
    stopped = db.stop_embedded(pgdata)
    console.print(f"embedded server in {pgdata} {'stopped' if stopped else 'was not running'}")
