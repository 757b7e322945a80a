"""The `qwen-tasks` command line: thin wrappers that parse options and call the library.

Each area registers its commands on `app` (defined in `qwen_tasks.cli.common`, with what the command
modules share) from its own module, imported here; so the CLI and the DAG call the same library functions
and neither holds logic the other lacks. `main` is the console script (`qwen-tasks`, `python -m
qwen_tasks`).
"""

from __future__ import annotations

import logging
import sys

from qwen_tasks.cli.common import app, console
from qwen_tasks.errors import QwenTasksError

# Command modules register themselves on `app`; `--help` lists them in this order.
# isort: off
from qwen_tasks.cli import db_cmd, ingest_cmd, label_cmd, model_cmd, review_cmd, finetune_cmd  # noqa: F401
# isort: on

__all__ = ["app", "main"]


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
