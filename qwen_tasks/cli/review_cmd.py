"""`qwen-tasks metrics / report / review queue / review-export / review-import / export-finetune`: thin
wrappers over `metrics`, `report` and `review`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from sqlalchemy.engine import Engine

from qwen_tasks.cli.common import announce, app, check_task, console, fail, open_database, print_json
from qwen_tasks.review.queue import DEFAULT_QUEUE_LIMIT, DEFAULT_RANDOM_SHARE, Strategy

review_app = typer.Typer(
    help="Review: which clips to review first and why (queue); live Label Studio sync (push, pull).",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

STRATEGY_HELP = f"{', '.join(Strategy)} (docs/review.md)."
RANDOM_SHARE_HELP = "Share of the queue drawn uniformly at random, for unbiased quality estimates (0-1)."


def announce_reviews(engine: Engine, started: Any, *, source: str) -> None:
    """After an import or a pull: one `reviews/<task>` asset event per task whose human labels were
    written since `started` (the database's clock), so that task's fine-tune DAG may start."""
    from qwen_tasks.orchestration.assets import reviews_uri
    from qwen_tasks.review.new_reviews import reviewed_since

    for reviewed_task, n in reviewed_since(engine, started).items():
        extra = {"task": reviewed_task, "reviewed": n, "source": source}
        announce(
            reviews_uri(reviewed_task), extra,
            starts=f"qwen_audio_finetune checks whether {reviewed_task} has enough new reviewed labels",
            otherwise=f"to fine-tune on them: qwen-tasks finetune --task {reviewed_task}",
        )  # fmt: skip


def _check_strategy(strategy: str | None) -> None:
    if strategy is not None and strategy not in set(Strategy):
        raise fail(f"--strategy must be one of {', '.join(Strategy)}, got {strategy!r}")


@review_app.command("queue")
def review_queue(
    task: str = typer.Option(..., "--task", help="cry or asr."),
    strategy: str = typer.Option(..., "--strategy", help=STRATEGY_HELP),
    dataset: list[str] = typer.Option(
        None, "--dataset", help="Dataset name (repeatable) (default: every clip labelled for the task)."
    ),
    limit: int = typer.Option(None, "--limit", help=f"Clips in the queue (default {DEFAULT_QUEUE_LIMIT})."),
    random_share: float = typer.Option(
        None, "--random-share", help=f"{RANDOM_SHARE_HELP} (default {DEFAULT_RANDOM_SHARE})"
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the random share (default: a fresh one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the queue as JSON on stdout."),
) -> None:
    """Print the ranked review queue of a task, with the reason each clip is in it (nothing is sent).

    Reviewed clips are never in it. Every queue mixes in a uniform random share (--random-share); each
    clip's strategy says which part it came from.
    """
    from qwen_tasks.ingest.datasets import resolve
    from qwen_tasks.review.queue import rank

    check_task(task)
    _check_strategy(strategy)
    engine = open_database()
    scope = [d.id for d in resolve(engine, dataset, task=task)] if dataset else None
    with engine.connect() as conn:
        clips = rank(
            conn, task=task, dataset_ids=scope, strategy=Strategy(strategy),
            limit=limit or DEFAULT_QUEUE_LIMIT,
            random_share=DEFAULT_RANDOM_SHARE if random_share is None else random_share, seed=seed,
        )  # fmt: skip
    if as_json:
        print_json({"task": task, "strategy": strategy, "clips": [_queued(c) for c in clips]})
        return
    table = Table(title=f"{task} review queue, strategy {strategy}", title_justify="left")
    for column in ("#", "audio", "run", "strategy", "priority", "reason"):
        table.add_column(column, overflow="fold")
    for k, c in enumerate(clips, start=1):
        table.add_row(str(k), str(c.audio_id), str(c.run_id), c.strategy, f"{c.priority:.3f}", c.reason)
    console.print(table)
    if not clips:
        console.print("no unreviewed clip with a label matches (label the task first, or widen --dataset)")


def _queued(clip: Any) -> dict[str, Any]:
    return {"audio_id": clip.audio_id, "task": clip.task.value, "run_id": clip.run_id,
            "strategy": clip.strategy.value, "reason": clip.reason, "priority": clip.priority}  # fmt: skip


@app.command("metrics")
def metrics(
    run: list[int] = typer.Option(
        None, "--run", help="Run id (repeatable) (default: latest run of each task)."
    ),
    dataset: list[str] = typer.Option(
        None,
        "--dataset",
        help="Dataset name (repeatable): also print the figures over the run's clips of it; the runs "
        "default to the newest run of each task that covered it.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout (metric values and details)."),
) -> None:
    """Compute, store (run_metric, run_metric_group) and print quality metrics of runs.

    Cry: accuracy (shown with its coverage: decided / clips with gold), precision, recall, F1, confusion
    matrix, unknown rate, ROC AUC, best-F1 threshold and ECE (10 bins), against gold labels (human
    review first, then manifests). ASR: corpus WER (words) and CER (Chinese
    characters), per language, and the most frequent substitution pairs. The same figures are stored per
    dataset the run covered and per manifest source (SQL: the run_quality_by_dataset view).
    """
    from qwen_tasks.labelling.jobs import latest_run_ids
    from qwen_tasks.quality.calibration import shown
    from qwen_tasks.quality.metrics import compute_run_metrics, load_run_metrics, require_datasets

    engine = open_database()
    names = list(dict.fromkeys(dataset or []))
    dataset_ids = require_datasets(engine, names)  # an unknown name: one line naming it, exit 1
    if run:
        ids = list(run)
    elif names:  # the newest run of each task that covered each named dataset
        ids = sorted({i for d in dataset_ids.values() for i in latest_run_ids(engine, dataset_id=d)})
    else:
        ids = latest_run_ids(engine)  # default: the newest run of every task
    agreement = _review_agreement(engine)
    if not ids:
        if names:
            console.print(f"no labelling run covered dataset(s) {', '.join(names)} yet", highlight=False)
        else:
            console.print("no labelling runs yet (run: qwen-tasks label --task cry|asr)")
        if as_json:
            print_json({"runs": [], "review_agreement": agreement})
        return
    results = []
    for run_id in ids:
        values = compute_run_metrics(engine, run_id)
        stored = load_run_metrics(engine, run_id)
        results.append(
            {
                "run_id": values["run_id"],
                "task": values["task"],
                "model": values["model"],
                "metrics": {k: v for k, v in values.items() if k not in ("run_id", "task", "model")},
                "details": {name: m["details"] for name, m in stored.items() if m["details"]},
                **_group_results(engine, run_id, names),
            }
        )
    if as_json:
        print_json({"runs": results, "review_agreement": agreement})
        return
    for r in results:
        table = Table(title=f"run {r['run_id']} ({r['task']}, {r['model']})", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in r["metrics"].items():
            table.add_row(name, shown(name, value, r["details"]))  # an accuracy with its coverage
        console.print(table)
        top = (r["details"].get("substitutions") or {}).get("top") or []
        if top:
            pairs = ", ".join(f"{t['reference']}→{t['hypothesis']} ×{t['count']}" for t in top[:10])
            console.print(f"top substitutions: {pairs}", highlight=False, soft_wrap=True)
        _print_groups(r, names)
    _print_agreement(agreement)


def _review_agreement(engine: Engine) -> list[dict[str, Any]]:
    """Cohen's kappa per Label Studio project with clips two reviewers answered (review.resolution)."""
    from qwen_tasks.review.resolution import agreement

    with engine.connect() as conn:
        return agreement(conn)


def _print_agreement(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    table = Table(title="reviewer agreement (Label Studio projects)", title_justify="left")
    for column in ("project", "dataset", "clips with 2 reviewers", "agreement", "Cohen's kappa"):
        table.add_column(column, justify="left" if column in ("project", "dataset") else "right")
    for r in rows:
        figures = ("—" if r[k] is None else f"{r[k]:.3g}" for k in ("agreement", "kappa"))
        table.add_row(str(r["project_id"]), str(r["dataset"]), str(r["n_clips"]), *figures)
    console.print(table)


def _group_results(engine: Engine, run_id: int, names: list[str]) -> dict[str, Any]:
    """A run's per-group figures for the JSON: "groups" (grouping -> group -> metric -> value) and, with
    --dataset, "datasets" (each named dataset -> its slice's metric values, null when the run has none)."""
    from qwen_tasks.quality.metrics import load_group_metrics

    stored = load_group_metrics(engine, run_id)
    groups = {
        grouping: {group: {n: m["value"] for n, m in metrics.items()} for group, metrics in by_group.items()}
        for grouping, by_group in stored.items()
    }
    out: dict[str, Any] = {"groups": groups}
    if names:
        out["datasets"] = {name: groups.get("dataset", {}).get(name) for name in names}
    return out


def _print_groups(result: dict[str, Any], names: list[str]) -> None:
    """--dataset: each named dataset's slice, all its figures; else one compact table per grouping."""
    from qwen_tasks.quality.metrics import GROUP_FIGURES

    run_id = result["run_id"]
    if names:
        for name in names:
            values = result["datasets"][name]
            if values is None:
                console.print(f"run {run_id} did not cover dataset {name}", highlight=False)
                continue
            table = Table(title=f"run {run_id}, dataset {name}", title_justify="left")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for metric, value in values.items():
                table.add_row(metric, "—" if value is None else f"{value:.4g}")
            console.print(table)
        return
    figures = GROUP_FIGURES[result["task"]]
    short = {"n_results": "n", "n_reference": "refs", "generate": "gen", "unknown_rate": "unknown",
             "score.": "", "accuracy": "acc", "roc_auc": "auc", "error_rate": "err"}  # fmt: skip
    for grouping in ("dataset", "source"):
        groups = result["groups"].get(grouping)
        if not groups:
            continue
        table = Table(title=f"run {run_id} by {grouping}", title_justify="left")
        table.add_column(grouping, overflow="fold")
        for figure in figures:
            header = figure
            for long, abbreviation in short.items():
                header = header.replace(long, abbreviation)
            table.add_column(header, justify="right", no_wrap=True)
        for group, values in groups.items():
            table.add_row(group, *("—" if values.get(f) is None else f"{values[f]:.3g}" for f in figures))
        console.print(table)


@app.command("report")
def report(
    out: Path = typer.Option(..., "--out", help="HTML file to write (a folder gets report.html)."),
    run: list[int] = typer.Option(
        None, "--run", help="Run id (repeatable) (default: latest run of each task)."
    ),
    version: list[str] = typer.Option(
        None, "--version", help="Fine-tuned version (repeatable): base vs fine-tuned on its held-out audio."
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="Dataset name: the runs default to the newest run of each task that covered it, and each "
        "run's metrics, plots and worst items are its clips' (its row highlighted in the per-dataset table).",
    ),
) -> None:
    """Write one self-contained HTML report with plots and the worst items.

    Plots: p_yes histogram by gold label, ROC curve, WER distribution, throughput over the run; tables of
    metrics, confident mistakes, unknown answers, worst utterances and substitution pairs. With
    --version NAME: its base and fine-tuned evaluation runs side by side (overlaid ROC, or error rates and
    top substitutions) first. Each run also gets a table of its figures per dataset and per manifest
    source.
    """
    from qwen_tasks.quality.report import write_report

    path = write_report(
        open_database(), list(run) if run else None, out, versions=list(version or []), dataset=dataset
    )
    console.print(f"report written to {path}")


@app.command("review-export")
def review_export(
    task: str = typer.Option(..., "--task", help="cry or asr."),
    out: Path = typer.Option(..., "--out", help="Label Studio tasks JSON to write."),
    run: int = typer.Option(None, "--run", help="Run id (default: the task's latest run)."),
    audio_root: str = typer.Option(
        None,
        "--audio-root",
        help="Strip this folder from audio paths (for Label Studio local files: its document root).",
    ),
    audio_prefix: str = typer.Option(
        None, "--audio-prefix", help='Put this before each (relative) path, e.g. "/data/local-files/?d=".'
    ),
    limit: int = typer.Option(
        None, "--limit", min=1, help="Export at most N items (highest priority first)."
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="Only this dataset's clips (default run: the task's latest run that covered it).",
    ),
    strategy: str = typer.Option(
        None,
        "--strategy",
        help=f"{STRATEGY_HELP} Export the ranked queue (every run's current labels; limit "
        f"{DEFAULT_QUEUE_LIMIT} by default) instead of a run's review_queue, recorded as queued to "
        "file:<out>.",
    ),
    random_share: float = typer.Option(None, "--random-share", help=RANDOM_SHARE_HELP + " With --strategy."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Export a run's review queue, or the ranked queue of a --strategy, as Label Studio tasks (model
    answer pre-annotated).

    Cry tasks ask the question the run asked. To play local audio in Label Studio see docs/review.md.

    The matching labelling config is written next to the tasks file as <name>.label_config.xml.
    """
    from qwen_tasks.review.label_studio import export_label_studio

    check_task(task)
    _check_strategy(strategy)
    summary = export_label_studio(
        open_database(), out, task, run_id=run, audio_root=audio_root, audio_prefix=audio_prefix, limit=limit,
        dataset=dataset, strategy=strategy, random_share=random_share,
    )  # fmt: skip
    console.print(
        f"{summary.tasks} task(s) from {f'the {strategy} queue' if strategy else f'run {summary.run_id}'} "
        f"written to {summary.out}; "
        f"labelling config: {summary.config}",
        soft_wrap=True,  # one line, however long the paths: scripts grep it
        highlight=False,
    )
    if as_json:
        print_json(summary.to_dict())


@app.command("review-import")
def review_import(
    path: Path = typer.Argument(..., help="Label Studio export (JSON or JSON-MIN)."),
    task: str = typer.Option(None, "--task", help="Task of tasks that do not say (not needed for ours)."),
    reviewer: str = typer.Option(
        None,
        "--reviewer",
        help="Reviewer name where the export has no e-mail (Label Studio's default exports carry user ids).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Import a reviewed Label Studio export as human labels.

    Human labels override model labels and manifest gold in the views and metrics. Bad tasks are listed
    and skipped; the exit status is 1 if any was bad.
    """
    from qwen_tasks.review.label_studio import import_label_studio
    from qwen_tasks.review.new_reviews import database_now

    check_task(task)
    engine = open_database()
    started = database_now(engine)
    summary = import_label_studio(engine, path, task=task, reviewer=reviewer)
    console.print(
        f"imported {summary.imported} human label(s) from {path}; {summary.unannotated} task(s) without "
        f"an annotation; {len(summary.errors)} bad",
        soft_wrap=True,
        highlight=False,
    )
    announce_reviews(engine, started, source="qwen-tasks review-import")
    for skipped in summary.errors:
        console.print(f"[yellow]skipped:[/] {skipped}", highlight=False, soft_wrap=True)
    error = f"{len(summary.errors)} task(s) of {path} not imported (see skipped:)" if summary.errors else None
    if as_json:
        print_json({**summary.to_dict(), **({"error": error} if error else {})})
    if error:
        raise typer.Exit(1)  # each skipped task is on stderr already


@app.command("export-finetune")
def export_finetune(
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    task: str = typer.Option("cry", "--task", help="cry (Yes./No. answers) or asr (transcripts)."),
    include_confident: float = typer.Option(
        None,
        "--include-confident",
        help="cry: also add model labels with p_yes >= P or <= 1-P (P in (0.5, 1]) that no gold contradicts.",
    ),
    question: str = typer.Option(None, "--question", help="cry: the question (default: the labelling one)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Write reviewed labels as Qwen2-Audio chat fine-tune data (JSONL).

    Each line: the audio and the labelling question, answered "Yes." / "No." (or the transcript for
    --task asr), for a small fine-tune that makes the model answer the task directly.
    """
    from qwen_tasks.review.label_studio import export_finetune as run_export

    check_task(task)
    summary = run_export(
        open_database(), out, task=task, include_confident=include_confident, question=question
    )
    console.print(
        f"{summary.rows} example(s) written to {summary.out} ({summary.human} human, {summary.model} model)"
    )
    if as_json:
        print_json(summary.to_dict())
