"""`qwen-tasks ingest`: register folders, audio files and jsonl manifests (thin wrapper over ingest())."""

from __future__ import annotations

from pathlib import Path

import typer
from sqlalchemy.engine import Engine

from qwen_tasks.cli.common import app, console, fail, open_database, print_json
from qwen_tasks.errors import ConfigError
from qwen_tasks.ingest.manifests import ManifestKind
from qwen_tasks.ingest.register import IngestSummary, ingest


def _print_summary(summary: IngestSummary) -> None:
    console.print(
        f"new {summary.new}, duplicate {summary.duplicate}, changed {summary.changed}, "
        f"unchanged {summary.unchanged}, quarantined {summary.quarantined}, missing {summary.missing}, "
        f"manifest items {summary.manifest_items}"
        + (f", manifest conflicts {summary.manifest_conflicts}" if summary.manifest_conflicts else ""),
        highlight=False,
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
    paths: list[Path] = typer.Argument(
        None,
        help="Folders (scanned recursively for audio: wav/flac/ogg/mp3, m4a/aac, opus/webm, amr, wma, mp4 "
        "and more; other files are counted as skipped), audio files, or *.jsonl manifests. "
        "Optional with --manifest.",
        show_default=False,
    ),
    manifest: list[Path] = typer.Option(
        [], "--manifest", "-m", help="A jsonl manifest (ASR or audio-QA format); repeatable."
    ),
    kind: ManifestKind | None = typer.Option(
        None, "--kind", help="Manifest format, asr or aqa; default: inferred per line from its keys."
    ),
    root: list[Path] = typer.Option(
        [],
        "--root",
        help="Allowed root folder (repeatable); audio whose real path is elsewhere is quarantined, not "
        "read. Default: QWEN_TASKS_ALLOWED_ROOTS, else the paths given and each manifest's folder.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Register audio in the database: new files are probed and hashed, unchanged ones skipped, identical
    bytes stored once, bad files quarantined with a reason. Exit 0 when the run completes."""
    paths = paths or []
    if not paths and not manifest:
        raise fail("give at least one PATH or --manifest FILE (see: qwen-tasks ingest --help)", code=2)
    for p in [*paths, *manifest]:
        if not p.exists() and not p.is_symlink():
            raise fail(f"no such file or directory: {p}")
    engine = open_database()
    manifests: list[tuple[Path, ManifestKind | None]] = [(m, kind) for m in manifest]
    try:
        if console.is_terminal:  # the bar goes to stderr, so it never mixes with --json on stdout
            summary = _ingest_with_bar(engine, paths, manifests, root, kind)
        else:
            summary = ingest(engine, paths, manifests, roots=root, kind=kind)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if as_json:
        print_json(summary.to_dict())
    else:
        _print_summary(summary)


def _ingest_with_bar(
    engine: Engine,
    paths: list[Path],
    manifests: list[tuple[Path, ManifestKind | None]],
    roots: list[Path],
    kind: ManifestKind | None,
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

        return ingest(engine, paths, manifests, roots=roots, progress=update, kind=kind)
