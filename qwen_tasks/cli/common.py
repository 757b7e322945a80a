"""What every `qwen-tasks` command module shares: the Typer `app` they register on, the stderr `console`,
`fail` / `report_error`, `open_database` and `print_json`.

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


def wants_json() -> bool:
    """Whether the command was asked for `--json`: its parameters while it runs (also under CliRunner),
    the process's arguments once it has ended (`main` handling an error the command raised)."""
    from typer._click.globals import get_current_context  # Typer's own (vendored) click, not `click`'s

    ctx = get_current_context(silent=True)
    if ctx is None:
        return "--json" in sys.argv[1:]
    while ctx is not None:
        if ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return False


def report_error(message: str, *, as_json: bool) -> None:
    """The one way a command reports that it failed: one line on stderr and, for `--json`, one JSON object
    `{"error": message}` on stdout, so a script reading stdout always gets an object to parse."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if as_json:
        print_json({"error": message})


def fail(message: str, code: int = 1, *, as_json: bool | None = None) -> typer.Exit:
    """Report a failure (`report_error`) and return the Exit to raise. `as_json=False` where the command
    has printed its JSON summary already, with this message as its "error"."""
    report_error(message, as_json=wants_json() if as_json is None else as_json)
    return typer.Exit(code)


def check_task(task: str | None) -> None:
    """`--task` must name a `records.Task` (None: the command takes every task): one line otherwise."""
    from qwen_tasks.records import Task

    if task is not None and task not in set(Task):
        raise fail(f"--task must be {' or '.join(sorted(Task))}, got {task!r}")


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


def announce(uri: str, extra: dict[str, Any], *, starts: str, otherwise: str) -> dict[str, Any]:
    """Post an asset event to Airflow (`orchestration.airflow_api`) when QWEN_TASKS_AIRFLOW_URL is set, and
    say what happened in one line: `starts` is what the event starts, `otherwise` how to do it by hand.
    A failed post is a warning, not a failure: what the command did stands. Returns a JSON-able result."""
    from qwen_tasks.orchestration import airflow_api

    if not airflow_api.configured():
        console.print(
            f"no automatic run was requested ({airflow_api.URL_VAR} is not set); {otherwise}",
            highlight=False,
        )
        return {"asset_event": None, "reason": f"{airflow_api.URL_VAR} is not set"}
    try:
        posted = airflow_api.post_asset_event(uri, extra)
    except airflow_api.AirflowApiError as exc:
        console.print(f"[yellow]warning:[/] no asset event posted: {exc}; {otherwise}", highlight=False)
        return {"asset_event": None, "reason": str(exc)}
    console.print(f"posted asset event {posted.event_id} on {uri} to Airflow: {starts}", highlight=False)
    return {"asset_event": posted.event_id, "uri": uri}
