"""`qwen-tasks ingest`: register folders, audio files and jsonl manifests (thin wrapper over ingest())."""

from __future__ import annotations

import os
from typing import Any

import typer
from sqlalchemy.engine import Engine

from qwen_tasks.cli.common import app, console, fail, open_database, print_json
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.manifests import ManifestKind
from qwen_tasks.ingest.register import IngestSummary, ingest
from qwen_tasks.records import is_url


def _print_summary(summary: IngestSummary) -> None:
    console.print(
        f"new {summary.new}, duplicate {summary.duplicate}, changed {summary.changed}, "
        f"unchanged {summary.unchanged}, quarantined {summary.quarantined}, missing {summary.missing}, "
        f"manifest items {summary.manifest_items}"
        + (f", manifest conflicts {summary.manifest_conflicts}" if summary.manifest_conflicts else ""),
        highlight=False,
        soft_wrap=True,
    )
    for d in summary.datasets:
        console.print(
            f"  dataset {d['name']} ({d['split']}; {', '.join(d['tasks'])}): "
            f"{d['clips_added']} clip(s) added",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if summary.skipped:  # files in the folders that were not taken as audio, most common extension first
        counts = sorted(summary.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        console.print(
            f"  skipped {sum(summary.skipped.values())} files that are not audio by extension: "
            + ", ".join(f"{ext} {n}" for ext, n in counts),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for q in summary.quarantine:
        console.print(
            f"  quarantined {q['path']}: {q['reason']}", highlight=False, markup=False, soft_wrap=True
        )
    for e in summary.manifest_errors:
        console.print(
            f"  skipped {e['manifest']}:{e['line']}: {e['reason']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for w in summary.manifest_warnings:
        console.print(
            f"  warning {w['manifest']}:{w['line']}: {w['reason']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@app.command("ingest")
def ingest_command(
    paths: list[str] = typer.Argument(
        None,
        help="Folders (scanned recursively for audio: wav/flac/ogg/mp3, m4a/aac, opus/webm, amr, wma, mp4 "
        "and more; other files are counted as skipped), audio files, or *.jsonl manifests; each may be "
        "an object-storage URL (s3://bucket/prefix, s3://bucket/m.jsonl). "
        "Optional with --manifest.",
        show_default=False,
    ),
    manifest: list[str] = typer.Option(
        [], "--manifest", "-m", help="A jsonl manifest (ASR or audio-QA format), a file or a URL; repeatable."
    ),
    kind: ManifestKind | None = typer.Option(
        None, "--kind", help="Manifest format, asr or aqa; default: inferred per line from its keys."
    ),
    root: list[str] = typer.Option(
        [],
        "--root",
        help="Allowed root folder or URL prefix (repeatable); audio whose real path is elsewhere is "
        "quarantined, not read. Default: QWEN_TASKS_ALLOWED_ROOTS, else the paths given and each "
        "manifest's folder.",
    ),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="The dataset these sources join (created if new). Default: each manifest's file stem, each "
        "folder's name.",
    ),
    split: str = typer.Option(
        None,
        "--split",
        help="train or test (a new dataset: train; an existing one keeps its split). Clips of a test "
        "dataset are never fine-tuning rows.",
    ),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Comma-separated tasks the dataset is labelled for (asr,cry). Default: a manifest's kind "
        "gives its task (asr -> asr, aqa -> cry), a folder both.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Register audio in the database: new files are probed and hashed, unchanged ones skipped, identical
    bytes stored once, bad files quarantined with a reason; every source joins a dataset. Exit 0 when
    the run completes. Example: qwen-tasks ingest --manifest eval.jsonl --kind aqa --dataset cry-eval
    --split test"""
    paths = paths or []
    if not paths and not manifest:
        raise fail("give at least one PATH or --manifest FILE (see: qwen-tasks ingest --help)", code=2)
    for p in [*paths, *manifest]:
        if not is_url(p) and not os.path.lexists(p):  # a URL is looked up by ingest()
            raise fail(f"no such file or directory: {p}")
    engine = open_database()
    manifests: list[tuple[str, ManifestKind | None]] = [(m, kind) for m in manifest]
    scope = {"dataset": dataset, "split": split, "tasks": tasks.split(",") if tasks is not None else None}
    try:
        if console.is_terminal:  # the bar goes to stderr, so it never mixes with --json on stdout
            summary = _ingest_with_bar(engine, paths, manifests, root, kind, scope)
        else:
            summary = ingest(engine, paths, manifests, roots=root, kind=kind, **scope)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(summary.to_dict())
    else:
        _print_summary(summary)


def _ingest_with_bar(
    engine: Engine,
    paths: list[str],
    manifests: list[tuple[str, ManifestKind | None]],
    roots: list[str],
    kind: ManifestKind | None,
    scope: dict[str, Any],
) -> IngestSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("ingest", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return ingest(engine, paths, manifests, roots=roots, progress=update, kind=kind, **scope)


@app.command("datasets")
def datasets_command(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list on stdout."),
) -> None:
    """List the datasets: split, tasks, clips, labelled clips per task, gold labels and references.

    The same rows are in the SQL view dataset_summary. Datasets are made by `qwen-tasks ingest
    [--dataset NAME] [--split train|test] [--tasks asr,cry]`.
    """
    from rich.table import Table

    from qwen_tasks.ingest.datasets import summary_rows

    rows = summary_rows(open_database())
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no datasets yet (qwen-tasks ingest FOLDER --dataset NAME makes one)")
        return
    table = Table(title="datasets")
    for name in ("dataset", "split", "tasks", "clips", "audio s", "asr labelled", "cry labelled",
                 "references", "cry gold (yes/no)"):  # fmt: skip
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], r["split"], ",".join(r["tasks"]), str(r["clips"]), f"{r['audio_seconds']:.1f}",
            str(r["asr_labelled"]), str(r["cry_labelled"]), str(r["asr_references"]),
            f"{r['cry_gold']} ({r['cry_gold_yes']}/{r['cry_gold_no']})",
        )  # fmt: skip
    out = type(console)()  # the table goes to stdout; messages stay on stderr
    if not out.is_terminal:
        out = type(console)(width=200)
    out.print(table)
