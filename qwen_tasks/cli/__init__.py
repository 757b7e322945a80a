"""The `qwen-tasks` command line: thin wrappers that parse options and call the library.

Each area registers its commands on `app` from its own module (imported at the bottom), so the CLI and
the DAG call the same library functions and neither holds logic the other lacks.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console
from sqlalchemy.engine import Engine

from qwen_tasks.errors import QwenTasksError

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


def main() -> None:
    """Console-script entry point: library errors become one line on stderr, not a traceback; SIGTERM
    (after the job in hand was given back) exits 143 and Ctrl-C 130, each with one line."""
    from qwen_tasks.labelling.worker import Terminated

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except QwenTasksError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Terminated:
        console.print("stopped by SIGTERM (the job in hand was given back)", highlight=False)
        sys.exit(143)
    except KeyboardInterrupt:
        console.print("interrupted (the job in hand was given back)", highlight=False)
        sys.exit(130)


# Command modules register themselves on `app`; `--help` lists them in this order.
from qwen_tasks.cli import db_cmd, ingest_cmd, label_cmd, model_cmd, review_cmd, finetune_cmd  # noqa: E402,F401,I001
