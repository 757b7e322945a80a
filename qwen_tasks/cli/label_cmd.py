"""`qwen-tasks label / work / runs / export`: thin wrappers over `labelling.worker`, `labelling.jobs`
and `review.export`.

`label` is options → the model chosen once (`planning.choose_models`) → plan + work (`worker.label`,
which records that choice on the plan and loads it) → the summary printed.

`label` with a model this interpreter cannot load (the original Qwen-Audio, from the main environment)
plans here and hands the runs to `qwen-tasks work` in the environment that can (`_label_elsewhere`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qwen_tasks.cli.common import app, check_task, console, fail, open_database, print_json, wants_json
from qwen_tasks.cli.flags import generated_flags, given
from qwen_tasks.config import get_settings
from qwen_tasks.errors import QwenTasksError
from qwen_tasks.labelling import jobs, worker
from qwen_tasks.labelling.options import LabelOptions
from qwen_tasks.labelling.worker import WorkerOptions
from qwen_tasks.progress import ProgressLog, log_to_stderr
from qwen_tasks.records import JobOutcomeStatus


class _Bar:
    """Progress on stderr: clips done of planned, clips/s and real-time factor since work began. A rich
    bar on a terminal; otherwise (a log file, a pipe) a `ProgressLog` line every
    QWEN_TASKS_PROGRESS_SECONDS (30 s) with the same figures and the time left."""

    def __init__(self, total: int, label: str) -> None:
        self.log: ProgressLog | None = None
        if not console.is_terminal:
            log_to_stderr()
            self.log = ProgressLog(f"label {label}", total)
            return
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
        if self.log is not None:
            self.log.__enter__()
        else:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.log is not None:
            self.log.__exit__()
        else:
            self.progress.stop()

    def __call__(self, outcome: worker.JobOutcome) -> None:
        done = outcome.labelled + outcome.failed
        if outcome.status in (JobOutcomeStatus.RETRY, JobOutcomeStatus.FAILED):
            console.print(f"job {outcome.job_id}: {outcome.status}: {outcome.error}", highlight=False)
        if self.log is not None:
            self.log.update(advance=done, audio_seconds=outcome.audio_seconds)
            return
        self.clips += done
        self.audio += outcome.audio_seconds
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rtf = f"RTF {elapsed / self.audio:.3f}" if self.audio else ""
        self.progress.update(self.task, advance=done, rate=f"{self.clips / elapsed:.2f} clips/s", rtf=rtf)


@app.command("label")
@generated_flags(WorkerOptions, only=("lease_seconds",))  # the worker's lease: `work`'s --lease-seconds
@generated_flags(LabelOptions)  # --model, --batch-size, --threshold, ...: one flag per LabelOptions option
def label(
    task: str = typer.Option(..., "--task", help="asr (transcribe) or cry (is a baby crying? yes/no)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Create the run and its jobs, then stop."),
    max_jobs: int = typer.Option(None, "--max-jobs", min=1, help="Plan at most N jobs (rest left over)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    **flags: Any,
) -> None:
    """Label ingested audio that has no label yet for this model and prompt (plan + work in one go).

    An unfinished run of the same model and prompt (killed, or its model would not load) is resumed
    first, the same way the nightly DAG does. An original Qwen-Audio model is labelled by a worker of its
    own environment (`make install-qwen-audio`), started for you. Examples: qwen-tasks label --task cry
    --model ./tiny --device cpu --json; qwen-tasks label --task asr --plan-only (then: qwen-tasks work
    --run ID, on as many machines as you like).
    """
    from qwen_tasks.labelling.planning import choose_models

    check_task(task)
    settings = get_settings()
    opts = LabelOptions.from_mapping({**given(flags), "tasks": [task]}, settings, flags=True)
    lease_seconds = flags.get("lease_seconds")
    options = WorkerOptions.from_flags(given({"lease_seconds": lease_seconds}))
    engine = open_database()
    started = time.perf_counter()
    choices = choose_models(engine, opts)  # the model, resolved once: planning and the worker read it
    elsewhere = choices[task].python  # the Qwen-Audio environment's python, or None: this one
    shown = _Shown(engine, task, bar=not plan_only and elsewhere is None)
    try:
        with worker.signals_handled():
            summary = worker.label(
                engine, opts, options, choices=choices, max_jobs=max_jobs,
                plan_only=plan_only or elsewhere is not None, on_plan=shown.plan, progress=shown.outcome,
            )  # fmt: skip
    finally:
        shown.close()
    if plan_only:
        _print_planned(summary, as_json)
        return
    if elsewhere is not None and summary.run_ids:
        summary = _label_elsewhere(engine, summary, elsewhere, opts, lease_seconds, started)
    _print_labelled(summary, as_json)


class _Shown:
    """What `label` shows as it goes: the plan (resumed and new runs, or why there is nothing to do), then
    a progress bar while this process labels (`bar`)."""

    def __init__(self, engine: Any, task: str, *, bar: bool) -> None:
        self.engine, self.task, self.show_bar = engine, task, bar
        self.bar: _Bar | None = None

    def plan(self, plan: Any) -> None:
        task = self.task
        entry = plan.per_task.get(task) or {}
        if not plan.run_ids:
            why = entry.get("reason") or "every clip has a label for this model"
            console.print(f"nothing to label for --task {task}: {why}", highlight=False, soft_wrap=True)
            return
        if entry.get("model_version"):
            console.print(
                f"labelling with fine-tuned version {entry['model_version']} (revision {plan.revision})",
                highlight=False,
            )
        if plan.resumed_jobs:
            resumed = sorted(set(plan.run_ids) - set(plan.new_run_ids))
            console.print(
                f"resuming run {', '.join(map(str, resumed))}: {plan.resumed_jobs} unfinished job(s)",
                highlight=False,
            )
        left = f", {plan.left_over} left for the next run" if plan.left_over else ""
        scope = ", ".join(entry.get("datasets") or [])
        new_runs = ", ".join(map(str, plan.new_run_ids))
        if new_runs:
            console.print(
                f"run {new_runs}: {plan.items} clips in {len(plan.job_ids) - plan.resumed_jobs} jobs{left} "
                f"(datasets: {scope})",
                highlight=False,
                soft_wrap=True,
            )
        if self.show_bar:
            clips = int(jobs.open_job_counts(self.engine, plan.run_ids)["clips"])
            self.bar = _Bar(clips, f"{task} run {plan.run_ids[-1]}").__enter__()

    def outcome(self, outcome: worker.JobOutcome) -> None:
        if self.bar is not None:
            self.bar(outcome)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__()


def _print_planned(summary: worker.WorkSummary, as_json: bool) -> None:
    """`label --plan-only`: the runs planned (their ids, one a line), or their figures as JSON."""
    if as_json:
        print_json({"run_id": summary.run_id, "run_ids": summary.run_ids, "jobs": summary.jobs,
                    "resumed_jobs": summary.resumed_jobs, "items": summary.planned,
                    "left_over": summary.left_over})  # fmt: skip
        return
    for run_id in summary.run_ids:
        typer.echo(run_id)


def _print_labelled(summary: worker.WorkSummary, as_json: bool) -> None:
    """`label`'s summary line (and JSON); exit 1 naming the errors when jobs failed for good."""
    out = summary.to_dict()
    error = (
        f"{summary.jobs_failed} job(s) failed after all attempts; see `qwen-tasks runs` and "
        f"label_job.last_error ({'; '.join(summary.errors[-3:])})"
        if summary.jobs_failed
        else None
    )
    if as_json:
        print_json({**out, "error": error} if error else out)
    if summary.run_id is not None:
        rtf = f", RTF {summary.rtf:.3f}" if summary.rtf else ""
        console.print(
            f"run {summary.run_id} {summary.run_status}: {summary.labelled} labelled, {summary.failed} "
            f"failed, {summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s{rtf}",
            highlight=False,
        )
    if error:
        raise fail(error, as_json=False)  # the summary printed above carries it


def _label_elsewhere(
    engine: Any,
    summary: worker.WorkSummary,
    python: Path,
    opts: Any,
    lease_seconds: float | None,
    started: float,
) -> worker.WorkSummary:
    """Work the planned runs with `qwen-tasks work --run ID` of the environment `python` belongs to, one
    run after the other, and add up their `--json` summaries into `summary` (the keys of any `label
    --json`). Its progress shows as it goes; its exit status is passed on (143 after SIGTERM, which is
    forwarded to it); a run whose jobs failed does not stop the next one (exit 1 at the end, as here).
    Without that environment: one line saying how to create it, exit 1, the runs stay planned."""
    from qwen_tasks.labelling import environments

    run_ids = summary.run_ids
    if not python.is_file():
        commands = " and ".join(
            f"`{environments.shown(environments.worker_command(r, python))}`" for r in run_ids
        )
        raise fail(
            f"run {', '.join(map(str, run_ids))} planned for {opts.model}, an original Qwen-Audio model, "
            f"which only its own environment can label; {environments.how_to_create(python)}, then run "
            f"this command again, or {commands}"
        )
    args = ["--device", opts.device]
    if opts.dtype_arg:
        args += ["--dtype", opts.dtype_arg]
    if lease_seconds:
        args += ["--lease-seconds", str(lease_seconds)]
    # the same database for sure (not a second embedded server), through the environment, not argv
    env = {**os.environ, "QWEN_TASKS_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
    for run_id in run_ids:
        console.print(
            f"run {run_id}: labelling in the Qwen-Audio environment ({environments.shown([str(python)])})",
            highlight=False,
            soft_wrap=True,
        )
        done = environments.run_worker(run_id, args=args, python=python, env=env)
        summary.merge(worker.WorkSummary.from_dict(done.summary or {}))
        if done.returncode and (done.summary is None or done.returncode != 1):
            if wants_json():  # it said why on stderr (143/130: stopped by a signal); stdout needs an object
                print_json({"error": f"run {run_id}: the Qwen-Audio worker exited with {done.returncode}"})
            raise typer.Exit(done.returncode)
    summary.run_status = jobs.get_run(engine, summary.run_id).status if summary.run_id is not None else None
    summary.wall_seconds = time.perf_counter() - started
    return summary


@app.command("work")
@generated_flags(WorkerOptions)  # --device, --dtype, --lease-seconds, --worker-id, --poll-seconds, --max-jobs
def work(
    run: int = typer.Option(None, "--run", help="Run id (from `label --plan-only` or `runs`)."),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="Stay up: load --model once and label every new run of it (planned by the DAG with "
        "workers=external, or by label --plan-only) until SIGTERM.",
    ),
    model: str = typer.Option(None, "--model", help="--follow: the model to serve (QWEN_TASKS_MODEL)."),
    revision: str = typer.Option(
        None, "--revision", help="--follow: its revision (QWEN_TASKS_MODEL_REVISION)."
    ),
    wait: bool = typer.Option(
        True,
        "--wait/--no-wait",
        help="Wait for jobs other workers hold (take over if they die) or stop when idle.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    **flags: Any,
) -> None:
    """Claim and process jobs of a run until none is left (start as many workers as you have GPUs), or,
    with --follow, keep a model loaded and serve every new run of it.

    SIGTERM: `work --run` gives the job in hand back at once and exits 143; `work --follow` finishes
    its current job first (a second SIGTERM interrupts it). Examples: qwen-tasks work --run 7 --device
    cuda:1; qwen-tasks work --follow --model Qwen/Qwen2-Audio-7B-Instruct --device cuda
    """  # fmt: skip
    if (run is None) == (not follow):
        raise fail("give --run ID, or --follow to serve new runs of a model")
    until = worker.Until.STOPPED if follow else worker.Until.DRAINED if wait else worker.Until.IDLE
    options = WorkerOptions.from_flags(given(flags), until=until)
    engine = open_database()
    if follow:
        _follow(engine, model, revision, options, as_json)
        return
    jobs.get_run(engine, run)  # a wrong --run is one line before anything else
    total = int(jobs.open_job_counts(engine, run)["clips"])
    with _Bar(total, f"run {run}") as bar, worker.signals_handled():
        summary = worker.work(engine, run, options, progress=bar)
    _work_done(summary, f"run {run} is {summary.run_status}", as_json)


def _follow(
    engine: Any, model: str | None, revision: str | None, options: WorkerOptions, as_json: bool
) -> None:
    """`work --follow`: load the model now, then serve every unfinished run of it until SIGTERM."""
    from qwen_tasks.labelling.backends import get_backend
    from qwen_tasks.labelling.options import absolute_model_path
    from qwen_tasks.labelling.registry import find_model_version

    settings = get_settings()
    rev = settings.model_revision if revision is None else revision.strip()
    # a fine-tuned version's name serves that version (base + adapter); a plain model serves the base
    version = find_model_version(engine, model or settings.model)
    name = version.base_model if version else absolute_model_path(model or settings.model)
    adapter = version.adapter_path if version else None
    if version is not None:
        rev = version.base_revision
    # before loading anything (QWEN_TASKS_ALLOWED_MODELS): a version as its base and its adapter
    from qwen_tasks.labelling.allowed_models import check_allowed

    what = f"--model {model or settings.model!r} is a fine-tuned version whose" if version else ""
    check_allowed(f"{what} base" if version else "--model", name)
    check_allowed(f"{what} adapter", adapter)
    shown = f"revision {rev or 'default'}" + (f", adapter {adapter}" if adapter else "")
    console.print(f"loading {name} ({shown}) ...", highlight=False)
    started = time.perf_counter()
    try:
        backend = get_backend(
            name, revision=rev, device=options.device or settings.device, dtype=options.dtype, adapter=adapter
        )
    except Exception as exc:
        if isinstance(exc, QwenTasksError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise fail(f"could not load model {name}: {type(exc).__name__}: {first}") from None
    model_id = getattr(backend, "model_id", name)
    console.print(
        f"model loaded in {time.perf_counter() - started:.1f} s; waiting for runs of {model_id} "
        "(SIGTERM: finish the current job, then stop)",
        highlight=False,
    )
    stop = worker.StopFlag()
    with worker.signals_handled(stop):
        summary = worker.work(
            engine, None, options, backend_factory=lambda run: backend, backend=backend,
            model=(model_id, getattr(backend, "revision", rev)), stop=stop,
            progress=lambda o: console.print(
                f"job {o.job_id} (run {o.run_id}): {o.status}, {o.labelled} labelled, {o.failed} failed",
                highlight=False,
            ),
        )  # fmt: skip
    _work_done(summary, f"runs {summary.run_ids or 'none'}", as_json)
    if summary.stopped:
        raise typer.Exit(143)


def _work_done(summary: worker.WorkSummary, where: str, as_json: bool) -> None:
    error = (
        f"{summary.jobs_failed} job(s) failed after all attempts: {'; '.join(summary.errors[-3:])}"
        if summary.jobs_failed
        else None
    )
    if as_json:
        print_json({**summary.to_dict(), **({"error": error} if error else {})})
    console.print(
        f"worker {summary.worker_id}: {summary.jobs_done} jobs done, {summary.jobs_failed} failed, "
        f"{summary.labelled} clips labelled; {where}",
        highlight=False,
    )
    if error:
        raise fail(error, as_json=False)  # the summary printed above carries it


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
    """Show labelling runs, the datasets each covered, and their progress (jobs pending/running/done/
    failed, clips, RTF).

    The same numbers are in the SQL view run_progress.
    """
    check_task(task)
    rows = jobs.progress_rows(open_database(), limit=limit, task=task, run_id=run)
    if run is not None and not rows:
        raise fail(f"run {run} does not exist (see: qwen-tasks runs)")
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no labelling runs yet (start one with: qwen-tasks label --task cry)")
        return
    table = Table(title="labelling runs (newest first)")
    for name in ("run", "task", "datasets", "model", "revision", "prompt", "status", "jobs p/r/d/f",
                 "labelled", "failed", "audio s", "wall s", "RTF"):  # fmt: skip
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(
            str(r["run_id"]), r["task"], ",".join(r["datasets"] or []) or "-",
            _short_model(r["model"]), r["revision"] or "-", r["prompt_version"],
            r["status"],
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
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="Only this dataset's clips (default run: the latest one with labels that covered it).",
    ),
) -> None:
    """Export a run's labels as JSON Lines, one object per audio path.

    Keys: audio, text (asr) or answer/p_yes/label (cry), reference/gold from manifests, model, revision,
    prompt_version, run_id. Example: qwen-tasks export --task cry --out cry.jsonl
    """
    from qwen_tasks.review.export import export_copy, write_jsonl

    check_task(task)
    engine = open_database()
    n = write_jsonl(export_copy(engine, task, run, dataset), out, stdout=sys.stdout)
    console.print(f"wrote {n} rows{f' to {out}' if out else ''}", highlight=False)
