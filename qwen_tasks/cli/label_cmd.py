"""`qwen-tasks label / work / runs / export`: thin wrappers over `runner`, `jobs` and `export`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import jobs, runner
from ..config import get_settings
from . import app, console, fail, open_database, print_json

TASKS = ("asr", "cry")


class _Bar:
    """Rich progress on stderr: clips done of planned, clips/s and real-time factor since work began."""

    def __init__(self, total: int, label: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("clips"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[rtf]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, rate="", rtf="")
        self.start = time.perf_counter()
        self.clips = 0
        self.audio = 0.0

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, outcome: runner.JobOutcome) -> None:
        done = outcome.labelled + outcome.failed
        self.clips += done
        self.audio += outcome.audio_seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rtf = f"RTF {elapsed / self.audio:.3f}" if self.audio else ""
        self.progress.update(self.task, advance=done, rate=f"{self.clips / elapsed:.2f} clips/s", rtf=rtf)
        if outcome.status in ("retry", "failed"):
            console.print(f"job {outcome.job_id}: {outcome.status}: {outcome.error}", highlight=False)


@app.command("label")
def label(
    task: str = typer.Option(..., "--task", help="asr (transcribe) or cry (is a baby crying? yes/no)."),
    model: str = typer.Option(
        None, "--model", help="Hub id, local path or fine-tuned version name (default: QWEN_TASKS_MODEL)."
    ),
    revision: str = typer.Option(None, "--revision", help="Pinned model revision (commit/tag)."),
    adapter: str = typer.Option(None, "--adapter", help="LoRA adapter directory on top of --model."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Max clips per job/batch."),
    max_batch_seconds: float = typer.Option(
        None, "--max-batch-seconds", min=0.1, help="Max audio s per batch."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Generation length cap."),
    limit: int = typer.Option(None, "--limit", min=1, help="Label at most N audio (oldest first)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default: QWEN_TASKS_DEVICE)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: per device)."),
    method: str = typer.Option("score", "--method", help="cry only: score, generate or both."),
    language: str = typer.Option("en", "--language", help="asr: language code of the speech."),
    question: str = typer.Option(None, "--question", help="cry: the yes/no question asked."),
    threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0, help="cry: p_yes >= this is yes."),
    relabel: bool = typer.Option(False, "--relabel", help="Label again in a new run (old labels kept)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Create the run and its jobs, then stop."),
    max_jobs: int = typer.Option(None, "--max-jobs", min=1, help="Plan at most N jobs (rest left over)."),
    lease_seconds: float = typer.Option(jobs.DEFAULT_LEASE_SECONDS, "--lease-seconds", min=0.5),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Label ingested audio that has no label yet for this model and prompt (plan + work in one go).

    Examples: qwen-tasks label --task cry --model ./tiny --device cpu --json;
    qwen-tasks label --task asr --plan-only (then: qwen-tasks work --run ID, on as many machines as you like).
    """
    if task not in TASKS:
        raise fail(f"--task must be asr or cry, got {task!r}")
    settings = get_settings()
    request = runner.request_from_options(
        task, method=method, language=language, question=question, max_new_tokens=max_new_tokens,
        threshold=threshold,
    )  # fmt: skip
    engine = open_database()
    model, revision, adapter = _resolve_model(engine, model or settings.model, revision, adapter)
    bar: _Bar | None = None

    def on_plan(plan: jobs.PlanResult) -> None:
        nonlocal bar
        if plan.run_id is None:
            console.print(
                f"nothing to label for --task {task} (every ingested audio has a label for this model)"
            )
            return
        left = f", {plan.n_left_over} left for the next run" if plan.n_left_over else ""
        console.print(
            f"run {plan.run_id}: {plan.n_items} clips in {len(plan.job_ids)} jobs{left}", highlight=False
        )
        if not plan_only:
            bar = _Bar(plan.n_items, f"{task} run {plan.run_id}").__enter__()

    try:
        summary = runner.label(
            engine,
            request=request,
            model=model,
            revision=settings.model_revision if revision is None else revision,
            adapter=adapter,
            device=device or settings.device,
            dtype=dtype,
            batch_size=batch_size or settings.batch_size,
            max_batch_seconds=max_batch_seconds or settings.max_batch_seconds,
            limit=limit,
            relabel=relabel,
            max_jobs=max_jobs,
            lease_seconds=lease_seconds,
            plan_only=plan_only,
            on_plan=on_plan,
            progress=lambda outcome: bar(outcome) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.__exit__()
    if plan_only:
        if as_json:
            print_json({"run_id": summary.run_id, "jobs": summary.jobs, "items": summary.planned,
                         "left_over": summary.left_over})  # fmt: skip
        elif summary.run_id is not None:
            typer.echo(summary.run_id)
        return
    out = summary.to_dict()
    if as_json:
        print_json(out)
    if summary.run_id is not None:
        rtf = f", RTF {summary.rtf:.3f}" if summary.rtf else ""
        console.print(
            f"run {summary.run_id} {summary.status}: {summary.labelled} labelled, {summary.failed} failed, "
            f"{summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s{rtf}",
            highlight=False,
        )
    if summary.jobs_failed:
        raise fail(
            f"{summary.jobs_failed} job(s) failed after all attempts; see `qwen-tasks runs` and "
            f"label_job.last_error ({'; '.join(summary.errors[-3:])})"
        )


def _resolve_model(
    engine: Any, model: str, revision: str | None, adapter: str | None
) -> tuple[str, str | None, str | None]:
    """A registered version name becomes its base model, base revision and adapter directory."""
    from ..registry import resolve_model

    version = resolve_model(engine, model)
    if version is None:
        return model, revision, adapter
    if adapter or revision:
        raise fail(f"--model {model} is a fine-tuned version: it brings its own base revision and adapter")
    console.print(
        f"{model}: {version.task} version ({version.status}) = {version.base_model} + {version.adapter_path}",
        highlight=False,
    )
    return version.base_model, version.base_revision, version.adapter_path


@app.command("work")
def work(
    run: int = typer.Option(..., "--run", help="Run id (from `label --plan-only` or `runs`)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default: as planned)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: per device)."),
    lease_seconds: float = typer.Option(
        jobs.DEFAULT_LEASE_SECONDS,
        "--lease-seconds",
        min=0.5,
        help="A killed worker's job is taken over after this long.",
    ),
    worker_id: str = typer.Option(
        None, "--worker-id", help="Name recorded on the jobs (default: host:pid:rnd)."
    ),
    wait: bool = typer.Option(
        True,
        "--wait/--no-wait",
        help="Wait for jobs other workers hold (take over if they die) or stop when idle.",
    ),
    max_jobs: int = typer.Option(None, "--max-jobs", min=1, help="Stop after N jobs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Claim and process jobs of a run until none is left (start as many workers as you have GPUs).

    Example: qwen-tasks work --run 7 --device cuda:1
    """  # fmt: skip
    engine = open_database()
    info = jobs.get_run(engine, run)
    settings = get_settings()
    planned_device = info.params.get("device") or settings.device
    planned_dtype = info.params.get("dtype")

    def factory():  # noqa: ANN202 - Backend
        from ..backends import get_backend

        return get_backend(**info.load_args, device=device or planned_device,
                           dtype=dtype or planned_dtype)  # fmt: skip

    counts = jobs.open_job_counts(engine, run)
    total = int(counts["clips"])
    with _Bar(total, f"run {run}") as bar:
        summary = runner.work(
            engine, run, factory, worker_id=worker_id, lease_seconds=lease_seconds, stop_when_idle=not wait,
            progress=bar, max_jobs=max_jobs,
        )  # fmt: skip
    if as_json:
        print_json(summary.to_dict())
    console.print(
        f"worker {summary.worker_id}: {summary.jobs_done} jobs done, {summary.jobs_failed} failed, "
        f"{summary.labelled} clips labelled; run {run} is {summary.run_status}",
        highlight=False,
    )
    if summary.jobs_failed:
        raise fail(
            f"{summary.jobs_failed} job(s) failed after all attempts: {'; '.join(summary.errors[-3:])}"
        )


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@app.command("runs")
def runs(
    limit: int = typer.Option(20, "--limit", min=1, help="Show the newest N runs."),
    task: str = typer.Option(None, "--task", help="Only asr or cry runs."),
    run: int = typer.Option(None, "--run", help="Only this run."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list on stdout."),
) -> None:
    """Show labelling runs and their progress (jobs pending/running/done/failed, clips, RTF).

    The same numbers are in the SQL view run_progress.
    """
    if task is not None and task not in TASKS:
        raise fail(f"--task must be asr or cry, got {task!r}")
    rows = jobs.progress_rows(open_database(), limit=limit, task=task, run_id=run)
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no labelling runs yet (start one with: qwen-tasks label --task cry)")
        return
    table = Table(title="labelling runs (newest first)")
    for name in ("run", "task", "model", "prompt", "status", "jobs p/r/d/f", "labelled", "failed", "audio s",
                 "wall s", "RTF"):  # fmt: skip
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["run_id"]), r["task"], _short_model(r["model"]), r["prompt_version"], r["status"],
            f"{r['jobs_pending']}/{r['jobs_running']}/{r['jobs_done']}/{r['jobs_failed']}",
            f"{r['clips_labelled']}/{r['clips_planned']}", str(r["clips_failed"]), _fmt(r["audio_seconds"]),
            _fmt(r["wall_seconds"]), _fmt(r["rtf"], 3),
        )  # fmt: skip
    out = type(console)()  # the table goes to stdout; messages stay on stderr
    if not out.is_terminal:
        out = type(console)(width=200)  # a pipe or a file: do not fold the table to 80 columns
    out.print(table)


def _short_model(model: str) -> str:
    return model if len(model) <= 40 else "…" + model[-39:]


@app.command("export")
def export(
    task: str = typer.Option(..., "--task", help="asr or cry."),
    run: int = typer.Option(None, "--run", help="Run id (default: the latest run of the task with labels)."),
    out: Path = typer.Option(None, "--out", help="JSON Lines file (default: stdout)."),
) -> None:
    """Export a run's labels as JSON Lines, one object per audio path.

    Keys: audio, text (asr) or answer/p_yes/label (cry), reference/gold from manifests, model, revision,
    prompt_version, run_id. Example: qwen-tasks export --task cry --out cry.jsonl
    """
    from ..export import export_rows, write_jsonl

    if task not in TASKS:
        raise fail(f"--task must be asr or cry, got {task!r}")
    engine = open_database()
    n = write_jsonl(export_rows(engine, task, run), out, stdout=sys.stdout)
    console.print(f"wrote {n} rows{f' to {out}' if out else ''}", highlight=False)
