"""`qwen-tasks review push / review pull`: thin wrappers over `review.sync` (live Label Studio review).

The server comes from LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (never printed), local audio from
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; docs/review.md has the setup. `push`'s flags are generated from
`review.sync.SyncOptions`, the declaration the review-sync DAG's Params come from.
"""

from __future__ import annotations

from typing import Any

import typer

from qwen_tasks.cli.common import check_task, console, open_database, print_json
from qwen_tasks.cli.flags import generated_flags, given
from qwen_tasks.cli.review_cmd import (
    announce_reviews,
    review_app,
)  # one `review` group: queue (review_cmd), push, pull
from qwen_tasks.review.sync import SyncOptions


def _server():  # noqa: ANN202 - label_studio_server.Server; the SDK is imported only when used
    from qwen_tasks.review.label_studio_server import Server, ServerConfig

    return Server(ServerConfig.from_env())


@review_app.command("push")
@generated_flags(SyncOptions)  # --dataset, --strategy, --limit, --random-share: the review-sync DAG's Params
def push(
    task: str = typer.Option(..., "--task", help="cry or asr."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    **flags: Any,
) -> None:
    """Send clips to review: one Label Studio project per (dataset, task), the model's answer as a
    prediction, audio through a Local Files storage; never a clip twice to a project, never a clip already
    reviewed."""
    from qwen_tasks.review.sync import push as run_push

    check_task(task)
    options = SyncOptions.from_mapping({**given(flags), "tasks": [task]}, flags=True)
    summary = run_push(open_database(), _server(), task=task, **options.push_args())
    for project in summary.projects:
        console.print(
            f"{project['title']} (project {project['project_id']}): {project['pushed']} pushed, "
            f"{project['in_project']} in the project",
            highlight=False,
        )
    for skipped in summary.skipped:
        console.print(f"[yellow]skipped:[/] {skipped}", highlight=False, soft_wrap=True)
    if as_json:
        print_json(summary.to_dict())


@review_app.command("pull")
def pull(
    task: str = typer.Option(None, "--task", help="Only projects of this task (cry or asr)."),
    dataset: list[str] = typer.Option(None, "--dataset", help="Only these datasets' projects (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Import new, changed and deleted annotations since the last pull; resolve each clip's human label
    (docs/review.md: the rule). Pulling again with nothing changed in Label Studio changes nothing."""
    from qwen_tasks.review.new_reviews import database_now
    from qwen_tasks.review.sync import pull as run_pull

    check_task(task)
    engine = open_database()
    started = database_now(engine)
    summary = run_pull(engine, _server(), task=task, dataset_names=list(dataset or []))
    console.print(
        f"annotations: {summary.new} new, {summary.updated} updated, {summary.deleted} deleted; "
        f"human labels: {summary.labels_written} written, {summary.labels_removed} removed "
        f"({len(summary.projects)} project(s))",
        highlight=False,
    )
    announce_reviews(engine, started, source="qwen-tasks review pull")
    for error in summary.errors:
        console.print(f"[yellow]skipped:[/] {error}", highlight=False, soft_wrap=True)
    if as_json:
        print_json(summary.to_dict())
