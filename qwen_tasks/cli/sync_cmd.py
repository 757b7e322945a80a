"""`qwen-tasks review push / review pull`: thin wrappers over `review.sync` (live Label Studio review).

The server comes from LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (never printed), local audio from
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; docs/review.md has the setup.
"""

from __future__ import annotations

import typer

from qwen_tasks.cli.common import check_task, console, open_database, print_json
from qwen_tasks.cli.review_cmd import (
    announce_reviews,
    review_app,
)  # one `review` group: queue (review_cmd), push, pull
from qwen_tasks.review.queue import DEFAULT_RANDOM_SHARE, Strategy
from qwen_tasks.review.sync import DEFAULT_LIMIT, DEFAULT_STRATEGY


def _server():  # noqa: ANN202 - label_studio_server.Server; the SDK is imported only when used
    from qwen_tasks.review.label_studio_server import Server, ServerConfig

    return Server(ServerConfig.from_env())


@review_app.command("push")
def push(
    task: str = typer.Option(..., "--task", help="cry or asr."),
    dataset: list[str] = typer.Option(
        None,
        "--dataset",
        help="Dataset name (repeatable; default: each dataset of the task): one project each.",
    ),
    strategy: str = typer.Option(
        DEFAULT_STRATEGY.value,
        "--strategy",
        help=f"{', '.join(Strategy)} (docs/review.md).",
    ),
    limit: int = typer.Option(DEFAULT_LIMIT, "--limit", min=1, help="At most N new clips per project."),
    random_share: float = typer.Option(
        DEFAULT_RANDOM_SHARE, "--random-share", help="Share of each push drawn uniformly, in [0, 1]."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Send clips to review: one Label Studio project per (dataset, task), the model's answer as a
    prediction, audio through a Local Files storage; never a clip twice to a project, never a clip already
    reviewed."""
    from qwen_tasks.errors import ConfigError
    from qwen_tasks.review.sync import push as run_push

    try:
        chosen = Strategy(strategy)
    except ValueError:
        raise ConfigError(f"--strategy must be one of {', '.join(Strategy)}, got {strategy!r}") from None
    check_task(task)
    summary = run_push(
        open_database(),
        _server(),
        task=task,
        dataset_names=list(dataset or []),
        strategy=chosen,
        limit=limit,
        random_share=random_share,
    )
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
