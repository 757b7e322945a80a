"""The `qwen-tasks` command line: thin wrappers that parse options and call the library.

Each area registers its commands on `app` (defined in `qwen_tasks.cli.common`, with what the command
modules share) from its own module, imported here; so the CLI and the DAG call the same library functions
and neither holds logic the other lacks. `main` is the console script (`qwen-tasks`, `python -m
qwen_tasks`).
"""

from __future__ import annotations

import logging
import sys

import typer

from qwen_tasks.cli.common import app, console, print_json, report_error, wants_json
from qwen_tasks.errors import QwenTasksError

# Command modules register themselves on `app`; `--help` lists them in this order.
# isort: off
from qwen_tasks.cli import db_cmd, ingest_cmd, label_cmd, model_cmd  # noqa: F401
from qwen_tasks.cli import review_cmd, sync_cmd, finetune_cmd, calibrate_cmd  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: library errors become one line on stderr, not a traceback (with
    `--json`, also `{"error": ...}` on stdout, usage errors included); SIGTERM (after the job in hand was
    given back) exits 143 and Ctrl-C 130, each with one line."""
    from qwen_tasks.labelling.worker import Terminated

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    as_json = wants_json()
    try:
        if as_json:  # Click would print a usage error as a panel and exit: here it is reported as JSON
            code = app(standalone_mode=False)
            sys.exit(code if isinstance(code, int) else 0)
        app()
    except typer.TyperException as exc:  # a usage error (bad option value, missing option)
        report_error(exc.format_message(), as_json=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        report_error("aborted", as_json=True)
        sys.exit(1)
    except QwenTasksError as exc:
        report_error(str(exc), as_json=as_json)
        sys.exit(1)
    except Terminated:
        _stopped("stopped by SIGTERM (the job in hand was given back)", as_json)
        sys.exit(143)
    except KeyboardInterrupt:
        _stopped("interrupted (the job in hand was given back)", as_json)
        sys.exit(130)


def _stopped(message: str, as_json: bool) -> None:
    """A stop asked for is no error on stderr, but `--json` still gets its one object."""
    console.print(message, highlight=False)
    if as_json:
        print_json({"error": message})
