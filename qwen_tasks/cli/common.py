"""What every `qwen-tasks` command module shares: the Typer `app` they register on, the stderr `console`,
`fail`, `open_database` and `print_json`.

These live here, not in `qwen_tasks/cli/__init__.py`, so the command modules import a module that imports
none of them: `__init__` imports every command module to register it, and a command module importing
`__init__` back would depend on the order of that import.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from sqlalchemy.engine import Engine

app = typer.Typer(
    name="qwen-tasks",
    help=(
        "Label audio with Qwen-Audio models (ASR transcripts and baby-cry detection) and keep the "
        "results in PostgreSQL.\n\nTypical flow: db upgrade -> ingest FOLDER -> label --task asr / "
        "--task cry -> metrics / report / export. The database is QWEN_TASKS_DATABASE_URL, or an "
        "embedded PostgreSQL under ./.qwen_tasks when unset."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True, soft_wrap=True)  # progress and messages (never hard-wrapped mid-sentence)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def open_database() -> Engine:
    """The configured database with the schema brought up to date: `db.upgrade` is idempotent and cheap,
    so no command needs a separate `db upgrade` step first (and views of newer migrations exist)."""
    from qwen_tasks.store import database as db

    engine = db.get_engine()
    db.upgrade(engine)
    return engine


def print_json(obj: Any) -> None:
    """One JSON object on stdout (progress and messages go to stderr, so stdout stays parseable)."""
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()
